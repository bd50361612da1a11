"""SQLite statements on the event loop's thread (``runtime.db``, the ``sqlite_inline`` setting).

An inline connection runs statements in place and never waits for a lock there: a statement
that finds the database locked by another connection waits on the connection's own thread
while the loop goes on. Statements, transactions and rollbacks behave as on the thread. It
commits in place too and never checkpoints: its log is checkpointed off the loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, event, insert, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.runtime import db
from services.runtime.db import create_engine

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String, nullable=False, unique=True),
)


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'inline.db'}"


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(sqlite_url(tmp_path), inline=True)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def locker(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection to the file, as another process's would be; ``BEGIN EXCLUSIVE`` on
    it locks every writer out."""
    conn = sqlite3.connect(tmp_path / "inline.db", timeout=0, isolation_level=None)
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


async def driver_connection(conn: AsyncConnection) -> Any:
    return (await conn.get_raw_connection()).driver_connection


async def names(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(items.c.name).order_by(items.c.id))).scalars())


class Ticker:
    """A task that counts the turns the loop gives it."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0)

    def stop(self) -> None:
        self._task.cancel()


async def test_a_writer_locked_out_waits_off_the_loop(
    engine: AsyncEngine, locker: sqlite3.Connection
) -> None:
    async with engine.connect() as conn:
        assert (await driver_connection(conn)).inline
        # On the loop, a statement waits for no lock.
        assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar_one() == 0
    locker.execute("BEGIN EXCLUSIVE")
    ticks_when_writing: list[int] = []
    ticker = Ticker()

    def writing(*_: Any) -> None:
        ticks_when_writing.append(ticker.ticks)

    event.listen(engine.sync_engine, "before_cursor_execute", writing)

    async def write() -> None:
        async with engine.begin() as conn:
            await conn.execute(insert(items).values(name="甲"))

    writer = asyncio.create_task(write())
    try:
        for _ in range(20):
            await asyncio.sleep(0.01)
        # The writer has tried and is waiting for the lock; the loop has gone on meanwhile.
        assert ticks_when_writing
        assert not writer.done()
        assert ticker.ticks > ticks_when_writing[0]
        locker.execute("ROLLBACK")
        await writer
    finally:
        ticker.stop()
        event.remove(engine.sync_engine, "before_cursor_execute", writing)
    assert await names(engine) == ["甲"]
    # Back from the connection's thread, the connection waits for no lock on the loop again.
    async with engine.connect() as conn:
        assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar_one() == 0


async def test_a_reader_is_not_locked_out_by_a_writer(
    engine: AsyncEngine, locker: sqlite3.Connection
) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(items).values(name="甲"))
    locker.execute("BEGIN EXCLUSIVE")
    locker.execute("INSERT INTO items (name) VALUES ('乙')")
    # WAL: the last commit is there to read, inline, while another connection writes.
    read_only = create_engine(str(engine.url), read_only=True, inline=True)
    try:
        async with read_only.connect() as conn:
            rows = (await conn.execute(select(items.c.name))).scalars().all()
        assert rows == ["甲"]
    finally:
        await read_only.dispose()


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
async def test_statements_transactions_and_rollbacks(tmp_path: Path, inline: bool) -> None:
    engine = create_engine(sqlite_url(tmp_path), inline=inline)
    try:
        async with engine.begin() as conn:
            assert (await driver_connection(conn)).inline is inline
            await conn.run_sync(metadata.create_all)
        async with engine.begin() as conn:
            first = await conn.execute(insert(items).values(name="甲"))
            assert first.inserted_primary_key == (1,)
            many = await conn.execute(insert(items), [{"name": "乙"}, {"name": "丙"}])
            assert many.rowcount == 2
        # A transaction rolled back leaves nothing.
        async with engine.connect() as conn:
            await conn.execute(insert(items).values(name="丁"))
            await conn.rollback()
        # A savepoint rolled back undoes its part only.
        async with engine.begin() as conn:
            await conn.execute(update(items).where(items.c.name == "甲").values(name="甲一"))
            nested = await conn.begin_nested()
            await conn.execute(insert(items).values(name="戊"))
            await nested.rollback()
        assert await names(engine) == ["甲一", "乙", "丙"]
        # A statement refused fails as itself; the transaction rolls back and the connection
        # goes on.
        with pytest.raises(IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(insert(items).values(name="己"))
                await conn.execute(insert(items).values(name="乙"))
        async with engine.begin() as conn:
            result = await conn.execute(update(items).values(name=items.c.name + "！"))
            assert result.rowcount == 3
            rows = (await conn.execute(select(items.c.id, items.c.name))).all()
        assert [tuple(r) for r in rows] == [(1, "甲一！"), (2, "乙！"), (3, "丙！")]
    finally:
        await engine.dispose()


async def test_the_setting_chooses_inline_for_writers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = sqlite_url(tmp_path)

    async def inline_of(engine: AsyncEngine) -> bool:
        try:
            async with engine.connect() as conn:
                return bool((await driver_connection(conn)).inline)
        finally:
            await engine.dispose()

    monkeypatch.delenv("BIANZHI_SQLITE_INLINE", raising=False)
    assert await inline_of(create_engine(url))
    assert not await inline_of(create_engine(url, read_only=True))
    monkeypatch.setenv("BIANZHI_SQLITE_INLINE", "false")
    assert not await inline_of(create_engine(url))


async def test_a_read_only_engine_refuses_writes_inline(engine: AsyncEngine) -> None:
    read_only = create_engine(str(engine.url), read_only=True, inline=True)
    try:
        with pytest.raises(OperationalError, match="readonly"):
            async with read_only.begin() as conn:
                await conn.execute(insert(items).values(name="甲"))
    finally:
        await read_only.dispose()
    assert await names(engine) == []


async def test_inline_statements_let_the_loop_turn(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "_INLINE_SLICE_S", 0.0)  # a turn before every statement
    ticker = Ticker()
    seen: list[int] = []
    try:
        async with engine.begin() as conn:
            for _ in range(5):
                await conn.execute(select(items.c.id))
                seen.append(ticker.ticks)
    finally:
        ticker.stop()
    assert seen == sorted(seen)
    assert seen[-1] > seen[0]


async def test_an_inline_commit_takes_no_trip_and_its_log_is_checkpointed_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def commit_rows(engine: AsyncEngine, commits: int) -> int:
        """Commit ``commits`` one-row transactions; the trips to the thread they took."""
        trips = 0
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
            raw = await driver_connection(conn)
        real_execute = raw._execute

        async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal trips
            trips += 1
            return await real_execute(fn, *args, **kwargs)

        raw._execute = counted
        for n in range(commits):
            async with engine.begin() as conn:
                await conn.execute(insert(items).values(name=f"item-{n}"))
            # A checkpoint a commit started ends before the next commit: on a busy machine its
            # thread could lag behind by many commits, and the log would grow meanwhile.
            await asyncio.sleep(0)
            while raw.checkpointer is not None and raw.checkpointer.running:
                await asyncio.sleep(0.001)
        raw._execute = real_execute
        return trips

    engines = {
        name: create_engine(f"sqlite+aiosqlite:///{tmp_path / name}.db", inline=name != "thread")
        for name in ("checkpointed", "unchecked", "thread")
    }
    try:
        monkeypatch.setattr(db, "_CHECKPOINT_EVERY", 10)
        checkpointed_trips = await commit_rows(engines["checkpointed"], 400)
        async with engines["checkpointed"].connect() as conn:
            checkpointer = (await driver_connection(conn)).checkpointer
            autocheckpoint = (await conn.exec_driver_sql("PRAGMA wal_autocheckpoint")).scalar()
        monkeypatch.setattr(db, "_CHECKPOINT_EVERY", 10**9)
        await commit_rows(engines["unchecked"], 400)
        thread_trips = await commit_rows(engines["thread"], 400)
        checkpointed, unchecked = (log_size(tmp_path / f"{n}.db") for n in engines if n != "thread")
    finally:
        for engine in engines.values():
            await engine.dispose()
    assert checkpointed_trips == 0  # statements and commits, all on the loop's thread
    assert thread_trips >= 400  # (what the count would be on the connection's thread)
    assert autocheckpoint == 0 and checkpointer is not None and checkpointer.checkpoints > 0
    # Checkpointed every 10 commits, the log starts again from its beginning and stays small;
    # never checkpointed, it holds all 400 transactions.
    assert checkpointed * 4 < unchecked
    assert len(await names(engines["checkpointed"])) == 400


def log_size(database: Path) -> int:
    return Path(f"{database}-wal").stat().st_size


class _WriterDuringCheckpoint:
    """Opens the checkpointer's connections (on its thread), each with another connection's
    write transaction open while its passive checkpoint runs, committed just after: as the
    service's writer, which goes on committing while a checkpoint runs on its thread. The log
    then always holds frames the passive checkpoint did not copy when the next write
    transaction begins, so that transaction never starts the log again from its beginning."""

    def __init__(self, database: Path) -> None:
        self.database = database
        self.writes = 0

    def __call__(self) -> Any:
        return _Connection(self)


class _Connection:
    def __init__(self, opener: _WriterDuringCheckpoint) -> None:
        self._opener = opener
        self._conn = sqlite3.connect(opener.database)

    def execute(self, sql: str) -> sqlite3.Cursor:
        if "PASSIVE" not in sql:
            return self._conn.execute(sql)
        writer = sqlite3.connect(self._opener.database, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("INSERT INTO items (name) VALUES (?)", (f"w-{self._opener.writes}",))
            cursor = self._conn.execute(sql)
            writer.execute("COMMIT")
            self._opener.writes += 1
            return cursor
        finally:
            writer.close()

    def close(self) -> None:
        self._conn.close()


async def test_a_log_the_writer_keeps_appending_to_is_restarted_and_stays_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a steady load no passive checkpoint is complete when the next transaction begins;
    without a restart the log held everything ever written (1 GB after a 20,000-enrolment
    burst in the roster). Once it holds ``_RESTART_FRAMES`` frames it is restarted."""
    monkeypatch.setattr(db, "_CHECKPOINT_EVERY", 10)

    async def log_after(name: str, commits: int) -> tuple[int, int, int]:
        """The log's size after ``commits`` one-row transactions, the restarts, the writes
        made during checkpoints."""
        database = tmp_path / f"{name}.db"
        engine = create_engine(f"sqlite+aiosqlite:///{database}", inline=True)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(metadata.create_all)
                checkpointer = (await driver_connection(conn)).checkpointer
            meanwhile = _WriterDuringCheckpoint(database)
            checkpointer._connect = meanwhile
            for n in range(commits):
                async with engine.begin() as conn:
                    await conn.execute(insert(items).values(name=f"item-{n}"))
                await asyncio.sleep(0)
                while checkpointer.running:
                    await asyncio.sleep(0.001)
            assert len(await names(engine)) == commits + meanwhile.writes
            size = log_size(database)  # (closing the last connection removes the log)
        finally:
            await engine.dispose()
        return size, checkpointer.restarts, meanwhile.writes

    monkeypatch.setattr(db, "_RESTART_FRAMES", 10**9)
    grown, never, writes = await log_after("never-restarted", 400)
    monkeypatch.setattr(db, "_RESTART_FRAMES", 100)
    short, restarts, _ = await log_after("restarted", 400)
    assert never == 0 and writes == 40  # a write during every checkpoint
    # Never restarted, the log holds all 440 transactions (a frame of 4,120 bytes or more each).
    assert grown > 440 * 4120
    # Restarted once it reached 100 frames: it never grows much past them.
    assert restarts >= 3
    assert short < 200 * 4120 < grown / 4


async def test_a_few_large_transactions_are_checkpointed_as_many_small_ones(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst commits 100 commands a transaction, hundreds of pages each: the log is
    checkpointed after ``_CHECKPOINT_ROWS`` changed rows as well as after
    ``_CHECKPOINT_EVERY`` commits."""
    monkeypatch.setattr(db, "_CHECKPOINT_ROWS", 100)

    async def commit_batches(batches: int, rows: int) -> int:
        async with engine.connect() as conn:
            checkpointer = (await driver_connection(conn)).checkpointer
        start = checkpointer.checkpoints
        for n in range(batches):
            async with engine.begin() as conn:
                await conn.execute(
                    insert(items), [{"name": f"{rows}-{n}-{i}"} for i in range(rows)]
                )
            await asyncio.sleep(0)
            while checkpointer.running:
                await asyncio.sleep(0.001)
        return checkpointer.checkpoints - start

    assert await commit_batches(9, 10) == 0  # 9 commits, 90 rows
    assert await commit_batches(6, 40) == 2  # 240 rows more: after 100 and after 200
