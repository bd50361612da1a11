"""Async SQLAlchemy engines: SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import cache, partial
from pathlib import Path
from typing import Any, Self

import aiosqlite
import structlog
from sqlalchemy import ColumnElement, Insert, Table, event, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from services.runtime.rules import TransientError
from services.runtime.settings import Settings

log = structlog.get_logger("bianzhi.db")


def is_sqlite(url: str) -> bool:
    """Whether ``url`` names a SQLite database."""
    return make_url(url).get_backend_name() == "sqlite"


# JSON columns keep Chinese text as it is: escaped (\uXXXX) text would defeat LIKE searches.
_json_serializer = partial(json.dumps, ensure_ascii=False)


def create_engine(
    url: str, *, pool_size: int = 10, read_only: bool = False, inline: bool | None = None
) -> AsyncEngine:
    """An async engine for ``url``; SQLite gets WAL, a busy timeout and immediate write locks.

    ``read_only`` (SQLite): transactions begin deferred and may not write, so readers (queries,
    the relay's scans) never queue for the write lock; in WAL mode they see the last commit.

    ``inline`` (SQLite): statements run on the event loop's thread rather than on the
    connection's own thread (see ``_OneTripCursor``). Unset, it is the ``sqlite_inline``
    setting for an engine that writes; a reader keeps the thread, as one query over a large
    table would hold the loop for as long as it takes.
    """
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        if inline is None:
            inline = not read_only and Settings().sqlite_inline
        engine = create_async_engine(
            url,
            connect_args={
                "timeout": _INLINE_BUSY_TIMEOUT_MS / 1000 if inline else _BUSY_TIMEOUT_MS / 1000,
                "async_creator_fn": partial(_connect_sqlite, inline=inline),
            },
            json_serializer=_json_serializer,
        )
        _tune_sqlite(engine, read_only=read_only, inline=inline)
        return engine
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        json_serializer=_json_serializer,
    )


# How long a statement waits for a lock another connection holds: on the connection's thread,
# long enough to ride out a writer of another process; on the event loop's thread not at all
# (a statement that would wait goes to the connection's thread instead, see ``_OneTripCursor``).
_BUSY_TIMEOUT_MS = 30_000
_INLINE_BUSY_TIMEOUT_MS = 0


def _tune_sqlite(engine: AsyncEngine, *, read_only: bool, inline: bool) -> None:
    # pysqlite's own transaction handling defers BEGIN and upgrades read locks late, which
    # deadlocks concurrent writers; take the write lock at BEGIN instead (SQLAlchemy recipe).
    busy_timeout = _INLINE_BUSY_TIMEOUT_MS if inline else _BUSY_TIMEOUT_MS

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        if read_only:
            cursor.execute("PRAGMA query_only=ON")
        elif inline:
            # Its commits never checkpoint on the loop: see ``_Checkpointer``.
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.close()

    begin = "BEGIN" if read_only else "BEGIN IMMEDIATE"

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)


class _OneTripCursor:
    """A cursor whose statement, rows and cleanup take one trip to the connection's thread, or
    none: on an inline connection they run on the event loop's thread.

    aiosqlite's own cursor takes a trip (a queue hand-off and a wake-up of the event loop)
    to open, to execute, to fetch and to close: four per statement. On a machine whose cores
    are busy, every trip costs a scheduling delay, and the latency of a command is mostly
    these. Here each statement runs, fetches everything and closes its sqlite3 cursor in
    one call on the connection's thread; the rows are then read from memory. A ``BEGIN`` travels
    with the statement after it, and ending a transaction that has not begun takes no trip.

    A trip still costs several times what the statement does; an inline connection runs its
    statements in place, without waiting for any lock (its busy timeout is zero): a statement
    that finds the database locked by another connection (a writer of another process) and
    has begun no transaction, so has done nothing, goes to the connection's thread and waits
    there, with the long busy timeout, while the loop goes on. ``COMMIT`` runs inline too: in
    WAL mode with ``synchronous=NORMAL`` it appends to the log and syncs nothing, and an inline
    connection never checkpoints (which writes back and syncs the database file); its log is
    checkpointed off the loop (``_Checkpointer``). ``ROLLBACK`` takes the trip. Between inline
    statements the loop gets a turn every ``_INLINE_SLICE_S``, as it did at every trip.
    """

    arraysize = 1

    def __init__(self, connection: _OneTripConnection) -> None:
        self._connection = connection
        self._rows: deque[Any] = deque()
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None

    async def _run(self, call: Callable[[sqlite3.Cursor], object]) -> Self:
        global _inline_since
        connection = self._connection
        if connection.inline and time.perf_counter() - _inline_since > _INLINE_SLICE_S:
            await asyncio.sleep(0)
            _inline_since = time.perf_counter()
        begin, connection.pending_begin = connection.pending_begin, None
        outcome: _Outcome | None = None
        if connection.inline:
            if not connection._running or connection._connection is None:
                raise ValueError("Connection closed")  # as a trip would
            conn = connection._connection
            changes = conn.total_changes
            try:
                outcome = _trip(conn, begin, call)
            except sqlite3.OperationalError as exc:
                # Only a statement that has changed nothing, in no transaction, runs again.
                if not _is_busy(exc) or conn.in_transaction or conn.total_changes != changes:
                    raise
        if outcome is None:
            outcome = await connection._execute(
                _patient_trip if connection.inline else _trip, connection._conn, begin, call
            )
        rows, self.description, self.rowcount, self.lastrowid = outcome
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

_Outcome = tuple[list[Any], Any, int, int | None]

# Inline statements run back to back hold the loop; past this long, the next one lets it turn.
_INLINE_SLICE_S = 0.005
_inline_since = 0.0


def _trip(
    conn: sqlite3.Connection, begin: str | None, call: Callable[[sqlite3.Cursor], object]
) -> _Outcome:
    """Run a statement (after ``begin``), fetch its rows and close its cursor."""
    cursor = conn.cursor()
    try:
        if begin is not None:
            cursor.execute(begin)
        call(cursor)
        rows = cursor.fetchall() if cursor.description else []
        return rows, cursor.description, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


def _patient_trip(
    conn: sqlite3.Connection, begin: str | None, call: Callable[[sqlite3.Cursor], object]
) -> _Outcome:
    """``_trip`` on an inline connection's thread: waiting for locks as long as any trip does."""
    conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}").close()
    try:
        return _trip(conn, begin, call)
    finally:
        conn.execute(f"PRAGMA busy_timeout={_INLINE_BUSY_TIMEOUT_MS}").close()


class _Checkpointer:
    """Checkpoints the WAL of an inline connection, which never does so itself.

    A checkpoint writes the log's pages back into the database file and syncs it: milliseconds
    to tens of milliseconds, which a commit on the event loop's thread would make every handler
    wait out. Every ``_CHECKPOINT_EVERY`` commits a connection of its own, on a worker thread,
    runs a ``PASSIVE`` checkpoint (it neither waits for nor blocks readers and the writer; the
    next write transaction after a complete one starts the log again from its beginning), as
    SQLite's own automatic checkpoint would have after about 1,000 pages.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._commits = 0
        self._running = False
        self.checkpoints = 0

    @property
    def running(self) -> bool:
        """Whether a checkpoint is under way."""
        return self._running

    def committed(self) -> None:
        self._commits += 1
        if self._commits < _CHECKPOINT_EVERY or self._running:
            return
        self._commits = 0
        try:
            done = asyncio.get_running_loop().run_in_executor(None, self._checkpoint)
        except RuntimeError:  # the loop is closing: the last connection's close checkpoints
            return
        self._running = True
        done.add_done_callback(self._finished)

    def _checkpoint(self) -> tuple[int, int, int]:
        conn = self._connect()
        try:
            conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}").close()
            busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(busy), int(frames), int(done)
        finally:
            conn.close()

    def _finished(self, done: asyncio.Future[tuple[int, int, int]]) -> None:
        self._running = False
        if done.cancelled():
            return
        if (exc := done.exception()) is not None:
            log.warning("WAL checkpoint failed; the next one tries again", error=repr(exc))
            return
        self.checkpoints += 1
        _busy, frames, backfilled = done.result()
        if frames - backfilled > _WAL_BEHIND_WARNING_FRAMES:
            # A reader holding an old snapshot keeps the log from being written back.
            log.warning("WAL not written back", frames=frames, written_back=backfilled)


# Commits between two checkpoints of an inline connection's log (a command's transaction
# writes some 5-15 pages; SQLite's automatic checkpoint comes at 1,000).
_CHECKPOINT_EVERY = 100
_WAL_BEHIND_WARNING_FRAMES = 50_000


def _is_busy(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is SQLite's "database is locked" (by another connection or a table lock)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class _OneTripConnection(aiosqlite.Connection):
    """An aiosqlite connection whose cursors take one trip per statement."""

    # A BEGIN not yet sent: it goes with the next statement (if it fails, that statement fails
    # with its error, which SQLAlchemy handles as any failure of a transaction's first step).
    pending_begin: str | None = None
    # Statements run on the event loop's thread (the sqlite3 connection is shared with the
    # connection's own thread, which runs the rest; never both at once: each call is awaited).
    inline: bool = False

    # Inline: checkpoints the log its commits write, off the loop.
    checkpointer: _Checkpointer | None = None

    def cursor(self) -> _OneTripCursor:  # type: ignore[override]
        return _OneTripCursor(self)

    async def commit(self) -> None:
        if self.pending_begin is not None:  # nothing was done
            self.pending_begin = None
            return
        if self.inline and self._connection is not None:
            if not self._running:
                raise ValueError("Connection closed")  # as a trip would
            self._connection.commit()
            if self.checkpointer is not None:
                self.checkpointer.committed()
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


def _connect_sqlite(database: str, *, inline: bool = False, **kwargs: Any) -> _OneTripConnection:
    """What ``aiosqlite.connect`` does, with the one-trip connection (SQLAlchemy awaits it)."""
    if inline:  # made on the connection's thread, used on the loop's too
        kwargs["check_same_thread"] = False
    connection = _OneTripConnection(partial(sqlite3.connect, database, **kwargs), 64)
    connection.inline = inline
    if inline and database != ":memory:" and not str(database).startswith("file::memory:"):
        connection.checkpointer = _Checkpointer(
            partial(sqlite3.connect, database, uri=bool(kwargs.get("uri")))
        )
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


def ignoring_duplicates(
    bind: AsyncSession | AsyncConnection,
    table: Table,
    *,
    on: Sequence[str] | None = None,
    returning: ColumnElement[Any] | tuple[ColumnElement[Any], ...] | None = None,
) -> Insert:
    """``insert_ignoring_duplicates`` for hot paths: built once per dialect and table, its rows
    given at execution (``session.execute(stmt, rows)``); building a statement with its values,
    and its cache key from them, every time costs more than running it. ``returning``: a column
    or a tuple of them (made once, as module constants: they are part of the cache key)."""
    dialect = (bind if isinstance(bind, AsyncConnection) else bind.get_bind()).dialect.name
    if returning is None:
        columns: tuple[ColumnElement[Any], ...] = ()
    else:
        columns = returning if isinstance(returning, tuple) else (returning,)
    return _ignoring_duplicates(dialect, table, tuple(on) if on else None, columns)


@cache
def _ignoring_duplicates(
    dialect: str,
    table: Table,
    on: tuple[str, ...] | None,
    returning: tuple[ColumnElement[Any], ...],
) -> Insert:
    insert_fn = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert_fn(table).on_conflict_do_nothing(index_elements=list(on) if on else None)
    return stmt.returning(*returning) if returning else stmt


def row_looked_up(
    table: Table, columns: Sequence[str], *, key: str, of: Table, prefix: str
) -> tuple[ColumnElement[Any], ...]:
    """For the ``RETURNING`` of a statement on ``of``: ``columns`` of the row of ``table`` with
    the same ``key``, a scalar subquery each, labelled ``prefix`` + column (all ``None`` when
    ``table`` has no such row). The statement brings back what a read of its own would.

    The condition is written out: SQLite's ``RETURNING`` is compiled without table names,
    which would leave both sides of ``key = key`` to the subquery's own table.
    """
    same = text(f"{table.name}.{key} = {of.name}.{key}")
    return tuple(
        select(table.c[name]).where(same).scalar_subquery().label(f"{prefix}{name}")
        for name in columns
    )


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
