"""Each service's migrations build exactly the schema its tables declare."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from services.cli.common import existing_services
from services.runtime.db import create_engine
from services.runtime.migrate import upgrade, version_table
from tests.support.databases import database

SERVICES = existing_services()


@pytest.mark.parametrize("service", SERVICES)
async def test_migrations_match_the_tables(service: str, db_backend: str, tmp_path: Path) -> None:
    definition = importlib.import_module(f"services.{service}.bootstrap").definition()
    async with database(db_backend, tmp_path, service) as url:
        await upgrade(service, definition.migrations_dir, url)
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                diff = await conn.run_sync(
                    lambda sync: compare_metadata(
                        MigrationContext.configure(
                            sync, opts={"version_table": version_table(service)}
                        ),
                        definition.metadata,
                    )
                )
        finally:
            await engine.dispose()
    assert diff == [], f"{service}: migrations and tables differ: {diff}"


# The division roll-up is kept by triggers (quota migration 0003); on SQLite a later
# `batch_alter_table` of establishment or org_projection recreates the table without them, so a
# migration that forgets to install them again would silently stop the roll-up.
QUOTA_TRIGGERS = {
    "sqlite": {
        "division_totals_establishment_insert",
        "division_totals_establishment_delete",
        "division_totals_establishment_update",
        "division_totals_establishment_rekey",
        "division_totals_org_insert",
        "division_totals_org_delete",
        "division_totals_org_update",
    },
    "postgresql": {
        "division_totals_establishment",
        "division_totals_org",
        "division_totals_org_update",
    },
}


async def test_the_quota_roll_up_triggers_survive_every_migration(
    db_backend: str, tmp_path: Path
) -> None:
    definition = importlib.import_module("services.quota.bootstrap").definition()
    async with database(db_backend, tmp_path, "quota") as url:
        await upgrade("quota", definition.migrations_dir, url)
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                dialect = conn.dialect.name
                query = (
                    "SELECT name FROM sqlite_master WHERE type = 'trigger'"
                    if dialect == "sqlite"
                    else "SELECT DISTINCT tgname FROM pg_trigger WHERE NOT tgisinternal"
                )
                found = set((await conn.exec_driver_sql(query)).scalars())
        finally:
            await engine.dispose()
    assert QUOTA_TRIGGERS[dialect] <= found, QUOTA_TRIGGERS[dialect] - found
