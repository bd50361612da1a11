"""The statement that ends the sagas a fetch of quota's answers concerns: what it ends, and on
SQLite that it finds them by their step ids whatever the number of sagas waiting."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import insert, select

from services.roster.adapters.orm import sagas
from services.roster.adapters.repository import _ANSWERED_MANY
from services.roster.bootstrap import definition
from services.runtime.db import create_engine
from services.runtime.migrate import upgrade
from tests.support.databases import database

STAMP = datetime(2026, 11, 26, tzinfo=UTC)


def saga(status: str) -> dict[str, Any]:
    saga_id = str(uuid.uuid4())
    return {
        "saga_id": saga_id,
        "kind": "enrol",
        "person_id": str(uuid.uuid4()),
        "command_id": f"cmd-{saga_id}",
        "command_envelope": b"{}",
        "step_request_id": str(uuid.uuid4()),
        "step_type": "bianzhi.quota.OccupySlot.v1",
        "compensation_request_id": None,
        "status": status,
        "payload": {},
        "deadline": STAMP,
        "created_at": STAMP,
        "finished_at": None,
    }


async def test_answering_ends_only_the_waiting_sagas_of_the_steps_named(
    db_backend: str, tmp_path: Path
) -> None:
    waiting = [saga("waiting") for _ in range(40)]
    others = [saga(status) for status in ("timed_out", "completed", "rejected", "cancelling")]
    async with database(db_backend, tmp_path, "roster") as url:
        await upgrade("roster", definition().migrations_dir, url)
        engine = create_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.execute(insert(sagas), waiting + others)
            named = [s["step_request_id"] for s in waiting[:10] + others]
            async with engine.begin() as conn:
                ended = (
                    await conn.execute(
                        _ANSWERED_MANY, {"request_ids": named, "ended": "completed", "at": STAMP}
                    )
                ).all()
            assert sorted(row.saga_id for row in ended) == sorted(
                s["saga_id"] for s in waiting[:10]
            )
            assert {row.status for row in ended} == {"completed"}
            async with engine.connect() as conn:
                now = dict((await conn.execute(select(sagas.c.saga_id, sagas.c.status))).all())
            assert now == {
                **{s["saga_id"]: "completed" for s in waiting[:10]},
                **{s["saga_id"]: "waiting" for s in waiting[10:]},
                **{s["saga_id"]: s["status"] for s in others},
            }
        finally:
            await engine.dispose()


async def test_answering_looks_the_steps_up_by_their_index_on_sqlite(tmp_path: Path) -> None:
    # With ``status = 'waiting'`` as it was, SQLite walked ix_sagas_due over every waiting saga
    # for each fetch of answers: the plan named that index (status=?).
    url = f"sqlite+aiosqlite:///{tmp_path / 'roster.db'}"
    await upgrade("roster", definition().migrations_dir, url)
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(sagas), [saga("waiting") for _ in range(500)])
        sent: list[tuple[str, Any]] = []

        def keep(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
            if statement.startswith("UPDATE sagas"):
                sent.append((statement, parameters))

        ids = [str(uuid.uuid4()) for _ in range(100)]
        sa_event.listen(engine.sync_engine, "before_cursor_execute", keep)
        async with engine.connect() as conn:
            await conn.execute(_ANSWERED_MANY, {"request_ids": ids, "ended": "x", "at": STAMP})
            await conn.rollback()
        sa_event.remove(engine.sync_engine, "before_cursor_execute", keep)
        [(sql, args)] = sent
        async with engine.connect() as conn:
            found = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", tuple(args))
            plan = [row[3] for row in found]
        assert plan, sql
        assert all("ix_sagas_due" not in step for step in plan), plan
        assert any("(step_request_id=?)" in step for step in plan), plan
    finally:
        await engine.dispose()
