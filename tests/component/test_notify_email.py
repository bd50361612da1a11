"""The e-mail channel against a real SMTP server (aiosmtpd on a loopback port, in a thread of
its own), on SQLite and PostgreSQL: the message a subscriber receives (Chinese subject and
body, headers), STARTTLS with authentication, and the retry and failure rules."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from contracts.codes import Category
from contracts.quota import OverQuotaDetected, QuotaApproved
from contracts.topics import ORGS_EVENTS, QUOTA_EVENTS, dlq
from services.notify.bootstrap import build
from services.notify.settings import NotifySettings
from services.runtime.app import ServiceRuntime
from services.runtime.events import EventConsumer
from services.runtime.logging import configure_logging
from services.runtime.messaging import event_routes
from tests.component.test_notify_handlers import (
    DOC,
    KEY,
    DeadLetters,
    delivery_rows,
    feed,
    org_registered,
    outbox,
    subscribed,
)
from tests.conftest import service_settings

ADDRESS = "renshi@shijiazhuang.example"
SMTP_USER = "notify"
SMTP_PASSWORD = "smtp-pass-0123456789"


@dataclass
class Mailbox:
    """What the SMTP server received, and how it answers recipients."""

    refuse: set[str] = field(default_factory=set)
    received: list[dict[str, Any]] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(
            {
                "from": envelope.mail_from,
                "to": list(envelope.rcpt_tos),
                "message": message_from_bytes(envelope.content, policy=policy.default),
                "tls": session.ssl is not None,
            }
        )
        return "250 Message accepted"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword):
            self.logins.append((data.login.decode(), data.password.decode()))
            if (data.login.decode(), data.password.decode()) == (SMTP_USER, SMTP_PASSWORD):
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key: the test's own certificate authority."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "smtp.crt", tmp_path / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class Smtp:
    mailbox: Mailbox
    settings: dict[str, Any]


@pytest.fixture
def smtp_plain() -> Iterator[Smtp]:
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield Smtp(mailbox, {"smtp_host": "127.0.0.1", "smtp_port": port})
    finally:
        controller.stop()


@pytest.fixture
def smtp_starttls(tmp_path: Path) -> Iterator[Smtp]:
    mailbox = Mailbox()
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    port = free_port()
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        auth_required=True,
        auth_require_tls=True,
        authenticator=mailbox.authenticate,
    )
    controller.start()
    try:
        yield Smtp(
            mailbox,
            {
                "smtp_host": "127.0.0.1",
                "smtp_port": port,
                "smtp_security": "starttls",
                "smtp_ca_file": cert,
                "smtp_username": SMTP_USER,
                "smtp_password": SecretStr(SMTP_PASSWORD),
            },
        )
    finally:
        controller.stop()


async def mail_service(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **smtp: Any
) -> ServiceRuntime:
    monkeypatch.setenv("BIANZHI_NOTIFY_DATABASE_URL", db_url)
    rt = build(
        service_settings(tmp_path, "localhost:1"),
        NotifySettings(
            max_attempts=2,
            backoff_initial_s=0.001,
            backoff_max_s=0.002,
            secrets_key=KEY,
            mail_from="bianbian@hebei.example",
            smtp_timeout_s=5,
            **smtp,
        ),
    )
    rt.command_consumer.dead_letter = DeadLetters()
    await rt.migrate()
    return rt


@pytest.fixture
async def services() -> AsyncIterator[list[ServiceRuntime]]:
    """The runtimes a test builds, closed after it."""
    made: list[ServiceRuntime] = []
    yield made
    for rt in made:
        await rt.worker.stop()  # type: ignore[attr-defined]
        await rt.engine.dispose()
        await rt.read_engine.dispose()


def feeds_of(rt: ServiceRuntime) -> dict[str, EventConsumer]:
    return {
        sub.topic: EventConsumer(
            routes=event_routes(sub.routes),
            service="notify",
            consumer=f"notify<-{sub.topic}",
            uow_factory=rt.uow,
            dead_letter=DeadLetters(),
        )
        for sub in rt.definition.event_subscriptions
    }


@pytest.fixture
def service_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """Captures what ``capture_service_logs`` turns on; logging goes back to the real stderr
    afterwards (threads such as the SMTP server's may still log once the test is over)."""
    yield capsys
    with capsys.disabled():
        configure_logging("notify", "WARNING")


def capture_service_logs(capsys: pytest.CaptureFixture[str]) -> None:
    """The service's JSON log lines at INFO, into ``capsys`` (from now on in this test)."""
    configure_logging("notify", "INFO")
    capsys.readouterr()


async def drive(rt: ServiceRuntime, rounds: int = 5) -> None:
    for _ in range(rounds):
        await rt.worker.deliver_due()  # type: ignore[attr-defined]


def email_subscription() -> dict[str, Any]:
    return {
        "event_types": ["bianzhi.quota.*"],
        "subscriber": "石家庄市人力资源和社会保障局",
        "channel": {"kind": "email", "address": ADDRESS},
    }


def body_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


async def test_an_email_says_in_chinese_what_changed_in_which_org_on_which_document(
    services: list[ServiceRuntime],
    smtp_plain: Smtp,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = await mail_service(db_url, tmp_path, monkeypatch, **smtp_plain.settings)
    services.append(rt)
    feeds = feeds_of(rt)
    sid = await subscribed(rt, **email_subscription())
    org_id = uuid.uuid4()
    await feed(feeds, ORGS_EVENTS, org_registered("130102", org_id))
    approved = await feed(
        feeds,
        QUOTA_EVENTS,
        QuotaApproved(
            org_id=org_id,
            category=Category.ADMIN,
            approved=12,
            previous_approved=10,
            document=DOC,
            effective_date=DOC.date,
        ),
    )
    await drive(rt)

    (got,) = smtp_plain.mailbox.received
    message: EmailMessage = got["message"]
    assert got["from"] == "bianbian@hebei.example" and got["to"] == [ADDRESS]
    assert (
        message["Subject"] == "【编制变动】核定编制 — 石家庄市长安区财政局（" + str(org_id) + "）"
    )
    assert message["To"] == ADDRESS
    assert message["X-Bianzhi-Event-Id"] == approved.id
    assert message["X-Bianzhi-Event-Type"] == "bianzhi.quota.QuotaApproved.v1"
    assert message["X-Bianzhi-Subscription-Id"] == str(sid)
    assert message["Message-ID"] == f"<{approved.id}.{sid}@bianzhi.notify>"
    text = body_of(message)
    for expected in (
        "石家庄市人力资源和社会保障局：",
        "编制管理系统变动通知：核定编制。",
        f"单位：石家庄市长安区财政局（{org_id}）",
        "编制类别：行政编制",
        "核定数：12",
        "原核定数：10",
        "依据文件：《关于设立机构的批复》冀编〔2026〕1号（2026-01-05）",
        "生效日期：2026-01-05",
        f"事件编号：{approved.id}",
    ):
        assert expected in text, (expected, text)
    (row,) = await delivery_rows(rt, sid)
    assert (row.status, row.attempts, row.last_status_code) == ("delivered", 1, 250)
    (done,) = await outbox(rt, message_type="bianzhi.notify.NotificationDelivered.v1")
    assert json.loads(done.value)["data"]["channel"] == "email"


async def test_an_alert_email_names_the_region_through_starttls_with_a_login(
    services: list[ServiceRuntime],
    smtp_starttls: Smtp,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    service_logs: pytest.CaptureFixture[str],
) -> None:
    rt = await mail_service(db_url, tmp_path, monkeypatch, **smtp_starttls.settings)
    services.append(rt)
    capture_service_logs(service_logs)
    feeds = feeds_of(rt)
    sid = await subscribed(rt, **(email_subscription() | {"event_types": ["bianzhi.alerts.*"]}))
    org_id = uuid.uuid4()
    await feed(feeds, ORGS_EVENTS, org_registered("130102", org_id))
    over = await feed(
        feeds,
        QUOTA_EVENTS,
        OverQuotaDetected(org_id=org_id, category=Category.ADMIN, approved=10, occupied=12),
    )
    await drive(rt)

    (got,) = smtp_starttls.mailbox.received
    assert got["tls"] and smtp_starttls.mailbox.logins == [(SMTP_USER, SMTP_PASSWORD)]
    message: EmailMessage = got["message"]
    assert message["Subject"].startswith("【编制预警】超编 — 石家庄市长安区财政局")
    assert message["X-Bianzhi-Event-Id"] == over.id
    text = body_of(message)
    assert "编制管理系统预警：超编。" in text
    assert "核定数：10" in text and "实有人数：12" in text
    assert "依据文件：未载明" in text
    (row,) = await delivery_rows(rt, sid)
    assert row.status == "delivered"
    logged = service_logs.readouterr().err
    assert '"channel": "email"' in logged and SMTP_PASSWORD not in logged


async def test_a_refused_recipient_fails_at_once_and_is_dead_lettered(
    services: list[ServiceRuntime],
    smtp_plain: Smtp,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    smtp_plain.mailbox.refuse.add(ADDRESS)
    rt = await mail_service(db_url, tmp_path, monkeypatch, **smtp_plain.settings)
    services.append(rt)
    sid = await subscribed(rt, **email_subscription())
    env = await feed(
        feeds_of(rt),
        QUOTA_EVENTS,
        OverQuotaDetected(org_id=uuid.uuid4(), category=Category.ADMIN, approved=1, occupied=2),
    )
    await drive(rt)
    (row,) = await delivery_rows(rt, sid)
    assert (row.status, row.attempts, row.last_status_code) == ("failed", 1, 550)
    assert "mailbox unavailable" in row.last_error
    (dead,) = await outbox(rt, topic=dlq(QUOTA_EVENTS))
    assert dead.value == env.to_bytes() and dead.headers["x-dlq-channel"] == "email"
    assert dead.headers["x-dlq-status-code"] == "550"
    assert smtp_plain.mailbox.received == []


async def test_an_unreachable_mail_server_is_retried_then_fails(
    services: list[ServiceRuntime],
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = await mail_service(
        db_url, tmp_path, monkeypatch, smtp_host="127.0.0.1", smtp_port=free_port()
    )
    services.append(rt)
    sid = await subscribed(rt, **email_subscription())
    await feed(
        feeds_of(rt),
        QUOTA_EVENTS,
        OverQuotaDetected(org_id=uuid.uuid4(), category=Category.ADMIN, approved=1, occupied=2),
    )
    await drive(rt, 10)
    (row,) = await delivery_rows(rt, sid)
    assert (row.status, row.attempts) == ("failed", 2)  # max_attempts
    assert "ConnectionRefusedError" in row.last_error
    assert len(await outbox(rt, message_type="bianzhi.notify.NotificationFailed.v1")) == 1
