"""Benchmark: what consumers waiting for records cost the embedded broker.

Runs tansu alone with empty topics of ``--partitions`` (12) partitions and, for ``--seconds``
(6) each, a set of idle consumers assigned to them that poll as the services' consumers do
(``getmany`` in a loop, each fetch waiting up to its ``fetch_max_wait_ms``). It prints the
broker's CPU share of one core for: one consumer at each of ``--waits`` (10,20,100 ms); one at
10 ms over one partition, one topic and two topics (what a fetch costs by the partitions it
names); and one to three such consumers (whether the costs add up). Each line also gives the
fetches a second and the broker's CPU per fetch.

docs/BROKER.md has its figures: a waiting fetch costs the broker more the longer it waits, and
the per-fetch cost hardly depends on the partitions it names. Quick run: ``--seconds 3``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from aiokafka import AIOKafkaConsumer, TopicPartition
from orgs_throughput import cpu_seconds

from services.runtime.embedded_broker import EmbeddedBroker, ensure_topics


async def idle_share(
    broker: EmbeddedBroker, consumers: list[tuple[list[str], int, int]], seconds: float
) -> tuple[float, float]:
    """The broker's CPU share while the ``(topics, partitions, fetch wait ms)`` consumers wait,
    and the fetches a second they made."""
    assert broker.pid is not None
    started: list[AIOKafkaConsumer] = []
    fetches = [0]

    async def poll(consumer: AIOKafkaConsumer) -> None:
        while True:
            await consumer.getmany(timeout_ms=1000)

    for topics, partitions, wait in consumers:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=broker.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=wait
        )
        await consumer.start()
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        # Count the fetch requests it sends (the client's own fetch routine).
        fetcher = consumer._fetcher
        original = fetcher._proc_fetch_request

        async def counted(*args: object, _original: object = original) -> object:
            fetches[0] += 1
            return await _original(*args)  # type: ignore[operator]

        fetcher._proc_fetch_request = counted
        started.append(consumer)
    tasks = [asyncio.create_task(poll(c)) for c in started]
    try:
        await asyncio.sleep(1.0)  # past the first fetches and metadata
        before, fetched, t0 = cpu_seconds(broker.pid), fetches[0], time.perf_counter()
        await asyncio.sleep(seconds)
        elapsed = time.perf_counter() - t0
        share = (cpu_seconds(broker.pid) - before) / elapsed
        rate = (fetches[0] - fetched) / elapsed
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for consumer in started:
            await consumer.stop()
    return share, rate


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--waits", default="10,20,100", help="fetch waits (ms), comma-separated")
    args = parser.parse_args()
    waits = [int(w) for w in args.waits.split(",") if w]
    run = uuid.uuid4().hex[:8]
    topics = [f"bench.idle.{run}.{i}" for i in range(3)]
    async with EmbeddedBroker() as broker:
        await ensure_topics(broker.bootstrap, topics, partitions=args.partitions)
        nothing, _ = await idle_share(broker, [], args.seconds)
        print(f"broker {broker.bootstrap}, {args.partitions} partitions per topic")
        print(f"  nobody polling: tansu {100 * nothing:.1f}% of one core")
        one, parts = topics[:1], args.partitions
        cases: list[tuple[str, list[tuple[list[str], int, int]]]] = [
            (f"one consumer, one topic, {w} ms wait", [(one, parts, w)]) for w in waits
        ]
        cases += [
            ("one consumer, one partition, 10 ms", [(one, 1, 10)]),
            ("one consumer, two topics, 10 ms", [(topics[:2], parts, 10)]),
            ("two consumers, one topic each, 10 ms", [(one, parts, 10), (topics[1:2], parts, 10)]),
            (
                "three consumers, one topic each, 10 ms",
                [([t], parts, 10) for t in topics],
            ),
        ]
        for label, consumers in cases:
            share, rate = await idle_share(broker, consumers, args.seconds)
            per_fetch = 1000 * share / rate if rate else float("nan")
            print(
                f"  {label}: tansu {100 * share:.1f}% of one core, {rate:.0f} fetches/s, "
                f"{per_fetch:.2f} ms CPU per fetch"
            )


if __name__ == "__main__":
    asyncio.run(main())
