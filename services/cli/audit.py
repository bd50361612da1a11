"""`bianzhi audit verify SERVICE`: walk a service's audit chain and name the first broken entry.

Exit status 0 when the chain is intact, 1 when an entry was altered, moved or removed (the line
on stdout names its ``seq`` and what happened), 2 when the database cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from services.cli.common import CliError, add_data_dir_option, load_settings, resolve_service
from services.runtime.audit import AuditLog, AuditRecord, ChainBreak, audit_table, verify
from services.runtime.db import create_engine, is_sqlite

PAGE = 10_000
EXIT_BROKEN = 1
_HEAD = re.compile(r"^(\d+):([0-9a-f]{64})$")


@dataclass(frozen=True)
class ChainReport:
    entries: int
    head: AuditRecord | None
    broken: ChainBreak | None


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "audit",
        help="check a service's audit chain",
        description="Commands on the hash-chained audit log every service keeps.",
    )
    actions = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "verify",
        help="walk the chain and name the first altered, moved or missing entry",
        description=(
            "Walk SERVICE's audit chain; exit 0 when intact, 1 naming the first entry whose "
            "content, order or presence was altered. The database is --database-url, else "
            "BIANZHI_<SVC>_DATABASE_URL, else the SQLite file in the data directory."
        ),
    )
    check.add_argument("service", metavar="SERVICE", help="orgs, quota, roster or notify")
    check.add_argument("--database-url", metavar="URL", help="the service's database")
    check.add_argument(
        "--head",
        metavar="SEQ:HASH",
        help="the head of the last AuditCheckpoint kept outside the database: entries "
        "deleted from the end of the chain are found only against it",
    )
    add_data_dir_option(check)
    check.set_defaults(run=run_verify)


def parse_head(text: str | None) -> tuple[int, str] | None:
    if text is None:
        return None
    match = _HEAD.match(text.strip())
    if match is None:
        raise CliError(f"--head {text!r}: expected SEQ:HASH (a number, then 64 lowercase hex)")
    return int(match.group(1)), match.group(2)


def run_verify(args: argparse.Namespace) -> int:
    service = resolve_service(args.service)
    head = parse_head(args.head)
    url = args.database_url or load_settings(data_dir=args.data_dir).database_url(service)
    if is_sqlite(url) and not Path(make_url(url).database or "").exists():
        # Opening a missing SQLite file would create an empty one.
        raise CliError(f"SERVICE {service}: no database at {make_url(url).database}")
    report = asyncio.run(verify_database(service, url, expected_head=head))
    if report.broken is not None:
        print(f"{service}: audit chain broken at {report.broken}", flush=True)
        return EXIT_BROKEN
    if report.head is None:
        print(f"{service}: audit log is empty", flush=True)
        return 0
    print(
        f"{service}: audit chain intact, {report.entries:,} entries, "
        f"head seq {report.head.seq} hash {report.head.hash}",
        flush=True,
    )
    return 0


async def verify_database(
    service: str, url: str, *, expected_head: tuple[int, str] | None = None
) -> ChainReport:
    """Read the whole chain of ``service`` at ``url`` page by page and verify it."""
    shown = make_url(url).render_as_string(hide_password=True)
    audit = AuditLog(audit_table(MetaData()))
    engine = create_engine(url, read_only=True)
    records: list[AuditRecord] = []
    try:
        async with engine.connect() as conn:
            while True:
                after = records[-1].seq if records else 0
                page = await audit.records(conn, after_seq=after, limit=PAGE)
                records.extend(page)
                if len(page) < PAGE:
                    break
    except DBAPIError as exc:
        reason = " ".join(str(exc.orig).split())
        raise CliError(
            f"SERVICE {service}: cannot read its audit log at {shown} ({reason}); "
            f"`bianzhi migrate {service}` creates the tables"
        ) from None
    except OSError as exc:
        raise CliError(f"SERVICE {service}: cannot reach {shown} ({exc})") from None
    finally:
        await engine.dispose()
    broken = verify(records, expected_head=expected_head)
    return ChainReport(len(records), records[-1] if records else None, broken)
