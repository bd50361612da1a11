"""The delivery worker: takes due webhook deliveries and sends them, many at once.

Each attempt is three steps: claim (a short transaction that leases the row), the HTTP request
(outside any transaction), and settle (a short transaction that records the outcome and stages
``NotificationDelivered`` / ``NotificationFailed`` in the outbox). A crash between claim and
settle leaves the row leased; it is tried again when the lease runs out — at-least-once, with
the event id (``webhook-id``) as the receiver's idempotency key.

Requests run concurrently up to ``concurrency``, at most ``per_subscription_concurrency`` of
them to one subscription, each bounded by the request timeout: a slow or dead receiver holds
only its own share and never delays the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import structlog

from contracts.envelope import now
from contracts.notify import NotificationDelivered, NotificationFailed
from contracts.topics import NOTIFY_EVENTS
from services.notify.adapters.repository import Claimed
from services.notify.adapters.webhook import Attempt, WebhookSender
from services.notify.domain.model import DeliveryStatus, Outcome, backoff_s
from services.notify.service_layer.unit_of_work import NotifyUnitOfWork
from services.notify.settings import NotifySettings

log = structlog.get_logger("bianzhi.notify.delivery")


class DeliveryWorker:
    def __init__(
        self,
        *,
        uow_factory: Callable[[], NotifyUnitOfWork],
        sender: WebhookSender,
        settings: NotifySettings,
        source: str,
    ) -> None:
        self.uow_factory = uow_factory
        self.sender = sender
        self.settings = settings
        self.source = source
        self._inflight: dict[asyncio.Task[None], str] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        if self.running:
            return
        self._stopping = False
        await self.sender.start()
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

    async def claim(self) -> int:
        """Start attempts for as many due deliveries as there is room for; how many started."""
        free = self.settings.concurrency - len(self._inflight)
        if free <= 0:
            return 0
        per_sub = Counter(self._inflight.values())
        full = [s for s, n in per_sub.items() if n >= self.settings.per_subscription_concurrency]
        lease = timedelta(seconds=self.settings.webhook_timeout_s * 2 + 30)
        async with self.uow_factory() as uow:
            rows = await uow.deliveries.claim_due(limit=free, lease_until=now() + lease, skip=full)
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

    async def _attempt(self, row: Claimed) -> None:
        try:
            result = await self.sender.post(
                url=row.url, secret=row.secret, event_id=row.event_id, body=row.body
            )
            await self.settle(row, result)
        except Exception:
            log.exception(
                "delivery attempt could not be recorded; it is retried when its lease runs out",
                delivery_id=row.delivery_id,
            )

    async def settle(self, row: Claimed, result: Attempt) -> None:
        attempts = row.attempts + 1
        outcome = result.outcome
        if outcome is Outcome.RETRY and attempts >= self.settings.max_attempts:
            outcome = Outcome.FAILED
        async with self.uow_factory() as uow:
            if outcome is Outcome.DELIVERED:
                changed = await uow.deliveries.settle(
                    row.delivery_id,
                    attempts=attempts,
                    status=DeliveryStatus.DELIVERED,
                    status_code=result.status_code,
                    error=None,
                    next_attempt_at=None,
                )
                event: NotificationDelivered | NotificationFailed = NotificationDelivered(
                    subscription_id=row.subscription_id,  # type: ignore[arg-type]
                    event_id=row.event_id,
                    event_type=row.event_type,
                    attempts=attempts,
                )
            elif outcome is Outcome.RETRY:
                delay = backoff_s(
                    attempts, self.settings.backoff_initial_s, self.settings.backoff_max_s
                )
                changed = await uow.deliveries.settle(
                    row.delivery_id,
                    attempts=attempts,
                    status=DeliveryStatus.PENDING,
                    status_code=result.status_code,
                    error=result.error,
                    next_attempt_at=now() + timedelta(seconds=delay),
                )
                log.info(
                    "webhook delivery will be retried",
                    subscription_id=row.subscription_id,
                    event_id=row.event_id,
                    attempts=attempts,
                    retry_in_s=round(delay, 3),
                    error=result.error,
                )
                await uow.commit()
                return
            else:
                changed = await uow.deliveries.settle(
                    row.delivery_id,
                    attempts=attempts,
                    status=DeliveryStatus.FAILED,
                    status_code=result.status_code,
                    error=result.error,
                    next_attempt_at=None,
                )
                event = NotificationFailed(
                    subscription_id=row.subscription_id,  # type: ignore[arg-type]
                    event_id=row.event_id,
                    event_type=row.event_type,
                    attempts=attempts,
                    error=result.error or "failed",
                )
                log.warning(
                    "webhook delivery failed",
                    subscription_id=row.subscription_id,
                    event_id=row.event_id,
                    attempts=attempts,
                    error=result.error,
                )
            if changed:
                env = event.envelope(
                    source=self.source,
                    correlationid=row.correlation_id,
                    causationid=row.event_id,
                )
                uow.stage(env, NOTIFY_EVENTS, env.subject)
            await uow.commit()
