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
