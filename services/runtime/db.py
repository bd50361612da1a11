"""Async SQLAlchemy engines: SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from services.runtime.rules import TransientError


def is_sqlite(url: str) -> bool:
    """Whether ``url`` names a SQLite database."""
    return make_url(url).get_backend_name() == "sqlite"


# JSON columns keep Chinese text as it is: escaped (\uXXXX) text would defeat LIKE searches.
_json_serializer = partial(json.dumps, ensure_ascii=False)


def create_engine(url: str, *, pool_size: int = 10, read_only: bool = False) -> AsyncEngine:
    """An async engine for ``url``; SQLite gets WAL, a busy timeout and immediate write locks.

    ``read_only`` (SQLite): transactions begin deferred and may not write, so readers (queries,
    the relay's scans) never queue for the write lock; in WAL mode they see the last commit.
    """
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url, connect_args={"timeout": 30}, json_serializer=_json_serializer
        )
        _tune_sqlite(engine, read_only=read_only)
        return engine
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        json_serializer=_json_serializer,
    )


def _tune_sqlite(engine: AsyncEngine, *, read_only: bool) -> None:
    # pysqlite's own transaction handling defers BEGIN and upgrades read locks late, which
    # deadlocks concurrent writers; take the write lock at BEGIN instead (SQLAlchemy recipe).
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        if read_only:
            cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    begin = "BEGIN" if read_only else "BEGIN IMMEDIATE"

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


_TRANSIENT_SQLSTATES = ("08", "40", "53", "57")  # connection, rollback/serialization, resources


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure that may pass by itself (database down, locked, conflict)."""
    if isinstance(exc, TransientError | OSError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError):
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_TRANSIENT_SQLSTATES):
            return True
        text = str(exc.orig).lower()
        return "database is locked" in text or "connection" in text
    return False


async def ping(engine: AsyncEngine) -> bool:
    """Whether the database answers a trivial query."""
    from sqlalchemy import text

    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
