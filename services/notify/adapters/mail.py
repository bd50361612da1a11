"""The e-mail channel: one message through SMTP (stdlib ``smtplib``), and what its answer means.

``smtplib`` blocks, so each message is sent on a thread of a pool as large as the worker's
concurrency: the event loop never waits on a mail server, and a slow one holds only the
threads of its own messages (each bounded by ``smtp_timeout_s``). A new connection per message
keeps failure handling simple; the volume of e-mail notifications does not call for pooling.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage

from services.notify.adapters.webhook import Attempt
from services.notify.domain.model import Outcome
from services.notify.settings import NotifySettings


class MailSender:
    def __init__(self, settings: NotifySettings) -> None:
        self.settings = settings
        self._pool: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.settings.concurrency, thread_name_prefix="notify-smtp"
            )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    async def send(self, message: EmailMessage) -> Attempt:
        if self._pool is None:
            await self.start()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._send, message)

    def _tls_context(self) -> ssl.SSLContext:
        ca = self.settings.smtp_ca_file
        return ssl.create_default_context(cafile=str(ca) if ca else None)

    def _send(self, message: EmailMessage) -> Attempt:
        s = self.settings
        try:
            if s.smtp_security == "tls":
                client: smtplib.SMTP = smtplib.SMTP_SSL(
                    s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_s, context=self._tls_context()
                )
            else:
                client = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_s)
            with client:
                if s.smtp_security == "starttls":
                    client.starttls(context=self._tls_context())
                if s.smtp_username:
                    client.login(s.smtp_username, s.smtp_secret() or "")
                refused = client.send_message(message)
        except smtplib.SMTPRecipientsRefused as exc:
            code, reply = next(iter(exc.recipients.values()))
            return _answer(code, reply, recipient=True)
        except smtplib.SMTPResponseException as exc:
            # Authentication and sender refusals are the server's view of notify's settings,
            # not of this message: worth retrying once an operator has fixed them.
            own = isinstance(exc, smtplib.SMTPAuthenticationError | smtplib.SMTPSenderRefused)
            return _answer(exc.smtp_code, exc.smtp_error, recipient=not own)
        except TimeoutError as exc:
            return Attempt(Outcome.RETRY, None, f"timeout after {s.smtp_timeout_s}s ({exc})")
        except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
            return Attempt(Outcome.RETRY, None, f"{type(exc).__name__}: {exc}"[:1000])
        if refused:
            code, reply = next(iter(refused.values()))
            return _answer(code, reply, recipient=True)
        return Attempt(Outcome.DELIVERED, 250, None)


def _answer(code: int, reply: bytes | str, *, recipient: bool) -> Attempt:
    """4xx is temporary (retry); 5xx about the message or recipient is final."""
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
    error = f"SMTP {code}: {text}"[:1000]
    if 500 <= code < 600 and recipient:
        return Attempt(Outcome.FAILED, code, error)
    return Attempt(Outcome.RETRY, code, error)
