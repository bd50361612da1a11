"""The delivery worker: takes due deliveries (webhook or e-mail) and sends them, many at once.

Each attempt is three steps: claim (a short transaction that leases the row), the request
(outside any transaction), and settle (a short transaction that records the outcome, logs the
attempt and stages ``NotificationDelivered`` / ``NotificationFailed`` — and, for a failure, a
dead-letter record — in the outbox). A crash between claim and settle leaves the row leased;
it is tried again when the lease runs out: at-least-once, with the event id as the receiver's
idempotency key (``webhook-id``, ``X-Bianzhi-Event-Id``).

Attempts run concurrently up to ``concurrency``, at most ``per_subscription_concurrency`` of
them to one subscription, each bounded by its timeout: a slow or dead receiver holds only its
own share and never delays the others.

The worker runs as a background job of the service (``serve``): started once the service is
up, and stopped — attempts in flight allowed to finish and settle — before the consumers drain
and the relay publishes what was settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog

from contracts.envelope import CONTENT_TYPE, now
from contracts.notify import NotificationDelivered, NotificationFailed
from contracts.topics import NOTIFY_EVENTS, dlq
from services.notify.adapters.repository import AttemptRecord, Claimed
from services.notify.adapters.webhook import Attempt
from services.notify.domain import mail
from services.notify.domain.model import DeliveryStatus, Outcome, backoff_s
from services.notify.service_layer.unit_of_work import NotifyUnitOfWork
from services.notify.settings import NotifySettings
from services.runtime import metrics

log = structlog.get_logger("bianzhi.notify.delivery")

DLQ_CONSUMER = "notify.delivery"
_ORG_FIELDS = ("org_id", "from_org_id", "to_org_id", "target_org_id")


class WebhookChannel(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def post(self, *, url: str, secret: str, event_id: str, body: bytes) -> Attempt: ...


class MailChannel(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def send(self, message: Any) -> Attempt: ...


@dataclass(frozen=True)
class Settlement:
    """The outcome of one attempt, waiting to be recorded."""

    row: Claimed
    result: Attempt
    started_at: datetime
    duration_ms: int


_STATUS = {
    Outcome.DELIVERED: DeliveryStatus.DELIVERED,
    Outcome.RETRY: DeliveryStatus.PENDING,
    Outcome.FAILED: DeliveryStatus.FAILED,
}


def _org_ids(data: dict[str, Any]) -> list[str]:
    ids = [str(data[f]) for f in _ORG_FIELDS if data.get(f)]
    ids += [str(v) for v in data.get("source_org_ids") or () if v]
    return ids


class DeliveryWorker:
    def __init__(
        self,
        *,
        uow_factory: Callable[[], NotifyUnitOfWork],
        sender: WebhookChannel,
        mailer: MailChannel,
        settings: NotifySettings,
        source: str,
        service: str = "notify",
    ) -> None:
        self.uow_factory = uow_factory
        self.sender = sender
        self.mailer = mailer
        self.settings = settings
        self.source = source
        self.service = service
        self._inflight: dict[asyncio.Task[None], str] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._to_settle: list[tuple[Settlement, asyncio.Future[None]]] = []
        self._settling = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        self._wake.set()

    async def serve(self) -> None:
        """Run until cancelled; then stop claiming and let the attempts in flight settle."""
        await self.start()
        try:
            assert self._task is not None
            await self._task
        finally:
            await self.stop()

    async def start(self) -> None:
        if self.running:
            return
        self._stopping = False
        async with self.uow_factory() as uow:
            sealed = await uow.subscriptions.seal_plaintext_secrets()
            await uow.commit()
        if sealed:
            log.info("sealed subscription secrets stored in plaintext", count=sealed)
        await self.sender.start()
        await self.mailer.start()
        self._task = asyncio.create_task(self._run(), name="notify-delivery-worker")

    async def stop(self) -> None:
        """Stop claiming; let attempts in flight finish (each is bounded by its timeout)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await self.sender.close()
        await self.mailer.close()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                claimed = await self.claim()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not claim deliveries; trying again")
                claimed = 0
            if claimed:
                continue
            self._wake.clear()
            waiters: set[asyncio.Future[object]] = {
                asyncio.ensure_future(self._wake.wait()),
                *self._inflight,
            }
            await asyncio.wait(
                waiters,
                timeout=self.settings.poll_interval_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for w in waiters:
                if w not in self._inflight and not w.done():
                    w.cancel()

    def _lease(self) -> timedelta:
        longest = max(self.settings.webhook_timeout_s, self.settings.smtp_timeout_s)
        return timedelta(seconds=longest * 2 + 30)

    async def claim(self) -> int:
        """Start attempts for as many due deliveries as there is room for; how many started."""
        free = self.settings.concurrency - len(self._inflight)
        if free <= 0 or (self._inflight and free < max(1, self.settings.concurrency // 4)):
            return 0  # claim in batches: a transaction per freed slot would cost more
        per_sub = Counter(self._inflight.values())
        full = [s for s, n in per_sub.items() if n >= self.settings.per_subscription_concurrency]
        async with self.uow_factory() as uow:
            rows = await uow.deliveries.claim_due(
                limit=free, lease_until=now() + self._lease(), skip=full
            )
            rows = await self._with_org_names(uow, rows)
            await uow.commit()
        started = 0
        for row in rows:
            if per_sub[row.subscription_id] >= self.settings.per_subscription_concurrency:
                await self._release(row)
                continue
            per_sub[row.subscription_id] += 1
            task = asyncio.create_task(self._attempt(row))
            self._inflight[task] = row.subscription_id
            task.add_done_callback(self._done)
            started += 1
        return started

    async def _with_org_names(self, uow: NotifyUnitOfWork, rows: list[Claimed]) -> list[Claimed]:
        """E-mails name orgs by name: add what the org projection knows of them."""
        wanted: dict[str, list[str]] = {}
        for row in rows:
            if row.channel_kind == "email":
                with contextlib.suppress(ValueError, AttributeError):
                    wanted[row.delivery_id] = _org_ids(json.loads(row.body).get("data") or {})
        if not wanted:
            return rows
        names = await uow.orgs.names(i for ids in wanted.values() for i in ids)
        return [
            dataclasses.replace(
                row, org_names={i: names[i] for i in wanted[row.delivery_id] if i in names}
            )
            if row.delivery_id in wanted
            else row
            for row in rows
        ]

    async def deliver_due(self) -> int:
        """One round without the background loop: start what is due and wait for it."""
        started = await self.claim()
        await asyncio.gather(*list(self._inflight), return_exceptions=True)
        return started

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        self._wake.set()

    async def _release(self, row: Claimed) -> None:
        """Give back a claimed row this worker has no room for (its lease is cut to now)."""
        async with self.uow_factory() as uow:
            await uow.deliveries.reschedule(row.delivery_id, now())
            await uow.commit()

    async def _send(self, row: Claimed) -> Attempt:
        if row.channel_kind == "webhook":
            if row.secret_error is not None:
                # A key that was lost or swapped can come back (a remounted Secret): retried
                # like an unreachable receiver, then failed after the last attempt.
                return Attempt(Outcome.RETRY, None, row.secret_error)
            if not row.url or row.secret is None:
                return Attempt(
                    Outcome.FAILED, None, "the subscription has no webhook url or secret"
                )
            return await self.sender.post(
                url=row.url, secret=row.secret, event_id=row.event_id, body=row.body
            )
        if row.channel_kind == "email":
            if not row.address:
                return Attempt(Outcome.FAILED, None, "the subscription has no e-mail address")
            envelope = json.loads(row.body)
            message = mail.compose(
                envelope,
                subscription_id=row.subscription_id,
                subscriber=row.subscriber,
                to=row.address,
                sender=self.settings.mail_from,
                org_names=row.org_names,
                division_code=None,
                sent_at=now(),
            )
            return await self.mailer.send(message)
        return Attempt(Outcome.FAILED, None, f"unknown channel kind {row.channel_kind!r}")

    async def _attempt(self, row: Claimed) -> None:
        started_at = now()
        clock = time.perf_counter()
        try:
            result = await self._send(row)
        except Exception as exc:  # a message that cannot even be put together
            log.exception("delivery attempt raised", delivery_id=row.delivery_id)
            result = Attempt(Outcome.RETRY, None, f"{type(exc).__name__}: {exc}"[:1000])
        duration_ms = round((time.perf_counter() - clock) * 1000)
        try:
            await self._settle_soon(Settlement(row, result, started_at, duration_ms))
        except Exception:
            log.exception(
                "delivery attempt could not be recorded; it is retried when its lease runs out",
                delivery_id=row.delivery_id,
            )

    async def _settle_soon(self, item: Settlement) -> None:
        """Settle ``item`` together with the attempts that finish meanwhile: one transaction
        for many outcomes, so the database's commit rate does not bound the delivery rate."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._to_settle.append((item, done))
        if not self._settling:
            self._settling = True
            try:
                while self._to_settle:
                    batch, self._to_settle = self._to_settle, []
                    await self._settle_batch(batch)
            finally:
                self._settling = False
        await done

    async def _settle_batch(self, batch: list[tuple[Settlement, asyncio.Future[None]]]) -> None:
        """Settle a batch in one transaction; should that fail, each on its own, so that one
        outcome that cannot be recorded does not hold up the others."""
        try:
            await self.settle_many([item for item, _ in batch])
            outcomes: list[BaseException | None] = [None] * len(batch)
        except Exception as exc:
            if len(batch) == 1:
                outcomes = [exc]
            else:
                outcomes = []
                for item, _ in batch:
                    try:
                        await self.settle_many([item])
                        outcomes.append(None)
                    except Exception as single:
                        outcomes.append(single)
        for (_, done), failure in zip(batch, outcomes, strict=True):
            if done.done():
                continue
            if failure is None:
                done.set_result(None)
            else:
                done.set_exception(failure)

    async def settle(
        self,
        row: Claimed,
        result: Attempt,
        *,
        started_at: datetime | None = None,
        duration_ms: int = 0,
    ) -> None:
        """Record the outcome of one attempt at ``row``."""
        await self.settle_many([Settlement(row, result, started_at or now(), duration_ms)])

    def _decide(self, item: Settlement) -> tuple[Outcome, float | None]:
        attempts = item.row.attempts + 1
        outcome = item.result.outcome
        if outcome is Outcome.RETRY and attempts >= self.settings.max_attempts:
            outcome = Outcome.FAILED
        if outcome is not Outcome.RETRY:
            return outcome, None
        s = self.settings
        return outcome, backoff_s(attempts, s.backoff_initial_s, s.backoff_max_s)

    async def settle_many(self, items: list[Settlement]) -> None:
        """Record the outcomes of attempts in one transaction: each delivery's new state, its
        attempt in the log, and what is announced (and, for a failure, dead-lettered)."""
        decided = [(item, *self._decide(item)) for item in items]
        changes: list[bool] = []
        async with self.uow_factory() as uow:
            for item, outcome, delay in decided:
                row, result = item.row, item.result
                attempts = row.attempts + 1
                changed = await uow.deliveries.settle(
                    row.delivery_id,
                    attempts=attempts,
                    status=_STATUS[outcome],
                    status_code=result.status_code,
                    error=result.error,
                    next_attempt_at=None if delay is None else now() + timedelta(seconds=delay),
                )
                changes.append(changed)
                if changed and outcome is Outcome.DELIVERED:
                    self._announce(
                        uow,
                        row,
                        NotificationDelivered(
                            subscription_id=row.subscription_id,  # type: ignore[arg-type]
                            event_id=row.event_id,
                            event_type=row.event_type,
                            attempts=attempts,
                            delivery_id=row.delivery_id,  # type: ignore[arg-type]
                            channel=row.channel_kind,
                        ),
                    )
                elif changed and outcome is Outcome.FAILED:
                    error = result.error or "failed"
                    self._announce(
                        uow,
                        row,
                        NotificationFailed(
                            subscription_id=row.subscription_id,  # type: ignore[arg-type]
                            event_id=row.event_id,
                            event_type=row.event_type,
                            attempts=attempts,
                            error=error,
                            delivery_id=row.delivery_id,  # type: ignore[arg-type]
                            channel=row.channel_kind,
                            status_code=result.status_code,
                        ),
                    )
                    self._dead_letter(uow, row, attempts=attempts, result=result, error=error)
            await uow.deliveries.record_attempts(
                [
                    AttemptRecord(
                        row=item.row,
                        attempt=item.row.attempts + 1,
                        outcome=outcome.value,
                        status_code=item.result.status_code,
                        error=item.result.error,
                        duration_ms=item.duration_ms,
                        started_at=item.started_at,
                    )
                    for item, outcome, _ in decided
                ]
            )
            await uow.commit()
        for (item, outcome, delay), changed in zip(decided, changes, strict=True):
            self._log(item, outcome, delay, changed)

    def _log(self, item: Settlement, outcome: Outcome, delay: float | None, changed: bool) -> None:
        row, result = item.row, item.result
        if changed and outcome is Outcome.FAILED:
            metrics.DEAD_LETTERED.labels(self.service, row.topic).inc()
        (log.warning if outcome is Outcome.FAILED else log.info)(
            "delivery attempt",
            delivery_id=row.delivery_id,
            subscription_id=row.subscription_id,
            event_id=row.event_id,
            event_type=row.event_type,
            channel=row.channel_kind,
            attempt=row.attempts + 1,
            resend=row.resends,
            outcome=outcome.value,
            status_code=result.status_code,
            duration_ms=item.duration_ms,
            error=result.error,
            retry_in_s=None if delay is None else round(delay, 3),
            recorded=changed,
        )

    def _announce(
        self,
        uow: NotifyUnitOfWork,
        row: Claimed,
        event: NotificationDelivered | NotificationFailed,
    ) -> None:
        env = event.envelope(
            source=self.source, correlationid=row.correlation_id, causationid=row.event_id
        )
        uow.stage(env, NOTIFY_EVENTS, env.subject)

    def _dead_letter(
        self, uow: NotifyUnitOfWork, row: Claimed, *, attempts: int, result: Attempt, error: str
    ) -> None:
        """The original CloudEvent to ``<its topic>.dlq`` (written by its consumer, notify),
        keyed as it was, with what went wrong in the headers."""
        key: str | None = None
        with contextlib.suppress(ValueError, AttributeError):
            subject = json.loads(row.body).get("subject")
            key = str(subject) if subject else None
        headers = {
            "content-type": CONTENT_TYPE,
            "x-dlq-error": error[:4000],
            "x-dlq-topic": row.topic,
            "x-dlq-consumer": DLQ_CONSUMER,
            "x-dlq-at": now().isoformat(),
            "x-dlq-event-id": row.event_id,
            "x-dlq-event-type": row.event_type,
            "x-dlq-delivery-id": row.delivery_id,
            "x-dlq-subscription-id": row.subscription_id,
            "x-dlq-channel": row.channel_kind,
            "x-dlq-attempts": str(attempts),
            "x-dlq-resends": str(row.resends),
        }
        if result.status_code is not None:
            headers["x-dlq-status-code"] = str(result.status_code)
        uow.stage_record(
            topic=dlq(row.topic),
            key=key or row.event_id,
            value=row.body,
            headers=headers,
            message_type=row.event_type,
            correlation_id=row.correlation_id,
        )
