"""Async SQLAlchemy engines: SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from functools import cache, partial
from operator import itemgetter
from pathlib import Path
from typing import Any, Self

import aiosqlite
import structlog
from sqlalchemy import (
    Column,
    ColumnElement,
    FromClause,
    Insert,
    Label,
    LargeBinary,
    Row,
    Select,
    Table,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import DATE as SQLITE_DATE
from sqlalchemy.dialects.sqlite import DATETIME as SQLITE_DATETIME
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect, IteratorResult, Result, make_url
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.util import greenlet_spawn

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
            cursor.execute(f"PRAGMA journal_size_limit={_LOG_SIZE_LIMIT}")
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
    SQLite's own automatic checkpoint would have after about 1,000 pages; and sooner after
    ``_CHECKPOINT_ROWS`` changed rows, as a few transactions of a burst (100 commands each, a
    few hundred pages each) write as much as many small ones.

    Under a steady load a passive checkpoint is never complete: the writer commits while it
    runs, so some frames are always left, and the log is never started again. It grew by the
    whole of what was written (a 20,000-enrolment burst left the roster's log at about 1 GB,
    and it grew by some 20 MB/s at 200 enrolments/s after it), every commit wrote into new
    blocks of the file, and a steady load would fill the disk. So once the log holds
    ``_RESTART_FRAMES`` frames, the passive
    checkpoint (which does the bulk of the copying without blocking anyone) is followed by a
    ``RESTART`` one: it holds the write lock while it copies what the writer added meanwhile,
    and waits, at most ``_RESTART_BUSY_TIMEOUT_MS``, until no reader uses the log; the next
    write transaction then starts the log from its beginning. A writer that finds the lock
    taken waits off the loop, as for any other connection's lock. A restart that times out
    (a reader held on) is tried again at the next checkpoint. ``journal_size_limit`` truncates
    the file to ``_LOG_SIZE_LIMIT`` when the log starts again, so a log grown long while
    readers held on gives its space back.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._commits = 0
        self._changes = 0
        self._running = False
        self.checkpoints = 0
        self.restarts = 0

    @property
    def running(self) -> bool:
        """Whether a checkpoint is under way."""
        return self._running

    def committed(self, changes: int) -> None:
        """After a commit; ``changes``: the rows the connection has changed since it opened."""
        self._commits += 1
        written = changes - self._changes
        if self._running or (self._commits < _CHECKPOINT_EVERY and written < _CHECKPOINT_ROWS):
            return
        self._commits, self._changes = 0, changes
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
            if frames >= _RESTART_FRAMES:
                conn.execute(f"PRAGMA busy_timeout={_RESTART_BUSY_TIMEOUT_MS}").close()
                busy, frames, done = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                self.restarts += not busy
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
_CHECKPOINT_ROWS = 5_000
# A log this long (about 16 MB of 4 KiB pages) is restarted rather than left to grow, waiting
# at most this long for the write lock and for readers to leave it; past this size a log that
# starts again is truncated.
_RESTART_FRAMES = 4_000
_RESTART_BUSY_TIMEOUT_MS = 100
_LOG_SIZE_LIMIT = 64 * 1024 * 1024
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
                self.checkpointer.committed(self._connection.total_changes)
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


def dialect_insert(session: AsyncSession, table: Table) -> Any:
    """An ``INSERT`` of the session's dialect (PostgreSQL or SQLite), which has
    ``on_conflict_do_nothing`` and ``on_conflict_do_update``."""
    return _insert_of(session.get_bind().dialect.name)(table)


def _insert_of(dialect: str) -> Any:
    """The ``insert`` construct of ``dialect`` with ``ON CONFLICT`` (PostgreSQL or SQLite)."""
    return pg_insert if dialect == "postgresql" else sqlite_insert


def ignoring_duplicates(
    bind: AsyncSession | AsyncConnection,
    table: Table,
    *,
    on: Sequence[str] | None = None,
    returning: ColumnElement[Any] | tuple[ColumnElement[Any], ...] | None = None,
) -> Insert:
    """``INSERT … ON CONFLICT DO NOTHING`` in the dialect of ``bind`` (PostgreSQL or SQLite), on
    the unique key ``on`` (any unique key when not given), built once per dialect and table: its
    rows are given at execution (``insert_rows(session, stmt, rows)``). A statement built with
    its values costs more to build, and to make a cache key of, than to run; and one with a
    list of rows (a multi-row ``VALUES``) has no cache key at all, so SQLAlchemy compiles it
    again every time. ``returning``: a column or a tuple of them (made once, as module
    constants: they are part of the cache key), to learn which rows went in."""
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
    stmt = _insert_of(dialect)(table).on_conflict_do_nothing(
        index_elements=list(on) if on else None
    )
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


async def insert_rows(
    db: AsyncSession | AsyncConnection,
    stmt: Insert | Table,
    rows: Sequence[Mapping[str, Any]],
) -> Result[Any]:
    """``db.execute(stmt, rows)`` for an INSERT built once (a plain one, or one of
    ``ignoring_duplicates``; with or without ``RETURNING``), storing exactly the same values,
    for less CPU on SQLite. A table stands for its plain INSERT.

    SQLAlchemy prepares the parameters of an executed statement row by row: it builds each
    row's parameters from the compiled statement and runs each value through its column type's
    bind processor. For the dozens of rows a fetch inserts into a table, on SQLite, that costs
    more than the statement. Here the statement is compiled once per dialect, statement and
    row keys to its SQL (``_RowsInsert``), each row's values are taken in the statement's
    order and converted column by column (a timestamp is formatted by ``isoformat``, bytes go
    as they are; see ``_converter``), and all rows go in one ``INSERT … VALUES (…), (…)``
    (as many statements as SQLite's limit on parameters asks for) on the one-trip connection
    of ``db``, in its transaction (``_run_rows_insert``). ``RETURNING`` gives the rows of the
    rows inserted, in no order to rely on (as SQLAlchemy's own multi-row ``RETURNING``):
    callers match them by key or sort them.

    On PostgreSQL, with no rows, or with a statement or row this cannot take as it is (a
    column default SQLAlchemy would fill in, a ``RETURNING`` column whose values it would
    convert, a row without one of the first row's keys), it is ``db.execute(stmt, rows)``.
    """
    if isinstance(stmt, Table):
        stmt = _plain_insert(stmt)
    bind = db if isinstance(db, AsyncConnection) else db.get_bind()
    dialect = bind.dialect
    if dialect.name != "sqlite" or not rows:
        return await db.execute(stmt, rows)
    plan = _rows_insert(dialect, stmt, tuple(rows[0]))
    values = plan.values(rows) if plan is not None else None
    if plan is None or values is None:
        return await db.execute(stmt, rows)
    connection = db if isinstance(db, AsyncConnection) else await _connection_of(db)
    if not isinstance(connection.sync_connection.connection.driver_connection, _OneTripConnection):
        return await db.execute(stmt, rows)
    returned = await _run_rows_insert(connection, plan, values)
    return IteratorResult(SimpleResultMetaData(plan.returning), iter(returned))


async def _connection_of(session: AsyncSession) -> AsyncConnection:
    """``session.connection()``: the connection of the session's transaction, without the trip
    through a greenlet that costs (about 35 µs a call on SQLite, a third of an insert of a few
    rows) once that transaction has one. The connection is kept, in the session's ``info``,
    with the transaction it belongs to and is used only by that same transaction."""
    kept = session.info.get(_CONNECTION_KEY)
    transaction = session.sync_session.get_transaction()
    if kept is not None and transaction is not None and kept[0] is transaction:
        connection: AsyncConnection = kept[1]
        sync = connection.sync_connection
        # A transaction a failure ended (or one that lost its connection) is left to
        # ``session.connection()``, which raises what SQLAlchemy raises for it.
        if transaction.is_active and sync is not None and not sync.closed and not sync.invalidated:
            return connection
    connection = await session.connection()
    session.info[_CONNECTION_KEY] = (session.sync_session.get_transaction(), connection)
    return connection


_CONNECTION_KEY = "bianzhi.db.connection"


async def _run_rows_insert(
    connection: AsyncConnection, plan: _RowsInsert, values: list[Any]
) -> list[Any]:
    """Run ``plan`` with ``values`` (row after row) on the one-trip connection of
    ``connection``, in its transaction; the rows ``RETURNING`` gives.

    What SQLAlchemy does around a statement it runs is done here too: the connection's
    ``before_cursor_execute`` and ``after_cursor_execute`` listeners see it (with no execution
    context), and a failure is handled, and raised, as SQLAlchemy's own (``IntegrityError``,
    ``OperationalError``, a lost connection invalidated).
    """
    sync = connection.sync_connection
    driver = sync.connection.driver_connection
    events = sync._has_events or sync.engine._has_events
    width = len(plan.keys)
    step = plan.rows_per_statement * width
    returned: list[Any] = []
    for start in range(0, len(values), step):
        parameters: Any = tuple(values[start : start + step])
        statement = plan.sql(len(parameters) // width)
        cursor = driver.cursor()
        try:
            if events:
                for fn in sync.dispatch.before_cursor_execute:
                    statement, parameters = fn(sync, cursor, statement, parameters, None, False)
            await cursor.execute(statement, parameters)
            if events:
                sync.dispatch.after_cursor_execute(sync, cursor, statement, parameters, None, False)
            returned.extend(await cursor.fetchall())
        except BaseException as exc:
            if isinstance(exc, ValueError) and str(exc) == "Connection closed":
                exc = sqlite3.OperationalError(str(exc))  # as SQLAlchemy's adapter has it
            # Not the cursor: SQLAlchemy would close it as a DBAPI cursor (ours has nothing
            # to close).
            handle = sync._handle_dbapi_exception
            await greenlet_spawn(handle, exc, statement, parameters, None, None)
            raise
    return returned


@cache
def _plain_insert(table: Table) -> Insert:
    return insert(table)


_Convert = Callable[[Any], Any]


@dataclass(frozen=True)
class _RowsInsert:
    """An INSERT compiled for SQLite with the row keys ``keys``: its SQL up to its ``VALUES``
    group (``head``), the group, what follows (``tail``: ``ON CONFLICT``, ``RETURNING``), and a
    converter for each parameter whose values SQLAlchemy would convert (``None`` where it
    passes them on as they are)."""

    head: str
    group: str
    tail: str
    keys: tuple[str, ...]
    converters: tuple[_Convert | None, ...]
    rows_per_statement: int
    returning: tuple[str, ...]

    def values(self, rows: Sequence[Mapping[str, Any]]) -> list[Any] | None:
        """The parameters of ``rows``, row after row, as SQLAlchemy would pass them to the
        driver; ``None`` when a row lacks one of the keys or a value is refused by its type
        (SQLAlchemy then says what is wrong, as it would have)."""
        take = itemgetter(*self.keys)
        width = len(self.keys)
        try:
            if width == 1:
                values = [take(row) for row in rows]
            else:
                values = [value for row in rows for value in take(row)]
            for index, convert in enumerate(self.converters):
                if convert is not None:
                    values[index::width] = map(convert, values[index::width])
        except Exception:
            return None
        return values

    def sql(self, rows: int) -> str:
        """The statement for ``rows`` rows."""
        return f"{self.head}{', '.join([self.group] * rows)}{self.tail}"


# Statements seen, by dialect, statement and row keys (``None``: the statement goes through
# SQLAlchemy). The statements are built once; past this many, something builds them anew each
# time and they are compiled each time too.
_ROWS_INSERTS: dict[tuple[Dialect, Insert, tuple[str, ...]], _RowsInsert | None] = {}
_ROWS_INSERTS_KEPT = 1_000


def _rows_insert(dialect: Dialect, stmt: Insert, keys: tuple[str, ...]) -> _RowsInsert | None:
    key = (dialect, stmt, keys)
    try:
        return _ROWS_INSERTS[key]
    except KeyError:
        pass
    plan = _compile_rows_insert(dialect, stmt, keys)
    if len(_ROWS_INSERTS) < _ROWS_INSERTS_KEPT:
        _ROWS_INSERTS[key] = plan
    return plan


def _compile_rows_insert(
    dialect: Dialect, stmt: Insert, keys: tuple[str, ...]
) -> _RowsInsert | None:
    """``stmt`` with the row keys ``keys`` as a ``_RowsInsert``, or ``None`` when it needs more
    than SQL text and converted values: its parameters must be exactly the keys, one each in
    a single ``VALUES`` group of plain placeholders (no default SQLAlchemy computes, no SQL
    around a placeholder), and its ``RETURNING`` columns (named as SQLAlchemy names them)
    values SQLAlchemy gives back as the driver does."""
    compiled = stmt.compile(dialect=dialect, column_keys=list(keys))
    names = tuple(compiled.positiontup or ())
    if (
        len(names) != len(keys)
        or set(names) != set(keys)
        or compiled.insert_prefetch
        or compiled.literal_execute_params
        or compiled.post_compile_params
    ):
        return None
    group = f"({', '.join('?' * len(names))})"
    head, found, tail = compiled.string.partition(f" VALUES {group}")
    if not found or group in tail:
        return None
    returning = list(stmt.exported_columns)
    for column in returning:
        if not isinstance(column, Column | Label) or column.key != column.name:
            return None
        if column.type.dialect_impl(dialect).result_processor(dialect, None) is not None:
            return None
    converters = tuple(_converter(compiled.binds[name].type, dialect) for name in names)
    return _RowsInsert(
        head=f"{head} VALUES ",
        group=group,
        tail=tail,
        keys=names,
        converters=converters,
        rows_per_statement=max(1, _max_variables() // len(names)),
        returning=tuple(column.key for column in returning),
    )


@cache
def _max_variables() -> int:
    """How many parameters one SQLite statement may take (at most 32,766, SQLite's default
    since 3.32; builds may allow more)."""
    probe = sqlite3.connect(":memory:")
    try:
        return min(probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), 32_766)
    finally:
        probe.close()


_UTC8 = timezone(timedelta(hours=8))
_DATETIME_PROBES = (
    datetime(2024, 2, 29, 23, 59, 58, 7),
    datetime(2024, 2, 29, 23, 59, 58),
    datetime(1, 1, 1),
    datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=_UTC8),
)
_DATE_PROBES = (date(2024, 2, 29), date(1, 1, 1))
_BYTES_PROBES = (b"", b"\x00\xff")


def _converter(type_: Any, dialect: Dialect) -> _Convert | None:
    """What SQLAlchemy does to a value of a column of ``type_`` on its way to the driver, or
    ``None`` when it passes it on as it is.

    That is the type's bind processor; for SQLAlchemy's own SQLite ``DATETIME`` and ``DATE``
    and for ``LargeBinary`` it is a cheaper function for their usual values (a ``datetime``
    with no zone or a fixed offset, a ``date``, ``bytes``), which must give what the processor
    gives for a few such values, and hands anything else to the processor.
    """
    impl = type_.dialect_impl(dialect)
    process = impl.bind_processor(dialect)
    if process is None:
        return None
    ours = type(impl).__module__.startswith("sqlalchemy.")
    if ours and isinstance(impl, SQLITE_DATETIME):
        fast, probes = _datetime_to_text(process), _DATETIME_PROBES
    elif ours and isinstance(impl, SQLITE_DATE):
        fast, probes = _date_to_text(process), _DATE_PROBES
    elif ours and type(impl) is LargeBinary:
        fast, probes = _bytes_as_they_are(process), _BYTES_PROBES
    else:
        return process
    if all(fast(probe) == process(probe) for probe in probes):
        return fast
    return process


def _datetime_to_text(process: _Convert) -> _Convert:
    # SQLAlchemy's format: the fields as they are (an offset is dropped, not applied), with
    # six digits of microseconds: isoformat's first 26 characters.
    def convert(value: Any) -> Any:
        if type(value) is datetime and (value.tzinfo is None or type(value.tzinfo) is timezone):
            return value.isoformat(" ", "microseconds")[:26]
        if value is None:
            return None
        return process(value)

    return convert


def _date_to_text(process: _Convert) -> _Convert:
    def convert(value: Any) -> Any:
        if type(value) is date:
            return value.isoformat()
        if value is None:
            return None
        return process(value)

    return convert


def _bytes_as_they_are(process: _Convert) -> _Convert:
    # The processor wraps bytes in sqlite3.Binary (a memoryview); sqlite3 stores either as the
    # same blob.
    def convert(value: Any) -> Any:
        if type(value) is bytes or value is None:
            return value
        return process(value)

    return convert


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


async def paged(
    session: AsyncSession,
    rows: Select[Any],
    counted: FromClause,
    conditions: Sequence[ColumnElement[bool]],
    *,
    limit: int,
    offset: int,
) -> tuple[int, Sequence[Row[Any]]]:
    """One page of a listing query: how many rows of ``counted`` meet ``conditions``, and the
    ``limit`` rows of ``rows`` (a select in the caller's order) meeting them from ``offset``."""
    total = (
        await session.execute(select(func.count()).select_from(counted).where(*conditions))
    ).scalar_one()
    found = (await session.execute(rows.where(*conditions).limit(limit).offset(offset))).all()
    return int(total), found
