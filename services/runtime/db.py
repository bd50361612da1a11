"""Async SQLAlchemy engines: SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

import json
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Self

import aiosqlite
from sqlalchemy import Insert, Table, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
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
            url,
            connect_args={"timeout": 30, "async_creator_fn": _connect_sqlite},
            json_serializer=_json_serializer,
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


class _OneTripCursor:
    """A cursor whose statement, rows and cleanup take one trip to the connection's thread.

    aiosqlite's own cursor takes a trip (a queue hand-off and a wake-up of the event loop)
    to open, to execute, to fetch and to close: four per statement. On a machine whose cores
    are busy, every trip costs a scheduling delay, and the latency of a command is mostly
    these. Here each statement runs, fetches everything and closes its sqlite3 cursor in
    one call on the connection's thread; the rows are then read from memory. A ``BEGIN`` travels
    with the statement after it, and ending a transaction that has not begun takes no trip.
    """

    arraysize = 1

    def __init__(self, connection: _OneTripConnection) -> None:
        self._connection = connection
        self._rows: deque[Any] = deque()
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None

    async def _run(self, call: Callable[[sqlite3.Cursor], object]) -> Self:
        connection = self._connection
        begin, connection.pending_begin = connection.pending_begin, None

        def trip() -> tuple[list[Any], Any, int, int | None]:
            cursor = connection._conn.cursor()
            try:
                if begin is not None:
                    cursor.execute(begin)
                call(cursor)
                rows = cursor.fetchall() if cursor.description else []
                return rows, cursor.description, cursor.rowcount, cursor.lastrowid
            finally:
                cursor.close()

        rows, self.description, self.rowcount, self.lastrowid = await connection._execute(trip)
        self._rows = deque(rows)
        return self

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> Self:
        if sql in _BEGINS and not parameters:
            self._connection.pending_begin = sql
            self.description, self.rowcount, self._rows = None, -1, deque()
            return self
        return await self._run(lambda cursor: cursor.execute(sql, parameters or ()))

    async def executemany(self, sql: str, parameters: Sequence[Sequence[Any]]) -> Self:
        return await self._run(lambda cursor: cursor.executemany(sql, parameters))

    async def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        count = min(len(self._rows), size or self.arraysize)
        return [self._rows.popleft() for _ in range(count)]

    async def fetchall(self) -> list[Any]:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    async def close(self) -> None:
        self._rows.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


_BEGINS = frozenset({"BEGIN", "BEGIN IMMEDIATE"})


class _OneTripConnection(aiosqlite.Connection):
    """An aiosqlite connection whose cursors take one trip per statement."""

    # A BEGIN not yet sent: it goes with the next statement (if it fails, that statement fails
    # with its error, which SQLAlchemy handles as any failure of a transaction's first step).
    pending_begin: str | None = None

    def cursor(self) -> _OneTripCursor:  # type: ignore[override]
        return _OneTripCursor(self)

    async def commit(self) -> None:
        if self.pending_begin is not None:  # nothing was done
            self.pending_begin = None
            return
        await super().commit()

    async def rollback(self) -> None:
        # The pool rolls back every connection it takes back, most often after a commit:
        # outside a transaction there is nothing to undo.
        if self.pending_begin is not None:
            self.pending_begin = None
            return
        if self._connection is not None and not self._connection.in_transaction:
            return
        await super().rollback()


def _connect_sqlite(database: str, **kwargs: Any) -> _OneTripConnection:
    """What ``aiosqlite.connect`` does, with the one-trip connection (SQLAlchemy awaits it)."""
    connection = _OneTripConnection(partial(sqlite3.connect, database, **kwargs), 64)
    connection._thread.daemon = True  # as SQLAlchemy does for aiosqlite's own connections
    return connection


def insert_ignoring_duplicates(
    session: AsyncSession,
    table: Table,
    values: Sequence[dict[str, Any]] | None = None,
    *,
    on: Sequence[str] | None = None,
) -> Insert:
    """``INSERT … ON CONFLICT DO NOTHING`` in the session's dialect (PostgreSQL or SQLite), on
    the unique key ``on`` (any unique key when not given); add ``.returning(…)`` to learn which
    rows went in."""
    insert_fn = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert_fn(table)
    if values is not None:
        stmt = stmt.values(list(values))
    return stmt.on_conflict_do_nothing(index_elements=list(on) if on else None)


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
