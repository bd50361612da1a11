"""Several services in one test process, wired by hand instead of by the broker.

Each service's outbox is read in order and every row is handed to the consumers that would
receive it from its topic: a command topic to the owning service's command consumer, an events
or results topic to every projection subscribed to it. ``pump`` repeats until nothing moves.
"""

from __future__ import annotations

import itertools
from typing import Any

from sqlalchemy import select

from contracts.base import Message
from contracts.envelope import CONTENT_TYPE, Envelope
from contracts.topics import COMMAND_RESULTS, commands
from services.runtime.app import ServiceRuntime
from services.runtime.events import EventConsumer
from services.runtime.messaging import RawMessage, event_routes
from services.runtime.relay import OutboxRecord
from services.runtime.sealing import opened

_offsets = itertools.count()


class NoDeadLetters:
    """Fails the test when anything would be dead-lettered."""

    async def __call__(
        self, topic: str, value: bytes, key: bytes | None, headers: dict[str, str]
    ) -> None:
        raise AssertionError(f"dead-lettered to {topic}: {headers.get('x-dlq-error')}")


def raw(topic: str, env: Envelope) -> RawMessage:
    return RawMessage(
        topic=topic,
        partition=0,
        offset=next(_offsets),
        key=(env.subject or env.id).encode(),
        value=env.to_bytes(),
        headers=(("content-type", CONTENT_TYPE.encode()),),
    )


class Wiring:
    def __init__(self, *runtimes: ServiceRuntime) -> None:
        self.runtimes = {rt.name: rt for rt in runtimes}
        self.subscribers: dict[str, list[EventConsumer]] = {}
        for rt in runtimes:
            rt.command_consumer.dead_letter = NoDeadLetters()
            for sub in rt.definition.event_subscriptions:
                self.subscribers.setdefault(sub.topic, []).append(
                    EventConsumer(
                        routes=event_routes(sub.routes),
                        prepare=sub.prepare,
                        service=rt.name,
                        consumer=f"{rt.name}<-{sub.topic}",
                        uow_factory=rt.uow,
                        dead_letter=NoDeadLetters(),
                    )
                )
        self.carried: dict[str, int] = {name: 0 for name in self.runtimes}

    async def send(self, service: str, payload: Message, **actor: Any) -> Envelope:
        """What a front-end does: one command on the service's topic; then everything flows."""
        env = payload.envelope(source="/tests", **actor)
        await self.runtimes[service].command_consumer.process(raw(commands(service), env))
        await self.pump()
        return env

    async def pump(self) -> int:
        moved = 0
        while True:
            step = 0
            for name, rt in self.runtimes.items():
                for row in await self._fresh(name, rt):
                    step += 1
                    await self._deliver(row.topic, Envelope.from_bytes(published(rt, row)))
            if not step:
                return moved
            moved += step

    async def _fresh(self, name: str, rt: ServiceRuntime) -> list[Any]:
        table = rt.definition.tables.outbox
        async with rt.sessions() as session:
            rows = (
                await session.execute(
                    select(table).where(table.c.seq > self.carried[name]).order_by(table.c.seq)
                )
            ).all()
        if rows:
            self.carried[name] = rows[-1].seq
        return list(rows)

    async def _deliver(self, topic: str, env: Envelope) -> None:
        for name, rt in self.runtimes.items():
            if topic == commands(name):
                await rt.command_consumer.process(raw(topic, env))
        for consumer in self.subscribers.get(topic, []):
            await consumer.process(raw(topic, env))

    async def outbox(self, service: str, topic: str) -> list[Envelope]:
        """The envelopes ``service`` wrote for ``topic``, as the relay publishes them."""
        rt = self.runtimes[service]
        table = rt.definition.tables.outbox
        async with rt.sessions() as session:
            rows = (
                await session.execute(
                    select(table).where(table.c.topic == topic).order_by(table.c.seq)
                )
            ).all()
        return [Envelope.from_bytes(published(rt, r)) for r in rows]

    async def result(self, service: str, command_id: str) -> Envelope:
        found = [
            e
            for e in await self.outbox(service, COMMAND_RESULTS)
            if e.data.get("command_id") == command_id
        ]
        assert len(found) == 1, found
        return found[0]


def published(rt: ServiceRuntime, row: Any) -> bytes:
    """The value of an outbox row as the relay publishes it (a sealed row opened)."""
    record = OutboxRecord(row.seq, row.topic, row.key, bytes(row.value), dict(row.headers))
    return opened(record, rt.definition.sealer).value
