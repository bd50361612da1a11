"""The orgs sagas (merge, abolish) and the locks that keep an org in one of them at a time."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.codes import OrgStatus
from contracts.envelope import Envelope, now
from services.orgs.adapters.orm import org_saga_locks, org_sagas, orgs
from services.runtime.db import ignoring_duplicates, insert_rows


class OrgSagas:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def lock(self, org_ids: Sequence[UUID], saga_id: str) -> list[str]:
        """Take every org for ``saga_id``; the ids already taken by another saga (then
        nothing of this call is kept: the caller refuses and rolls back)."""
        rows = [{"org_id": str(o), "saga_id": saga_id} for o in org_ids]
        stmt = ignoring_duplicates(
            self.session, org_saga_locks, on=("org_id",), returning=org_saga_locks.c.org_id
        )
        taken = (await insert_rows(self.session, stmt, rows)).scalars()
        got = set(taken)
        return sorted(str(o) for o in org_ids if str(o) not in got)

    async def start(
        self,
        *,
        saga_id: str,
        kind: str,
        command: Envelope,
        org_ids: Sequence[UUID],
        payload: dict[str, Any],
        step_due_at: datetime,
    ) -> None:
        await self.session.execute(
            insert(org_sagas).values(
                saga_id=saga_id,
                kind=kind,
                command_id=command.id,
                command_envelope=command.to_bytes(),
                org_ids=[str(o) for o in org_ids],
                payload=payload,
                status="waiting",
                created_at=now(),
                finished_at=None,
                step_due_at=step_due_at,
            )
        )

    async def overdue(self, at: datetime, limit: int) -> list[Row[Any]]:
        """Waiting sagas whose step is due to be sent again at ``at``, the longest due first."""
        due = org_sagas.c.step_due_at
        return list(
            (
                await self.session.execute(
                    select(org_sagas)
                    .where(org_sagas.c.status == "waiting", or_(due.is_(None), due < at))
                    .order_by(org_sagas.c.created_at)
                    .limit(limit)
                )
            ).all()
        )

    async def resent(self, saga_id: str, next_due_at: datetime) -> None:
        await self.session.execute(
            update(org_sagas).where(org_sagas.c.saga_id == saga_id).values(step_due_at=next_due_at)
        )

    async def get(self, saga_id: str) -> Row[Any] | None:
        return (
            await self.session.execute(select(org_sagas).where(org_sagas.c.saga_id == saga_id))
        ).one_or_none()

    async def finish(self, saga_id: str, status: str) -> bool:
        """End a waiting saga and free its orgs; ``False`` if it had ended already."""
        done = await self.session.execute(
            update(org_sagas)
            .where(org_sagas.c.saga_id == saga_id, org_sagas.c.status == "waiting")
            .values(status=status, finished_at=now())
        )
        if not done.rowcount:  # type: ignore[attr-defined]
            return False
        await self.session.execute(
            delete(org_saga_locks).where(org_saga_locks.c.saga_id == saga_id)
        )
        return True

    async def active_children(self, org_ids: Sequence[UUID]) -> list[str]:
        """Active orgs whose parent is one of ``org_ids``."""
        rows = await self.session.execute(
            select(orgs.c.org_id)
            .where(
                orgs.c.parent_org_id.in_([str(o) for o in org_ids]),
                orgs.c.status == OrgStatus.ACTIVE.value,
            )
            .order_by(orgs.c.org_id)
            .limit(20)
        )
        return list(rows.scalars())

    async def waiting(self) -> int:
        return int(
            (
                await self.session.execute(
                    select(func.count()).where(org_sagas.c.status == "waiting")
                )
            ).scalar_one()
        )
