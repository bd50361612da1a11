"""`bianzhi tail`: print the messages of topics as JSON lines, as they come or from the start."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from aiokafka.structs import ConsumerRecord, TopicPartition

from services.cli.common import (
    add_broker_options,
    broker_settings,
    decode_text,
    kafka_errors,
    make_consumer,
    positive_float,
    positive_int,
    print_json,
    resolve_topic,
    topic_partitions,
)
from services.runtime.settings import Settings


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "tail",
        help="print the messages of topics as JSON lines",
        description=(
            "Print one JSON line per message: topic, partition, offset, timestamp (ms), key, "
            "headers and value (parsed JSON, else the repr of the bytes). Topics may be short: "
            "orgs.events, quota.commands, results, roster.events.dlq. Reads without a consumer "
            "group, so it changes nobody's offsets."
        ),
    )
    parser.add_argument("topics", nargs="+", metavar="TOPIC", help="topics to read")
    parser.add_argument(
        "--from-beginning",
        action="store_true",
        help="start at the oldest message the broker holds (default: only new messages)",
    )
    add_broker_options(parser)
    parser.add_argument(
        "--max", type=positive_int, metavar="N", help="exit after printing N messages"
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        metavar="S",
        help="exit after S seconds without a new message (default: run until Ctrl-C)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    topics = [resolve_topic(t) for t in args.topics]
    settings = broker_settings(args)
    return asyncio.run(
        tail(
            topics,
            settings,
            from_beginning=args.from_beginning,
            max_messages=args.max,
            idle_timeout_s=args.timeout,
        )
    )


async def tail(
    topics: list[str],
    settings: Settings,
    *,
    from_beginning: bool = False,
    max_messages: int | None = None,
    idle_timeout_s: float | None = None,
) -> int:
    partitions = await topic_partitions(settings, topics)
    tps = [TopicPartition(t, p) for t in dict.fromkeys(topics) for p in partitions[t]]
    consumer = make_consumer(settings, fetch_max_wait_ms=100)
    loop = asyncio.get_running_loop()
    printed = 0
    async with kafka_errors(settings.kafka_bootstrap):
        await consumer.start()
        try:
            consumer.assign(tps)
            if from_beginning:
                await consumer.seek_to_beginning(*tps)
            else:
                await consumer.seek_to_end(*tps)
            last_seen = loop.time()
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                for _, records in sorted(batches.items()):
                    for record in records:
                        print_json(record_json(record))
                        printed += 1
                        if max_messages is not None and printed >= max_messages:
                            return 0
                if batches:
                    last_seen = loop.time()
                elif idle_timeout_s is not None and loop.time() - last_seen >= idle_timeout_s:
                    return 0
        finally:
            await consumer.stop()


def record_json(record: ConsumerRecord[bytes, bytes]) -> dict[str, Any]:
    """One message as a JSON-ready dict."""
    value: Any
    try:
        value = json.loads(record.value) if record.value is not None else None
    except ValueError:
        value = repr(record.value)
    return {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "key": decode_text(record.key),
        "headers": {k: decode_text(v) for k, v in (record.headers or ())},
        "value": value,
    }
