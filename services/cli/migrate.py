"""`bianzhi migrate`: bring service databases to the latest schema (Alembic, one table each)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from services.cli.common import (
    CliError,
    add_data_dir_option,
    existing_services,
    load_settings,
    resolve_service,
    service_definition,
)
from services.runtime.migrate import upgrade
from services.runtime.settings import Settings


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "migrate",
        help="bring service databases to the latest schema",
        description=(
            "Run the Alembic migrations of one service or of all. Databases are "
            "BIANZHI_<SVC>_DATABASE_URL, else a SQLite file per service in the data directory."
        ),
    )
    parser.add_argument(
        "service",
        nargs="?",
        default="all",
        metavar="SERVICE|all",
        help="the service to migrate (default: all)",
    )
    add_data_dir_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(data_dir=args.data_dir)
    targets = existing_services() if args.service == "all" else [resolve_service(args.service)]
    if not targets:
        raise CliError("SERVICE all: no services are installed (services/<svc>/bootstrap.py)")
    for service, where in asyncio.run(migrate_services(targets, settings)):
        print(f"{service}: at the latest schema ({where})", flush=True)
    return 0


async def migrate_services(services: list[str], settings: Settings) -> list[tuple[str, str]]:
    """Migrate each service in turn; returns ``(service, database shown without password)``."""
    done = []
    for service in services:
        url = settings.database_url(service)
        shown = make_url(url).render_as_string(hide_password=True)
        try:
            await upgrade(service, service_definition(service).migrations_dir, url)
        except (DBAPIError, OSError) as exc:
            reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
            raise CliError(f"cannot migrate {service} at {shown}: {reason}") from None
        done.append((service, shown))
    return done
