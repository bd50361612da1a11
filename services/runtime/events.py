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
from services.runtime.messaging import Consumer, EventRoute, RawMessage

log = structlog.get_logger("bianzhi.events")


class EventConsumer(Consumer):
    """Consumes other services' event topics into a local projection, once per message id."""

    def __init__(self, *, routes: dict[str, EventRoute], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.routes = routes

    async def process_batch(self, raws: Sequence[RawMessage]) -> None:
        for raw in raws:
            await self.process(raw)

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
