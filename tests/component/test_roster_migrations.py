"""Roster migrations that change data, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from sqlalchemy import insert, select

from services.roster.adapters.orm import sagas
from services.roster.bootstrap import definition
from services.runtime.db import create_engine
from services.runtime.migrate import alembic_config, upgrade
from tests.support.databases import database


def saga(kind: str, status: str) -> dict[str, object]:
    saga_id = str(uuid.uuid4())
    stamp = datetime(2026, 11, 25, tzinfo=UTC)
    return {
        "saga_id": saga_id,
        "kind": kind,
        "person_id": str(uuid.uuid4()),
        "command_id": f"{kind}-{status}",
        "command_envelope": b"{}",
        "step_request_id": saga_id,
        "step_type": "bianzhi.quota.OccupySlot.v1",
        "compensation_request_id": None,
        "status": status,
        "payload": {},
        "deadline": stamp,
        "created_at": stamp,
        "finished_at": None,
    }


async def test_cancelled_transfers_and_releases_get_their_own_status(
    db_backend: str, tmp_path: Path
) -> None:
    spec = definition()
    rows = [
        saga(kind, status)
        for kind in ("enrol", "transfer", "release")
        for status in ("waiting", "timed_out", "completed")
    ]
    async with database(db_backend, tmp_path, "roster") as url:
        await upgrade("roster", spec.migrations_dir, url, "0002")
        engine = create_engine(url)

        async def statuses() -> dict[str, str]:
            async with engine.connect() as conn:
                found = await conn.execute(select(sagas.c.command_id, sagas.c.status))
                return {command_id: status for command_id, status in found}

        try:
            async with engine.begin() as conn:
                await conn.execute(insert(sagas), rows)
            await upgrade("roster", spec.migrations_dir, url, "0003")
            after = await statuses()
            # Only a transfer or release that had ended as timed out changes; an enrolment
            # being compensated stays timed out.
            assert {k: v for k, v in after.items() if v != k.split("-", 1)[1]} == {
                "transfer-timed_out": "cancelled",
                "release-timed_out": "cancelled",
            }
            cfg = alembic_config("roster", spec.migrations_dir, url)
            await asyncio.to_thread(command.downgrade, cfg, "0002")
            assert await statuses() == {r["command_id"]: r["status"] for r in rows}
        finally:
            await engine.dispose()
