"""`bianzhi replay`: publish a service's retained outbox rows again (after a broker loss).

Consumers keep an inbox, so a message they have already handled is acknowledged and skipped;
re-publishing is always safe, it only costs time.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from faststream.kafka import KafkaBroker
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from services.cli.common import (
    CliError,
    add_broker_options,
    broker_settings,
    kafka_errors,
    parse_since,
    resolve_service,
    say,
    service_definition,
    service_sealer,
    topic_partitions,
)
from services.runtime.broker import make_broker, outbox_publisher
from services.runtime.db import create_engine, is_sqlite, session_factory
from services.runtime.relay import OutboxRelay
from services.runtime.sealing import SealedRowError, opening_publisher
from services.runtime.settings import Settings

PROGRESS_EVERY = 1_000


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "replay",
        help="publish a service's retained outbox rows again",
        description=(
            "Re-publish, in order, every outbox row of SERVICE created since TIME that its "
            "database still keeps (published rows are kept for BIANZHI_OUTBOX_RETENTION_HOURS). "
            "Consumers skip what they have already handled. `bianzhi up` does this by itself "
            "when it starts a fresh embedded broker."
        ),
    )
    parser.add_argument("service", metavar="SERVICE", help="orgs, quota, roster or notify")
    parser.add_argument(
        "--since",
        required=True,
        metavar="TIME",
        help="an ISO date or datetime (naive means local time), or an age: 30m, 2h, 7d",
    )
    add_broker_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    service = resolve_service(args.service)
    since = parse_since(args.since)
    settings = broker_settings(args)
    count = asyncio.run(replay_service(service, settings, since))
    print(f"{service}: re-published {count:,} outbox rows created since {since.isoformat()}")
    return 0


def progress_reporter(service: str) -> Callable[[int, int], None]:
    """A ``progress`` callback that says one line per `PROGRESS_EVERY` rows."""
    reported = 0

    def progress(done: int, total: int) -> None:
        nonlocal reported
        if done // PROGRESS_EVERY > reported // PROGRESS_EVERY:
            say(f"{service}: re-published {done:,} of {total:,} outbox rows")
            reported = done

    return progress


async def replay_service(
    service: str,
    settings: Settings,
    since: datetime,
    *,
    broker: KafkaBroker | None = None,
    check_topics: bool = True,
) -> int:
    """Re-publish the retained outbox rows of ``service`` created at or after ``since``.

    Uses ``broker`` if given (connected), else connects one of its own.
    """
    url = settings.database_url(service)
    _require_database(service, url)
    definition = service_definition(service)
    engine = create_engine(url)
    own_broker = broker is None
    publisher = broker or make_broker(settings, client_id=f"bianzhi-cli-replay-{service}")
    try:
        outbox = definition.tables.outbox
        sessions = session_factory(engine)
        try:
            async with sessions() as session:
                topics = list(
                    (
                        await session.execute(
                            select(outbox.c.topic).where(outbox.c.created_at >= since).distinct()
                        )
                    ).scalars()
                )
        except DBAPIError as exc:
            reason = " ".join(str(exc.orig).split())
            raise CliError(
                f"SERVICE {service}: cannot read its outbox ({reason}); "
                f"`bianzhi migrate {service}` creates the tables"
            ) from None
        if not topics:
            return 0
        if check_topics:
            await topic_partitions(settings, topics)
        if own_broker:
            async with kafka_errors(settings.kafka_bootstrap):
                await publisher.connect()
        relay = OutboxRelay(
            service=service,
            engine=engine,
            sessions=sessions,
            tables=definition.tables,
            publish=opening_publisher(
                outbox_publisher(publisher), service_sealer(service, settings)
            ),
            batch_size=settings.relay_batch_size,
        )
        async with kafka_errors(settings.kafka_bootstrap):
            try:
                return await relay.replay(since, progress=progress_reporter(service))
            except SealedRowError as exc:
                raise CliError(f"SERVICE {service}: {exc}") from None
    finally:
        if own_broker:
            await publisher.stop()
        await engine.dispose()


async def outbox_rows(service: str, settings: Settings) -> int:
    """How many outbox rows (published or not) the service's database keeps; 0 without one."""
    url = settings.database_url(service)
    if is_sqlite(url) and not _sqlite_file(url).exists():
        return 0
    outbox = service_definition(service).tables.outbox
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as session:
            counted = await session.execute(select(func.count()).select_from(outbox))
            return int(counted.scalar_one())
    finally:
        await engine.dispose()


def _sqlite_file(url: str) -> Path:
    return Path(make_url(url).database or "")


def _require_database(service: str, url: str) -> None:
    # Opening a missing SQLite file would create an empty one.
    if is_sqlite(url) and not _sqlite_file(url).exists():
        raise CliError(
            f"SERVICE {service}: no database at {_sqlite_file(url)}; nothing to replay "
            "(is --data-dir the platform's data directory?)"
        )
