"""A command client for tests: publishes envelopes and waits for their results."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from contracts.base import Message
from contracts.envelope import CONTENT_TYPE, Envelope, new_id
from contracts.topics import COMMAND_RESULTS

ACTOR = {"actorid": "zhang.wei", "actorregion": "130000", "actorroles": "approver"}


class CommandClient:
    """What a front-end does: send commands, read results keyed by command id."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
        self.results = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10
        )
        self._seen: dict[str, list[Envelope]] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.producer.start()
        await self.results.start()
        parts = self.results.partitions_for_topic(COMMAND_RESULTS)
        while not parts:
            await asyncio.sleep(0.05)
            await self.results._client.force_metadata_update()
            parts = self.results.partitions_for_topic(COMMAND_RESULTS)
        tps = [TopicPartition(COMMAND_RESULTS, p) for p in parts]
        self.results.assign(tps)
        await self.results.seek_to_end(*tps)
        for tp in tps:  # resolve positions now, so nothing published after start is missed
            await self.results.position(tp)
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.results.stop()
        await self.producer.stop()

    async def _read(self) -> None:
        while True:
            batches = await self.results.getmany(timeout_ms=100)
            for records in batches.values():
                for rec in records:
                    env = Envelope.from_bytes(rec.value)
                    cid = env.data.get("command_id")
                    self._seen.setdefault(cid, []).append(env)
                    if cid in self._waiters:
                        self._waiters[cid].set()

    async def send_raw(
        self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None
    ) -> None:
        await self.producer.send_and_wait(topic, value, key=key, headers=headers)

    async def send_envelope(self, env: Envelope, topic: str) -> str:
        await self.send_raw(
            topic,
            env.to_bytes(),
            key=(env.subject or env.id).encode(),
            headers=[("content-type", CONTENT_TYPE.encode())],
        )
        return env.id

    def envelope(self, payload: Message, *, id: str | None = None, **actor: str) -> Envelope:
        fields = {**ACTOR, **actor}
        return payload.envelope(source="/tests", id=id or new_id(), **fields)

    async def send(self, payload: Message, *, id: str | None = None, **actor: str) -> str:
        env = self.envelope(payload, id=id, **actor)
        return await self.send_envelope(env, payload.TOPIC)

    async def result(self, command_id: str, timeout: float = 20.0) -> Envelope:
        """The first result of ``command_id``."""
        await self.wait_results(command_id, 1, timeout)
        return self._seen[command_id][0]

    async def wait_results(
        self, command_id: str, count: int, timeout: float = 20.0
    ) -> list[Envelope]:
        event = self._waiters.setdefault(command_id, asyncio.Event())
        async with asyncio.timeout(timeout):
            while len(self._seen.get(command_id, [])) < count:
                event.clear()
                await event.wait()
        return self._seen[command_id]

    def results_of(self, command_id: str) -> list[Envelope]:
        return list(self._seen.get(command_id, []))


async def read_topic(bootstrap: str, topic: str, *, timeout: float = 3.0) -> list[Any]:
    """Every record currently in ``topic`` (from the beginning)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Any] = []
        async with asyncio.timeout(timeout):
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                batches = await consumer.getmany(timeout_ms=100)
                for records in batches.values():
                    out.extend(records)
        return out
    finally:
        await consumer.stop()


def data_of(record: Any) -> dict[str, Any]:
    return json.loads(record.value)
