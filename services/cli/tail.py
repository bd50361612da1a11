"""`bianzhi tail`: print the messages of topics as JSON lines, as they come or from the start."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from aiokafka.structs import ConsumerRecord, TopicPartition

from services.cli.common import (
    CliError,
    add_broker_options,
    broker_settings,
    decode_text,
    kafka_errors,
    make_consumer,
    positive_float,
    positive_int,
    print_json,
    resolve_service,
    resolve_topic,
    service_sealer,
    topic_partitions,
)
from services.runtime.gaps import OffsetGapGuard
from services.runtime.sealing import DLQ_SEALED_HEADER, Sealer, open_dead_letter
from services.runtime.settings import Settings


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "tail",
        help="print the messages of topics as JSON lines",
        description=(
            "Print one JSON line per message: topic, partition, offset, timestamp (ms), key, "
            "headers and value (parsed JSON, else the repr of the bytes). Topics may be short: "
            "orgs.events, quota.commands, results, roster.answers, roster.events.dlq. Reads "
            "without a consumer group, so it changes nobody's offsets."
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
    parser.add_argument(
        "--open-sealed",
        metavar="SERVICE",
        help="open dead letters SERVICE sealed with its personal-data key (roster): their value "
        "and key are printed as they arrived; needs that key, as the service is configured "
        "(BIANZHI_ROSTER_PERSONAL_DATA_KEY[_FILE], or the data directory's embedded key)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    topics = [resolve_topic(t) for t in args.topics]
    settings = broker_settings(args)
    sealer = None
    if args.open_sealed is not None:
        service = resolve_service(args.open_sealed, option="--open-sealed")
        sealer = service_sealer(service, settings)
        if sealer is None:
            raise CliError(f"--open-sealed {service}: no personal-data key of {service} found")
    return asyncio.run(
        tail(
            topics,
            settings,
            from_beginning=args.from_beginning,
            max_messages=args.max,
            idle_timeout_s=args.timeout,
            sealer=sealer,
        )
    )


async def tail(
    topics: list[str],
    settings: Settings,
    *,
    from_beginning: bool = False,
    max_messages: int | None = None,
    idle_timeout_s: float | None = None,
    sealer: Sealer | None = None,
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
            guard = OffsetGapGuard()  # no message skipped (docs/BROKER.md)
            while True:
                batches = guard.in_order(consumer, await consumer.getmany(timeout_ms=500))
                for _, records in sorted(batches.items()):
                    for record in records:
                        print_json(record_json(record, sealer))
                        printed += 1
                        if max_messages is not None and printed >= max_messages:
                            return 0
                if batches:
                    last_seen = loop.time()
                elif idle_timeout_s is not None and loop.time() - last_seen >= idle_timeout_s:
                    return 0
        finally:
            await consumer.stop()


def record_json(
    record: ConsumerRecord[bytes, bytes], sealer: Sealer | None = None
) -> dict[str, Any]:
    """One message as a JSON-ready dict; a sealed dead letter opened when ``sealer`` is given."""
    raw, key = record.value, record.key
    headers = {k: decode_text(v) for k, v in (record.headers or ())}
    opened = None
    if sealer is not None and DLQ_SEALED_HEADER in headers and raw is not None:
        try:
            raw, key = open_dead_letter(sealer, raw, {k: str(v) for k, v in headers.items()})
            opened = True
        except Exception:  # another key, or damaged: shown sealed, and said so
            opened = False
    value: Any
    try:
        value = json.loads(raw) if raw is not None else None
    except ValueError:
        value = repr(raw)
    found = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "key": decode_text(key),
        "headers": headers,
        "value": value,
    }
    if opened is not None:
        found["opened"] = opened
    return found
