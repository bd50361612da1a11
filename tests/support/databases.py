"""Test databases: a SQLite file, or a fresh PostgreSQL database per use."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

POSTGRES_ENV = "BIANZHI_TEST_POSTGRES_URL"


def postgres_url() -> str | None:
    """The PostgreSQL server the suite must also run on, if configured."""
    return os.environ.get(POSTGRES_ENV) or None


def backends() -> list[str]:
    return ["sqlite", "postgres"] if postgres_url() else ["sqlite"]


@asynccontextmanager
async def database(
    backend: str, tmp_path: Path, name: str = "svc", *, server: str | None = None
) -> AsyncIterator[str]:
    """Yield a SQLAlchemy URL of an empty database of ``backend``; drop it afterwards. A
    PostgreSQL database is made on ``server`` (default: the suite's server)."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / f'{name}.db'}"
        return
    base = server or postgres_url()
    assert base, f"{POSTGRES_ENV} is not set"
    url = make_url(base)
    dbname = f"bz_{name}_{uuid.uuid4().hex[:10]}"
    admin_dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{dbname}"')
    finally:
        await conn.close()
    try:
        yield url.set(database=dbname).render_as_string(hide_password=False)
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        finally:
            await conn.close()
