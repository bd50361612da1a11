"""Benchmark: does every acknowledged record reach a reader, on the embedded broker?

Several producers write small bursts of keyed records to one 12-partition topic (as the services'
relays write results to the shared results topic), group consumers long-poll the same topic, and
two readers follow it from the end: a plain aiokafka reader, and one that hands its records
through the services' ``OffsetGapGuard``. At the end the topic is read again from the start. It
prints the records acknowledged, the ones each reader never got, the holes the plain reader saw
(a record handed to it before an earlier one of its partition), and whether the broker holds the
missing records after all.

Usage: python bench/broker_order.py [--seconds 60] [--producers 3] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.runtime import metrics
from services.runtime.embedded_broker import EmbeddedBroker, ensure_topics
from services.runtime.gaps import OffsetGapGuard

PARTITIONS = 12
TOPIC = "bench.order"


def say(text: str) -> None:
    print(text, flush=True)


class Reader:
    def __init__(self, bootstrap: str, guarded: bool) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10
        )
        self.guard = OffsetGapGuard() if guarded else None
        self.seen: set[bytes] = set()
        self.holes: list[tuple[int, int, int]] = []  # partition, expected, got
        self._next: dict[int, int] = {}

    async def start(self) -> None:
        await self.consumer.start()
        tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await self.consumer.getmany(timeout_ms=50)
            if self.guard is not None:
                records: list[Any] = self.guard.take(self.consumer, batches)
            else:
                records = [r for recs in batches.values() for r in recs]
            for r in records:
                expected = self._next.get(r.partition)
                if expected is not None and r.offset != expected:
                    self.holes.append((r.partition, expected, r.offset))
                self._next[r.partition] = r.offset + 1
                self.seen.add(r.value[:32])


async def produce(
    producer: AIOKafkaProducer, seconds: float, acked: dict[bytes, tuple[int, int]]
) -> None:
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        sent = []
        for _ in range(random.randint(1, 4)):
            tag = uuid.uuid4().hex.encode()
            key = uuid.uuid4().hex.encode()
            sent.append((tag, await producer.send(TOPIC, tag + b"x" * 1500, key=key)))
        for tag, fut in sent:
            meta = await fut
            acked[tag] = (meta.partition, meta.offset)
        await asyncio.sleep(random.expovariate(100))


async def held(bootstrap: str, wanted: set[bytes]) -> dict[bytes, tuple[int, int]]:
    """Where the broker holds ``wanted``, read from the start of every partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    found: dict[bytes, tuple[int, int]] = {}
    try:
        tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
            [await consumer.position(tp) < ends[tp] for tp in tps]
        ):
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for r in records:
                    if r.value[:32] in wanted:
                        found[r.value[:32]] = (tp.partition, r.offset)
    finally:
        await consumer.stop()
    return found


async def one_run(seconds: float, producers: int, pollers: int) -> tuple[int, int, int]:
    broker = EmbeddedBroker()
    await broker.start()
    try:
        await ensure_topics(broker.bootstrap, [TOPIC], partitions=PARTITIONS)
        plain, guarded = Reader(broker.bootstrap, False), Reader(broker.bootstrap, True)
        for reader in (plain, guarded):
            await reader.start()
        stop = asyncio.Event()
        tasks = [asyncio.create_task(r.run(stop)) for r in (plain, guarded)]
        others = []
        for i in range(pollers):
            other = AIOKafkaConsumer(
                TOPIC,
                bootstrap_servers=broker.bootstrap,
                group_id=f"poller-{i}",
                fetch_max_wait_ms=50,
                enable_auto_commit=False,
            )
            await other.start()
            others.append(other)

        async def poll(consumer: AIOKafkaConsumer) -> None:
            while not stop.is_set():
                if await consumer.getmany(timeout_ms=100):
                    await consumer.commit()

        tasks += [asyncio.create_task(poll(o)) for o in others]
        clients = [
            AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0, acks="all")
            for _ in range(producers)
        ]
        for client in clients:
            await client.start()
        acked: dict[bytes, tuple[int, int]] = {}
        await asyncio.gather(*(produce(c, seconds, acked) for c in clients))
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*tasks)
        for client in clients:
            await client.stop()
        for other in others:
            await other.stop()
        lost_plain = set(acked) - plain.seen
        lost_guarded = set(acked) - guarded.seen
        holder = await held(broker.bootstrap, lost_plain | lost_guarded)
        say(
            f"  {len(acked):,} records acknowledged; the plain reader never got {len(lost_plain)}"
            f" (holes it was handed: {plain.holes[:5]}), the guarded reader "
            f"{len(lost_guarded)}; of those the broker holds "
            f"{sorted(holder.values())[:5] or 'none'}"
        )
        for reader in (plain, guarded):
            await reader.consumer.stop()
        return len(acked), len(lost_plain), len(lost_guarded)
    finally:
        await broker.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--producers", type=int, default=3)
    parser.add_argument("--pollers", type=int, default=2, help="group consumers long-polling")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    totals = [0, 0, 0]
    for i in range(args.runs):
        say(f"run {i + 1}/{args.runs}: {args.producers} producers for {args.seconds:.0f} s")
        for j, value in enumerate(await one_run(args.seconds, args.producers, args.pollers)):
            totals[j] += value
    read_again = metrics.FETCH_HOLES.labels("read_again")._value.get()
    passed = metrics.FETCH_HOLES.labels("passed")._value.get()
    say(
        f"RESULT acknowledged={totals[0]} lost_plain={totals[1]} lost_guarded={totals[2]} "
        f"guard_read_again={read_again:.0f} guard_passed={passed:.0f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
