"""``runtime.db.insert_rows``: a multi-row INSERT on SQLite without SQLAlchemy's per-row
parameter processing, storing exactly what ``session.execute(stmt, rows)`` stores.

Each test writes the same rows through ``insert_rows`` into one table and through plain
SQLAlchemy into another of the same schema, and compares what the two hold: read with raw SQL
(the stored text, blobs and numbers, and on SQLite their storage classes) and through
SQLAlchemy. On PostgreSQL ``insert_rows`` is ``session.execute`` itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Insert,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    event,
    insert,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError, PendingRollbackError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import db
from services.runtime.db import create_engine, ignoring_duplicates, insert_rows, session_factory

metadata = MetaData()


def table(name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
        Column("key", String(50), nullable=False, unique=True),
        Column("at", DateTime(timezone=True), nullable=True),
        Column("naive_at", DateTime(), nullable=True),
        Column("on", Date, nullable=True),
        Column("doc", JSON, nullable=True),
        Column("blob", LargeBinary, nullable=True),
        Column("flag", Boolean, nullable=True),
        Column("n", Integer, nullable=True),
        Column("name", String(100), nullable=True),
    )


FAST, PLAIN = table("fast_rows"), table("plain_rows")
# A column SQLAlchemy fills in: such a statement is left to SQLAlchemy.
DEFAULTED = Table(
    "defaulted_rows",
    metadata,
    Column("seq", Integer, primary_key=True),
    Column("name", String(50), nullable=False),
    Column("kind", String(20), nullable=False, default="plain"),
)

SHANGHAI = timezone(timedelta(hours=8))


def rows(start: int = 0, count: int = 8) -> list[dict[str, Any]]:
    """Rows of every kind of value the services write, and NULLs."""
    kinds: list[dict[str, Any]] = [
        {
            "at": datetime(2026, 3, 1, 8, 30, 15, 123456, tzinfo=UTC),
            "naive_at": datetime(2026, 3, 1, 8, 30, 15, 123456),
            "on": date(2026, 3, 1),
            "doc": {"名称": "中共某县委组织部", "list": [1, 2.5, None, True], "空": {}},
            "blob": b"\x00\x01binary\xff",
            "flag": True,
            "n": 42,
            "name": "张三",
        },
        {  # no microseconds: stored with six zeros, as SQLAlchemy does
            "at": datetime(2026, 3, 1, 8, 30, 15, tzinfo=UTC),
            "naive_at": datetime(2026, 3, 1, 8, 30, 15),
            "on": date(1, 1, 1),
            "doc": ["数组", "值"],
            "blob": b"",
            "flag": False,
            "n": 0,
            "name": "",
        },
        {  # an offset is not applied on SQLite: the local fields are stored
            "at": datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=SHANGHAI),
            "naive_at": datetime(1, 1, 1),
            "on": date(9999, 12, 31),
            "doc": "一段文字",
            "blob": bytearray(b"bytearray"),
            "flag": None,
            "n": -7,
            "name": 'O\'Brien "quoted" ?',
        },
        {  # a zone other than a fixed offset goes through SQLAlchemy's processor
            "at": datetime(2026, 7, 1, 12, 0, 0, 5, tzinfo=ZoneInfo("Asia/Shanghai")),
            "naive_at": None,
            "on": None,
            "doc": None,  # JSON null, not SQL NULL (the column type's ``none_as_null``)
            "blob": None,
            "flag": None,
            "n": None,
            "name": None,
        },
        {  # a date in a DateTime column and a datetime in a Date column
            "at": date(2026, 5, 4),
            "naive_at": datetime(2026, 5, 4, 1, 2, 3, 4),
            "on": date(2026, 5, 4),
            "doc": {"n": 1},
            "blob": memoryview(b"view"),
            "flag": True,
            "n": True,
            "name": "x",
        },
    ]
    return [{"key": f"k{start + i}", **kinds[i % len(kinds)]} for i in range(count)]


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(db_url)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    try:
        yield engine
    finally:
        await engine.dispose()


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


async def stored_raw(engine: AsyncEngine, name: str) -> list[tuple[Any, ...]]:
    """The rows of table ``name`` as the database holds them, without SQLAlchemy's types;
    on SQLite with each value's storage class."""
    columns = [c.name for c in FAST.c]
    quoted = ", ".join(f'"{c}"' for c in columns)
    if is_sqlite(engine):
        quoted += ", " + ", ".join(f'typeof("{c}")' for c in columns)
    async with engine.connect() as conn:
        result = await conn.execute(text(f"SELECT {quoted} FROM {name} ORDER BY seq"))
        return [tuple(_plain(v) for v in row) for row in result]


def _plain(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


async def stored(engine: AsyncEngine, t: Table) -> list[tuple[Any, ...]]:
    """The rows of ``t`` as SQLAlchemy reads them."""
    async with engine.connect() as conn:
        return [tuple(row) for row in await conn.execute(select(t).order_by(t.c.seq))]


async def both(
    engine: AsyncEngine,
    values: Sequence[dict[str, Any]],
    fast_stmt: Insert | Table = FAST,
    plain_stmt: Insert | Table = PLAIN,
) -> tuple[list[Any], list[Any]]:
    """Insert ``values`` through ``insert_rows`` and through ``session.execute``; the rows
    each returned (empty without RETURNING)."""
    async with session_factory(engine)() as session:
        fast = await insert_rows(session, fast_stmt, values)
        returning = isinstance(fast_stmt, Insert) and bool(fast_stmt.exported_columns)
        fast_rows = [tuple(r) for r in fast] if returning else []
        plain_insert = insert(plain_stmt) if isinstance(plain_stmt, Table) else plain_stmt
        plain = await session.execute(plain_insert, list(values))
        plain_rows = [tuple(r) for r in plain] if returning else []
        await session.commit()
    return fast_rows, plain_rows


async def assert_same(engine: AsyncEngine) -> None:
    fast_raw, plain_raw = (
        await stored_raw(engine, "fast_rows"),
        await stored_raw(engine, "plain_rows"),
    )
    assert fast_raw == plain_raw
    assert fast_raw
    assert await stored(engine, FAST) == await stored(engine, PLAIN)


@pytest.fixture
def fast_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times ``insert_rows`` ran its own statements (rather than SQLAlchemy's)."""
    runs: list[int] = []
    run = db._run_rows_insert

    async def counted(*args: Any) -> list[Any]:
        runs.append(1)
        return await run(*args)

    monkeypatch.setattr(db, "_run_rows_insert", counted)
    return runs


async def test_the_values_stored_are_sqlalchemys(engine: AsyncEngine, fast_runs: list[int]) -> None:
    await both(engine, rows(count=10))
    await both(engine, rows(10, 1))
    await assert_same(engine)
    assert len(fast_runs) == (2 if is_sqlite(engine) else 0)
    if is_sqlite(engine):
        raw = await stored_raw(engine, "fast_rows")
        # seq, key, at, naive_at, on, doc, blob, flag, n, name; then their storage classes
        assert raw[0][2:10] == (
            "2026-03-01 08:30:15.123456",
            "2026-03-01 08:30:15.123456",
            "2026-03-01",
            '{"名称": "中共某县委组织部", "list": [1, 2.5, null, true], "空": {}}',
            b"\x00\x01binary\xff",
            1,
            42,
            "张三",
        )
        assert raw[1][2] == "2026-03-01 08:30:15.000000"
        assert raw[2][2] == "2026-12-31 23:59:59.999999"
        assert raw[3][2] == "2026-07-01 12:00:00.000005"
        assert raw[3][5] == "null"
        assert raw[4][2] == "2026-05-04 00:00:00.000000"
        assert raw[0][10 + 6] == "blob" and raw[0][10 + 7] == "integer"


async def test_rows_returned_and_duplicates_skipped_as_sqlalchemy_does(
    engine: AsyncEngine, fast_runs: list[int]
) -> None:
    async with session_factory(engine)() as session:
        fast = ignoring_duplicates(session, FAST, on=["key"], returning=(FAST.c.seq, FAST.c.key))
        plain = ignoring_duplicates(
            session, PLAIN, on=["key"], returning=(PLAIN.c.seq, PLAIN.c.key)
        )
    first, first_plain = await both(engine, rows(0, 3), fast, plain)
    assert sorted(first) == sorted(first_plain) == [(1, "k0"), (2, "k1"), (3, "k2")]
    # k1 and k2 are there already; k5 comes twice in the same statement.
    again = rows(1, 5) + rows(5, 1)
    second, second_plain = await both(engine, again, fast, plain)
    assert sorted(key for _, key in second) == ["k3", "k4", "k5"]
    assert sorted(second) == sorted(second_plain)
    await assert_same(engine)
    assert len(fast_runs) == (2 if is_sqlite(engine) else 0)


async def test_a_result_reads_as_sqlalchemys(engine: AsyncEngine) -> None:
    async with session_factory(engine)() as session:
        stmt = ignoring_duplicates(session, FAST, returning=FAST.c.key)
        result = await insert_rows(session, stmt, rows(0, 2))
        assert list(result.keys()) == ["key"]
        assert sorted(result.scalars()) == ["k0", "k1"]
        one = await insert_rows(session, stmt, rows(1, 2))
        assert one.scalar_one() == "k2"
        none = await insert_rows(session, stmt, rows(2, 1))
        assert none.one_or_none() is None
        stmt = FAST.insert().returning(FAST.c.key, FAST.c.n)
        row = (await insert_rows(session, stmt, rows(3, 1))).one()
        assert (row.key, row.n) == ("k3", 42)
        await session.rollback()


async def test_more_rows_than_one_statement_takes_go_in_several(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, fast_runs: list[int]
) -> None:
    # 20 parameters a statement: two rows of 10 columns (SQLite's limit is far higher).
    monkeypatch.setattr(db, "_max_variables", lambda: 20)
    monkeypatch.setattr(db, "_ROWS_INSERTS", {})
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO fast_rows"):
            statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        fast, plain = await both(
            engine,
            rows(0, 7),
            FAST.insert().returning(FAST.c.seq, FAST.c.key),
            PLAIN.insert().returning(PLAIN.c.seq, PLAIN.c.key),
        )
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)
    assert sorted(fast) == sorted(plain) == [(i + 1, f"k{i}") for i in range(7)]
    await assert_same(engine)
    if is_sqlite(engine):
        assert len(statements) == 4  # 2 + 2 + 2 + 1 rows
        assert statements[-1].count("(?") == 1
        assert fast_runs == [1]


async def test_a_failure_is_sqlalchemys_and_leaves_nothing_of_the_statement(
    engine: AsyncEngine,
) -> None:
    async with session_factory(engine)() as session:
        await insert_rows(session, FAST, rows(0, 2))
        with pytest.raises(IntegrityError):
            await insert_rows(session, FAST, rows(2, 2) + rows(1, 1))
        if is_sqlite(engine):
            # The transaction goes on without any row of the failed statement (PostgreSQL's
            # is aborted as a whole).
            keys = (await session.execute(select(FAST.c.key).order_by(FAST.c.key))).scalars()
            assert list(keys) == ["k0", "k1"]
            await session.commit()
        else:
            await session.rollback()
    expected = ["k0", "k1"] if is_sqlite(engine) else []
    assert [r[1] for r in await stored(engine, FAST)] == expected


async def test_what_it_cannot_take_goes_to_sqlalchemy(
    engine: AsyncEngine, fast_runs: list[int]
) -> None:
    async with session_factory(engine)() as session:
        # A default SQLAlchemy fills in.
        await insert_rows(session, DEFAULTED, [{"name": "a"}, {"name": "b"}])
        # A row without a key the first one has: SQLAlchemy's own error.
        with pytest.raises(StatementError):
            await insert_rows(session, FAST, [{"key": "a", "n": 1}, {"key": "b"}])
        # A value its type refuses: SQLAlchemy's own error too.
        refused = "SQLite DateTime type only accepts" if is_sqlite(engine) else None
        with pytest.raises(StatementError, match=refused):
            await insert_rows(session, FAST, [{"key": "a", "at": "2026-03-01"}])
        await session.rollback()
        await insert_rows(session, DEFAULTED, [{"name": "a"}, {"name": "b"}])
        await session.commit()
        stored_rows = (await session.execute(select(DEFAULTED.c.name, DEFAULTED.c.kind))).all()
    assert [tuple(r) for r in stored_rows] == [("a", "plain"), ("b", "plain")]
    assert fast_runs == []


async def test_only_sqlite_takes_the_fast_path(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled: list[object] = []
    real = db._rows_insert

    def watched(*args: Any) -> Any:
        if not is_sqlite(engine):
            raise AssertionError("compiled for the fast path on PostgreSQL")
        compiled.append(args[1])
        return real(*args)

    monkeypatch.setattr(db, "_rows_insert", watched)
    async with session_factory(engine)() as session:
        stmt = ignoring_duplicates(session, FAST, returning=FAST.c.key)
        assert sorted((await insert_rows(session, stmt, rows(0, 3))).scalars()) == [
            "k0",
            "k1",
            "k2",
        ]
        await session.commit()
    # SQLite: the statement went the fast way; PostgreSQL: through session.execute.
    assert compiled == ([stmt] if is_sqlite(engine) else [])


@pytest.mark.parametrize("inline", [True, False])
async def test_on_either_thread_of_a_sqlite_connection_and_on_a_connection(
    tmp_path: Path, inline: bool, fast_runs: list[int]
) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'rows.db'}", inline=inline)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        await both(engine, rows(0, 5))
        async with engine.connect() as conn:
            result = await insert_rows(conn, FAST.insert().returning(FAST.c.seq), rows(5, 3))
            assert sorted(result.scalars()) == [6, 7, 8]
            await conn.execute(insert(PLAIN), rows(5, 3))
            await conn.commit()
        await assert_same(engine)
        assert len(fast_runs) == 2
    finally:
        await engine.dispose()


async def test_a_transaction_takes_its_connection_once_and_keeps_it_to_itself(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with session_factory(engine)() as session:
        asked: list[object] = []
        real = session.connection

        async def connection(**kw: Any) -> Any:
            got = await real(**kw)
            asked.append(session.sync_session.get_transaction())
            return got

        monkeypatch.setattr(session, "connection", connection)
        for start in (0, 2, 4):
            await insert_rows(session, FAST, rows(start, 2))
        await session.rollback()  # the first transaction's rows go with it
        for start in (6, 8):
            await insert_rows(session, FAST, rows(start, 2))
        await session.commit()
        await insert_rows(session, FAST, rows(10, 1))
        await session.commit()
    if is_sqlite(engine):
        # Once per transaction; each a transaction of its own.
        assert len(asked) == 3 and len({id(t) for t in asked}) == 3
    assert [r[1] for r in await stored(engine, FAST)] == ["k6", "k7", "k8", "k9", "k10"]


async def test_a_transaction_whose_connection_was_lost_fails_as_sqlalchemys(
    engine: AsyncEngine,
) -> None:
    async with session_factory(engine)() as session:
        await insert_rows(session, FAST, rows(0, 1))
        await (await session.connection()).invalidate()
        with pytest.raises(PendingRollbackError) as plain:
            await session.execute(insert(FAST), rows(1, 1))
        with pytest.raises(PendingRollbackError) as fast:
            await insert_rows(session, FAST, rows(1, 1))
        assert str(fast.value) == str(plain.value)
        await session.rollback()
        await insert_rows(session, FAST, rows(2, 1))
        await session.commit()
    assert [r[1] for r in await stored(engine, FAST)] == ["k2"]
