"""Loads and saves organizations; appends their history."""

from __future__ import annotations

from datetime import date
from typing import Any
from uuid import UUID

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.codes import Funding, OrgKind, OrgStatus
from contracts.envelope import Envelope, now
from services.orgs.adapters.orm import org_history, org_units, orgs
from services.orgs.domain.model import Org, Unit
from services.runtime.db import ignoring_duplicates
from services.runtime.rules import TransientError


class OrgRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._versions: dict[UUID, int] = {}
        self._history: list[dict[str, Any]] = []

    async def get(self, org_id: UUID) -> Org | None:
        row = (
            await self.session.execute(select(orgs).where(orgs.c.org_id == str(org_id)))
        ).one_or_none()
        if row is None:
            return None
        unit_rows = (
            await self.session.execute(
                select(org_units.c.unit_id, org_units.c.name)
                .where(org_units.c.org_id == str(org_id))
                .order_by(org_units.c.position)
            )
        ).all()
        self._versions[org_id] = row.version
        return Org(
            org_id=UUID(row.org_id),
            name=row.name,
            kind=OrgKind(row.kind),
            division_code=row.division_code,
            parent_org_id=UUID(row.parent_org_id) if row.parent_org_id else None,
            uscc=row.uscc,
            grade=row.grade,
            alt_names=tuple(row.alt_names),
            functions=tuple(row.functions),
            funding=Funding(row.funding) if row.funding else None,
            status=OrgStatus(row.status),
            units=tuple(Unit(unit_id=UUID(u.unit_id), name=u.name) for u in unit_rows),
            effective_date=row.effective_date,
        )

    async def uscc_holder(self, uscc: str) -> UUID | None:
        value = (
            await self.session.execute(select(orgs.c.org_id).where(orgs.c.uscc == uscc))
        ).scalar_one_or_none()
        return UUID(value) if value else None

    async def ancestors(self, org_id: UUID, limit: int = 100) -> list[UUID]:
        """The parent chain of ``org_id`` upward (nearest first)."""
        chain: list[UUID] = []
        current: UUID | None = org_id
        while current is not None and len(chain) < limit:
            parent = (
                await self.session.execute(
                    select(orgs.c.parent_org_id).where(orgs.c.org_id == str(current))
                )
            ).scalar_one_or_none()
            current = UUID(parent) if parent else None
            if current is not None:
                chain.append(current)
        return chain

    async def add(self, org: Org) -> bool:
        """Insert a new org; ``False`` (and nothing written) when its id is taken already.

        One statement instead of a look-up and an insert: the primary key decides.
        """
        stamp = now()
        inserted = (
            await self.session.execute(
                ignoring_duplicates(self.session, orgs, on=["org_id"], returning=orgs.c.org_id),
                {**_columns(org), "created_at": stamp, "updated_at": stamp, "version": 1},
            )
        ).scalar_one_or_none()
        if inserted is None:
            return False
        self._versions[org.org_id] = 1
        await self._write_units(org)
        return True

    async def save(self, org: Org) -> None:
        """Write back a loaded org; a concurrent change in between is detected by version."""
        version = self._versions[org.org_id]
        result = await self.session.execute(
            update(orgs)
            .where(orgs.c.org_id == str(org.org_id), orgs.c.version == version)
            .values(**_columns(org), updated_at=now(), version=version + 1)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise ConcurrentChange(org.org_id)
        self._versions[org.org_id] = version + 1
        await self.session.execute(delete(org_units).where(org_units.c.org_id == str(org.org_id)))
        await self._write_units(org)

    async def _write_units(self, org: Org) -> None:
        if org.units:
            await self.session.execute(
                insert(org_units),
                [
                    {
                        "unit_id": str(u.unit_id),
                        "org_id": str(org.org_id),
                        "name": u.name,
                        "position": i,
                    }
                    for i, u in enumerate(org.units)
                ],
            )

    async def record(
        self,
        org_id: UUID,
        event: Envelope,
        command: Envelope,
        *,
        document: dict[str, Any] | None,
        effective_date: date,
    ) -> None:
        """Append one change to the org's history (written with the others at ``flush``)."""
        self._history.append(
            dict(
                org_id=str(org_id),
                event_id=event.id,
                event_type=event.type,
                command_id=command.id,
                document=document,
                effective_date=effective_date,
                recorded_at=now(),
                actor_id=command.actorid,
                actor_region=command.actorregion,
                data=event.data,
            )
        )

    def discard(self) -> None:
        """Forget buffered history rows (the transaction is being rolled back)."""
        self._history = []

    async def flush(self) -> None:
        """Write the buffered history rows in one statement, in the order they were recorded."""
        if self._history:
            rows, self._history = self._history, []
            await self.session.execute(_INSERT_HISTORY, rows)


class ConcurrentChange(TransientError):
    """The org changed between load and save; the whole command is retried."""

    def __init__(self, org_id: UUID) -> None:
        super().__init__(f"org {org_id} changed concurrently")


# Built once, values passed as parameters: building the statement with its values each time
# (and its cache key from them) cost more than running it.
_INSERT_HISTORY = insert(org_history)


def _columns(org: Org) -> dict[str, Any]:
    return {
        "org_id": str(org.org_id),
        "name": org.name,
        "kind": org.kind.value,
        "division_code": org.division_code,
        "parent_org_id": str(org.parent_org_id) if org.parent_org_id else None,
        "uscc": org.uscc,
        "grade": org.grade,
        "alt_names": list(org.alt_names),
        "functions": list(org.functions),
        "funding": org.funding.value if org.funding else None,
        "status": org.status.value,
        "effective_date": org.effective_date,
    }
