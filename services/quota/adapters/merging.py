"""Data access for merging and closing orgs' establishments (机构合并 / 撤销)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.codes import Category
from contracts.envelope import now
from services.quota.adapters.orm import establishment, leader_posts, notices, slots
from services.quota.adapters.repository import ORG_LEVEL
from services.quota.domain.model import NoticeStatus


class Merging:
    """Moves what several orgs hold to one, and checks an org is empty, in the caller's
    transaction. Every statement is a set-based update; no count passes through Python."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def held(self, org_ids: Sequence[UUID]) -> list[Row[Any]]:
        """The establishment rows of these orgs that hold anything."""
        return list(
            (
                await self.session.execute(
                    select(establishment)
                    .where(
                        establishment.c.org_id.in_([str(o) for o in org_ids]),
                        (
                            establishment.c.approved
                            + establishment.c.occupied
                            + establishment.c.reserved
                        )
                        > 0,
                    )
                    .order_by(establishment.c.org_id, establishment.c.category)
                )
            ).all()
        )

    async def empty_sources(self, org_ids: Sequence[UUID]) -> None:
        await self.session.execute(
            update(establishment)
            .where(establishment.c.org_id.in_([str(o) for o in org_ids]))
            .values(
                approved=0,
                occupied=0,
                reserved=0,
                version=establishment.c.version + 1,
                updated_at=now(),
            )
        )

    async def add_to(
        self, org_id: UUID, category: Category, approved: int, occupied: int, reserved: int
    ) -> Row[Any]:
        """Add to the target's row (created if missing); the row after."""
        row = (
            await self.session.execute(
                update(establishment)
                .where(
                    establishment.c.org_id == str(org_id),
                    establishment.c.category == category.value,
                )
                .values(
                    approved=establishment.c.approved + approved,
                    occupied=establishment.c.occupied + occupied,
                    reserved=establishment.c.reserved + reserved,
                    version=establishment.c.version + 1,
                    updated_at=now(),
                )
                .returning(*establishment.c)
            )
        ).one_or_none()
        if row is not None:
            return row
        return (
            await self.session.execute(
                insert(establishment)
                .values(
                    org_id=str(org_id),
                    category=category.value,
                    approved=approved,
                    occupied=occupied,
                    reserved=reserved,
                    funding=None,
                    version=1,
                    updated_at=now(),
                )
                .returning(*establishment.c)
            )
        ).one()

    async def move_slots(self, sources: Sequence[UUID], target: UUID) -> int:
        done = await self.session.execute(
            update(slots)
            .where(slots.c.org_id.in_([str(o) for o in sources]))
            .values(org_id=str(target))
        )
        return int(done.rowcount)  # type: ignore[attr-defined]

    async def move_open_notices(self, sources: Sequence[UUID], target: UUID) -> list[str]:
        rows = await self.session.execute(
            update(notices)
            .where(
                notices.c.org_id.in_([str(o) for o in sources]),
                notices.c.status == NoticeStatus.ISSUED.value,
            )
            .values(org_id=str(target), version=notices.c.version + 1)
            .returning(notices.c.notice_no)
        )
        return sorted(rows.scalars())

    async def move_leader_posts(self, sources: Sequence[UUID], target: UUID) -> Row[Any] | None:
        """Internal units keep their posts under the target; the posts held at the sources' own
        level join the target's own level (its approved counts stay as they were). The target's
        own-level row after, if it has one."""
        ids = [str(o) for o in sources]
        await self.session.execute(
            update(leader_posts)
            .where(leader_posts.c.org_id.in_(ids), leader_posts.c.unit_id != ORG_LEVEL)
            .values(org_id=str(target), version=leader_posts.c.version + 1, updated_at=now())
        )
        held = (
            await self.session.execute(
                select(
                    func.coalesce(func.sum(leader_posts.c.principal_held), 0),
                    func.coalesce(func.sum(leader_posts.c.deputy_held), 0),
                ).where(leader_posts.c.org_id.in_(ids), leader_posts.c.unit_id == ORG_LEVEL)
            )
        ).one()
        await self.session.execute(
            delete(leader_posts).where(
                leader_posts.c.org_id.in_(ids), leader_posts.c.unit_id == ORG_LEVEL
            )
        )
        principal, deputy = int(held[0]), int(held[1])
        if principal or deputy:
            done = await self.session.execute(
                update(leader_posts)
                .where(leader_posts.c.org_id == str(target), leader_posts.c.unit_id == ORG_LEVEL)
                .values(
                    principal_held=leader_posts.c.principal_held + principal,
                    deputy_held=leader_posts.c.deputy_held + deputy,
                    version=leader_posts.c.version + 1,
                    updated_at=now(),
                )
            )
            if not done.rowcount:  # type: ignore[attr-defined]
                await self.session.execute(
                    insert(leader_posts).values(
                        org_id=str(target),
                        unit_id=ORG_LEVEL,
                        principal=0,
                        deputy=0,
                        principal_held=principal,
                        deputy_held=deputy,
                        version=1,
                        updated_at=now(),
                    )
                )
        return (
            await self.session.execute(
                select(leader_posts).where(
                    leader_posts.c.org_id == str(target), leader_posts.c.unit_id == ORG_LEVEL
                )
            )
        ).one_or_none()

    async def what_remains(self, org_id: UUID) -> dict[str, Any]:
        """Everything that keeps an org from being closed (empty when nothing does)."""
        remains: dict[str, Any] = {}
        rows = await self.held([org_id])
        if rows:
            remains["establishment"] = [
                {
                    "category": r.category,
                    "approved": r.approved,
                    "occupied": r.occupied,
                    "reserved": r.reserved,
                }
                for r in rows
            ]
        open_notices = (
            (
                await self.session.execute(
                    select(notices.c.notice_no).where(
                        notices.c.org_id == str(org_id),
                        notices.c.status == NoticeStatus.ISSUED.value,
                        notices.c.used < notices.c.count,
                    )
                )
            )
            .scalars()
            .all()
        )
        if open_notices:
            remains["open_notices"] = sorted(open_notices)
        posts = (
            await self.session.execute(
                select(
                    func.coalesce(
                        func.sum(leader_posts.c.principal_held + leader_posts.c.deputy_held), 0
                    )
                ).where(leader_posts.c.org_id == str(org_id))
            )
        ).scalar_one()
        if posts:
            remains["leader_posts_held"] = int(posts)
        people = (
            await self.session.execute(
                select(func.count()).select_from(slots).where(slots.c.org_id == str(org_id))
            )
        ).scalar_one()
        if people:
            remains["people"] = int(people)
        return remains
