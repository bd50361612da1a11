"""The event consumer: other services' events applied to a local projection, once per id.

Unknown event types are acknowledged and ignored; an unreadable record goes to the dead-letter
topic.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import structlog
from pydantic import ValidationError

from contracts.base import Event
from contracts.envelope import Envelope
from services.runtime import metrics
from services.runtime.messaging import BatchPreparer, Consumer, EventRoute, RawMessage
from services.runtime.uow import UnitOfWork

log = structlog.get_logger("bianzhi.events")

# An event to apply: its record, envelope, route and data.
_Wanted = tuple[RawMessage, Envelope, EventRoute, Event]


class EventConsumer(Consumer):
    """Consumes other services' event topics into a local projection, once per message id."""

    def __init__(
        self,
        *,
        routes: dict[str, EventRoute],
        prepare: BatchPreparer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.routes = routes
        self.prepare = prepare

    async def process_batch(self, raws: Sequence[RawMessage]) -> None:
        """Apply one fetch in one transaction (one inbox statement, one commit); events that
        cannot be read are dead-lettered, those of no interest acknowledged. When the batch
        cannot be applied as one (a handler fails for good), each event is applied alone, so a
        single bad event is retried and dead-lettered by itself."""
        await self.handle_items(await self.read_fetch(raws))

    async def read_fetch(self, raws: Sequence[RawMessage]) -> list[_Wanted]:
        """A fetch's events to apply; those that cannot be read are dead-lettered here, once,
        and those of no interest counted. The rest are applied by ``handle_items``, or by
        ``handle_in`` in a transaction the caller opens."""
        wanted: list[_Wanted] = []
        for raw in raws:
            item = await self._read(raw)
            if item is not None:
                wanted.append(item)
        return wanted

    async def handle_items(self, wanted: list[_Wanted]) -> None:
        """Apply what ``read_fetch`` returned, in a transaction of their own."""
        started = time.perf_counter()
        if len(wanted) < 2:
            for raw, env, route, event in wanted:
                await self._apply_one(raw, env, route, event)
            return
        try:
            outcomes = await self.with_retry(lambda: self.in_transaction(wanted))
        except Exception:
            log.exception("event batch could not be applied as one; applying one by one")
            for raw, env, route, event in wanted:
                await self._apply_one(raw, env, route, event)
            return
        self.handled(wanted, outcomes, time.perf_counter() - started)

    def handled(self, wanted: list[_Wanted], outcomes: list[str], elapsed: float) -> None:
        """Count what a committed transaction did with ``wanted``."""
        for (_, env, _, _), outcome in zip(wanted, outcomes, strict=True):
            metrics.MESSAGES_HANDLED.labels(self.service, env.type, outcome).inc()
            metrics.HANDLER_LATENCY.labels(self.service, env.type).observe(elapsed)

    async def _read(self, raw: RawMessage) -> _Wanted | None:
        """The envelope, route and event of a record to apply; ``None`` (after dead-lettering
        or ignoring it) for one that is unreadable or of no interest here."""
        try:
            env = Envelope.from_bytes(raw.value or b"")
        except (ValidationError, ValueError) as exc:
            await self.send_to_dlq(raw, f"not a CloudEvents envelope: {exc}")
            metrics.MESSAGES_HANDLED.labels(self.service, "unknown", "dead_lettered").inc()
            return None
        route = self.routes.get(env.type)
        if route is None:
            metrics.MESSAGES_HANDLED.labels(self.service, env.type, "ignored").inc()
            return None
        try:
            event = route.model.model_validate(env.data)
        except ValidationError as exc:
            structlog.contextvars.bind_contextvars(message_id=env.id, type=env.type)
            try:
                await self.send_to_dlq(raw, f"event data invalid: {exc}")
            finally:
                structlog.contextvars.unbind_contextvars("message_id", "type")
            metrics.MESSAGES_HANDLED.labels(self.service, env.type, "dead_lettered").inc()
            return None
        if route.accept is not None and not route.accept(event):
            metrics.MESSAGES_HANDLED.labels(self.service, env.type, "ignored").inc()
            return None
        return raw, env, route, event

    async def handle_in(self, uow: UnitOfWork, items: list[_Wanted]) -> list[str]:
        """Apply ``items`` in ``uow``'s transaction, which the caller commits."""
        outcomes: list[str] = []
        fresh = await uow.claim_many(self.consumer, [env for _, env, _, _ in items])
        if self.prepare is not None:
            # The fetch's new events, once each, for statements that serve them all; the
            # handlers then run one by one as ever and find their rows prepared.
            seen: set[str] = set()
            new: list[tuple[Envelope, Event]] = []
            for _, env, _, event in items:
                if env.id in fresh and env.id not in seen:
                    seen.add(env.id)
                    new.append((env, event))
            await self.prepare(uow, new)
        done: set[str] = set()
        for _, env, route, event in items:
            if env.id not in fresh or env.id in done:
                outcomes.append("duplicate")
                continue
            done.add(env.id)
            structlog.contextvars.bind_contextvars(
                correlation_id=env.effective_correlation_id, message_id=env.id, type=env.type
            )
            try:
                await route.handler(event, uow, env)
            finally:
                structlog.contextvars.unbind_contextvars("correlation_id", "message_id", "type")
            outcomes.append("applied")
        return outcomes

    async def _apply_one(
        self, raw: RawMessage, env: Envelope, route: EventRoute, event: Event
    ) -> None:
        started = time.perf_counter()
        structlog.contextvars.bind_contextvars(
            correlation_id=env.effective_correlation_id, message_id=env.id, type=env.type
        )
        try:
            outcome = await self.with_retry(lambda: self._apply(env, route, event))
        except Exception as exc:
            log.exception("event could not be applied")
            await self.send_to_dlq(raw, f"{type(exc).__name__}: {exc}")
            outcome = "dead_lettered"
        finally:
            structlog.contextvars.unbind_contextvars("correlation_id", "message_id", "type")
        metrics.MESSAGES_HANDLED.labels(self.service, env.type, outcome).inc()
        metrics.HANDLER_LATENCY.labels(self.service, env.type).observe(
            time.perf_counter() - started
        )

    async def process(self, raw: RawMessage) -> None:
        started = time.perf_counter()
        type_ = "unknown"
        try:
            try:
                env = Envelope.from_bytes(raw.value or b"")
            except (ValidationError, ValueError) as exc:
                await self.send_to_dlq(raw, f"not a CloudEvents envelope: {exc}")
                outcome = "dead_lettered"
            else:
                type_ = env.type
                structlog.contextvars.bind_contextvars(
                    correlation_id=env.effective_correlation_id, message_id=env.id, type=env.type
                )
                route = self.routes.get(env.type)
                if route is None:
                    outcome = "ignored"
                else:
                    try:
                        event = route.model.model_validate(env.data)
                    except ValidationError as exc:
                        await self.send_to_dlq(raw, f"event data invalid: {exc}")
                        outcome = "dead_lettered"
                    else:
                        if route.accept is not None and not route.accept(event):
                            outcome = "ignored"
                        else:
                            outcome = await self.with_retry(lambda: self._apply(env, route, event))
        except Exception as exc:
            log.exception("event could not be applied")
            await self.send_to_dlq(raw, f"{type(exc).__name__}: {exc}")
            outcome = "dead_lettered"
        finally:
            structlog.contextvars.unbind_contextvars("correlation_id", "message_id", "type")
        metrics.MESSAGES_HANDLED.labels(self.service, type_, outcome).inc()
        metrics.HANDLER_LATENCY.labels(self.service, type_).observe(time.perf_counter() - started)

    async def _apply(self, env: Envelope, route: EventRoute, event: Event) -> str:
        async with self.uow_factory() as uow:
            if not await uow.claim(self.consumer, env):
                return "duplicate"
            await route.handler(event, uow, env)
            await uow.commit()
        return "applied"
