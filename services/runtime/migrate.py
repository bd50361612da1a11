"""Alembic migrations, one version table per service."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import async_engine_from_config


def version_table(service: str) -> str:
    return f"alembic_version_{service}"


def alembic_config(service: str, migrations_dir: Path, url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["service"] = service
    return cfg


def upgrade_sync(service: str, migrations_dir: Path, url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(service, migrations_dir, url), revision)


async def upgrade(service: str, migrations_dir: Path, url: str, revision: str = "head") -> None:
    """Bring the service's database to ``revision`` (runs Alembic in a worker thread)."""
    await asyncio.to_thread(upgrade_sync, service, migrations_dir, url, revision)


def run_env(metadata: MetaData, service: str) -> None:
    """The body of every service's ``migrations/env.py``."""
    from alembic import context

    config = context.config

    def do_run(connection: Connection) -> None:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            version_table=version_table(service),
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()

    if context.is_offline_mode():
        context.configure(
            url=config.get_main_option("sqlalchemy.url"),
            target_metadata=metadata,
            version_table=version_table(service),
            literal_binds=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        return

    async def run_async() -> None:
        engine = async_engine_from_config(
            config.get_section(config.config_ini_section, {}),
            prefix="sqlalchemy.",
            poolclass=pool.NullPool,
        )
        async with engine.connect() as connection:
            await connection.run_sync(do_run)
        await engine.dispose()

    asyncio.run(run_async())
