"""Benchmark: which of the embedded broker's requests cost more as its partitions fill.

Runs tansu alone, with one topic (``--partitions``, 12) that fills with one-record batches
between measurements (``--fill`` batches a step, ``--steps`` steps). At each step it prints the
broker's CPU share of one core, over ``--records`` records sent at ``--rate`` per second, for:

- a follower: a consumer assigned every partition, reading the records as they come;
- a group member doing the same and committing each fetch that brought records;
- a follower idle at the end of the filled topic (nothing is sent);
- the same sending to a second, empty topic, with nobody reading (the produces alone).

docs/BROKER.md has its figures: the first two grow with the batches the partitions hold, the
last two do not. Quick run: ``--steps 3 --fill 3000``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from orgs_throughput import cpu_seconds

from services.runtime.embedded_broker import EmbeddedBroker, ensure_topics


async def send_paced(
    producer: AIOKafkaProducer, topic: str, partitions: int, n: int, rate: float
) -> None:
    started = time.perf_counter()
    for i in range(n):
        pause = started + i / rate - time.perf_counter()
        if pause > 0:
            await asyncio.sleep(pause)
        await producer.send(topic, b"x" * 600, partition=i % partitions)


async def broker_share(pid: int, work: asyncio.Future[None] | None, seconds: float) -> float:
    """The broker's CPU share while ``work`` runs (or for ``seconds`` with none)."""
    before, started = cpu_seconds(pid), time.perf_counter()
    if work is None:
        await asyncio.sleep(seconds)
    else:
        await work
    return (cpu_seconds(pid) - before) / (time.perf_counter() - started)


async def reading(
    broker: EmbeddedBroker,
    producer: AIOKafkaProducer,
    topic: str,
    args: argparse.Namespace,
    *,
    group: bool,
) -> float:
    """The broker's share while ``args.records`` are sent at ``args.rate`` and read at once."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap,
        group_id=f"growth-{uuid.uuid4().hex[:6]}" if group else None,
        enable_auto_commit=False,
        fetch_max_wait_ms=10,
        auto_offset_reset="latest",
        session_timeout_ms=3000,
        heartbeat_interval_ms=1000,
    )
    await consumer.start()
    try:
        if group:
            assigned = asyncio.Event()

            class Joined(ConsumerRebalanceListener):
                async def on_partitions_revoked(self, revoked: object) -> None:
                    return None

                async def on_partitions_assigned(self, assigned_tps: object) -> None:
                    assigned.set()

            consumer.subscribe([topic], listener=Joined())
            await asyncio.wait_for(assigned.wait(), 30)
        else:
            tps = [TopicPartition(topic, p) for p in range(args.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
        for tp in consumer.assignment():
            await consumer.position(tp)
        got = 0

        async def read() -> None:
            nonlocal got
            while got < args.records:
                batches = await consumer.getmany(timeout_ms=1000)
                got += sum(len(records) for records in batches.values())
                if group and batches:
                    await consumer.commit()

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.5)
        sending = asyncio.ensure_future(
            send_paced(producer, topic, args.partitions, args.records, args.rate)
        )
        share = await broker_share(broker.pid or 0, sending, 0)
        await asyncio.wait_for(reader, 30)
        return share
    finally:
        await consumer.stop()


async def idle_at_end(broker: EmbeddedBroker, topic: str, args: argparse.Namespace) -> float:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(args.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)

        async def poll() -> None:
            while True:
                await consumer.getmany(timeout_ms=1000)

        poller = asyncio.create_task(poll())
        await asyncio.sleep(0.5)
        share = await broker_share(broker.pid or 0, None, args.records / args.rate)
        poller.cancel()
        return share
    finally:
        await consumer.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--fill", type=int, default=6000, help="one-record batches a step")
    parser.add_argument("--records", type=int, default=800, help="records per measurement")
    parser.add_argument("--rate", type=float, default=200.0)
    args = parser.parse_args()
    async with EmbeddedBroker() as broker:
        topic, empty = f"growth.{uuid.uuid4().hex[:6]}", f"empty.{uuid.uuid4().hex[:6]}"
        await ensure_topics(broker.bootstrap, [topic, empty], partitions=args.partitions)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=0)
        await producer.start()
        print(
            f"tansu's CPU share of one core; {args.partitions} partitions, "
            f"{args.records} records at {args.rate:.0f}/s per measurement",
            flush=True,
        )
        print(
            "batches held | follower reading | group member committing | idle at the end | "
            "produces alone",
            flush=True,
        )
        try:
            for step in range(args.steps):
                held = step * args.fill + 2 * step * args.records
                follower = await reading(broker, producer, topic, args, group=False)
                member = await reading(broker, producer, topic, args, group=True)
                idle = await idle_at_end(broker, topic, args)
                sending = asyncio.ensure_future(
                    send_paced(producer, empty, args.partitions, args.records, args.rate)
                )
                produces = await broker_share(broker.pid or 0, sending, 0)
                print(
                    f"{held:12,} | {follower:16.1%} | {member:23.1%} | {idle:15.1%} | "
                    f"{produces:14.1%}",
                    flush=True,
                )
                for i in range(args.fill):  # one record a request: a batch each
                    await (await producer.send(topic, b"x" * 600, partition=i % args.partitions))
        finally:
            await producer.stop()


if __name__ == "__main__":
    asyncio.run(main())
