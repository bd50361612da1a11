"""Reads and writes the org projection and the establishment ledger; appends the ledger history.

The ledger's invariants are guarded in the database: approved quota changes through conditional
updates (``… WHERE occupied + reserved <= :approved``) and CHECK constraints, and every change of
a category's approved quota or limits first locks that province's guard row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import date
from functools import cache
from typing import Any
from uuid import UUID

from sqlalchemy import (
    ColumnElement,
    Row,
    Update,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    select,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.codes import Category, Funding, LeaderPost, OrgKind, OrgStatus
from contracts.envelope import Envelope, now
from contracts.identifiers import division_prefix
from services.quota.adapters.orm import (
    division_totals,
    establishment,
    leader_posts,
    ledger_guards,
    notices,
    org_projection,
    quota_ledger,
    region_limits,
    slot_requests,
    slots,
)
from services.quota.domain.model import (
    Establishment,
    LeaderPosts,
    Notice,
    NoticeStatus,
    OrgRef,
)
from services.runtime.db import (
    dialect_insert,
    ignoring_duplicates,
    insert_rows,
    row_looked_up,
)
from services.runtime.prepared import Kept

ORG_LEVEL = ""
"""The ``unit_id`` of an org's own leader posts (as against one of its internal units)."""


# Statements of the slot path (OccupySlot and the like, the hottest commands), built once here and
# executed with parameters: building a statement and its cache key costs more CPU than running it
# (SQLAlchemy memoizes the cache key of a statement object and caches its compiled form).


def _param(name: str, column: Any) -> Any:
    """A bound parameter typed as ``column`` (so its value is processed as the column's)."""
    return bindparam(name, type_=column.type)


_ORG_GET = select(org_projection).where(org_projection.c.org_id == bindparam("b_org_id"))

_EST_KEY = (
    establishment.c.org_id == bindparam("b_org_id"),
    establishment.c.category == bindparam("b_category"),
)


def _occupying(k: int | ColumnElement[Any]) -> Update:
    """Turn ``k`` reserved places of one establishment row into occupied ones (the commands
    of one fetch go through ``_occupying_groups``): each step alone needs a reserved place, and
    occupying one leaves occupied + reserved as it was."""
    e = establishment.c
    return (
        update(establishment)
        .where(*_EST_KEY, e.reserved >= k, e.occupied + e.reserved <= e.approved)
        .values(
            reserved=e.reserved - k,
            occupied=e.occupied + k,
            version=e.version + 1,
            updated_at=_param("b_now", e.updated_at),
        )
        .returning(e.occupied)
    )


_OCCUPY_RESERVED = _occupying(1)


@cache
def _occupying_groups(groups: int) -> Update:
    """``_occupying`` for ``groups`` establishment rows at once, each (``b_org_id_<i>``,
    ``b_category_<i>``) with its own ``b_k_<i>``: a row whose steps do not all fit is left as
    it is; the rows changed come back with their key and occupied count."""
    e = establishment.c
    want = _group_rows(groups, org_id=e.org_id, category=e.category, k=e.reserved).subquery("want")
    return (
        update(establishment)
        .where(
            e.org_id == want.c.org_id,
            e.category == want.c.category,
            e.reserved >= want.c.k,
            e.occupied + e.reserved <= e.approved,
        )
        .values(
            reserved=e.reserved - want.c.k,
            occupied=e.occupied + want.c.k,
            version=e.version + 1,
            updated_at=_param("b_now", e.updated_at),
        )
        .returning(e.org_id, e.category, e.occupied)
    )


def _group_rows(groups: int, **columns: Any) -> Any:
    """A row of parameters (``b_<name>_<i>``, typed as ``columns[name]``) per group, as one
    ``SELECT … UNION ALL SELECT …`` (a ``VALUES`` list names its columns differently on SQLite
    and PostgreSQL)."""
    rows = [
        select(*(_param(f"b_{name}_{i}", col).label(name) for name, col in columns.items()))
        for i in range(groups)
    ]
    return rows[0] if groups == 1 else union_all(*rows)


def _group_params(groups: Sequence[dict[str, Any]], **shared: Any) -> dict[str, Any]:
    """The parameters of a statement over ``_group_rows``: each group's values under the
    names ``_group_rows`` gave them, and the ``shared`` ones as they are."""
    params = dict(shared)
    for i, group in enumerate(groups):
        params.update({f"b_{name}_{i}": value for name, value in group.items()})
    return params


_EST_GET = select(
    establishment.c.approved, establishment.c.occupied, establishment.c.reserved
).where(*_EST_KEY)
_VACATE = (
    update(establishment)
    .where(*_EST_KEY, establishment.c.occupied >= 1)
    .values(
        occupied=establishment.c.occupied - 1,
        version=establishment.c.version + 1,
        updated_at=_param("b_now", establishment.c.updated_at),
    )
    .returning(establishment.c.occupied)
)
_RESERVE_AGAIN = (
    update(establishment)
    .where(*_EST_KEY, establishment.c.occupied >= 1)
    .values(
        occupied=establishment.c.occupied - 1,
        reserved=establishment.c.reserved + 1,
        version=establishment.c.version + 1,
        updated_at=_param("b_now", establishment.c.updated_at),
    )
)


def _leader_post_change(held: Any, approved: Any, step: int) -> Any:
    """Take (``step`` 1, within the approved count) or free (-1) one leader post."""
    within = held + 1 <= approved if step > 0 else held >= 1
    return (
        update(leader_posts)
        .where(
            leader_posts.c.org_id == bindparam("b_org_id"),
            leader_posts.c.unit_id == bindparam("b_unit_id"),
            within,
        )
        .values(
            {
                held.name: held + step,
                "version": leader_posts.c.version + 1,
                "updated_at": _param("b_now", leader_posts.c.updated_at),
            }
        )
    )


_POST_COLUMNS = {
    LeaderPost.PRINCIPAL: (leader_posts.c.principal_held, leader_posts.c.principal),
    LeaderPost.DEPUTY: (leader_posts.c.deputy_held, leader_posts.c.deputy),
}
_HOLD_POST = {post: _leader_post_change(*cols, 1) for post, cols in _POST_COLUMNS.items()}
_FREE_POST = {post: _leader_post_change(*cols, -1) for post, cols in _POST_COLUMNS.items()}

_LEDGER_INSERT = insert(quota_ledger)

_NOTICE_GET = select(notices).where(notices.c.notice_no == bindparam("b_notice_no"))


def usable_notice(on: date | ColumnElement[Any], k: int | ColumnElement[Any] = 1) -> list[Any]:
    """The conditions on a notice for ``k`` of its places to be taken on the day ``on``: issued,
    not lapsed that day, ``k`` places left (the org and category are the caller's)."""
    n = notices.c
    return [n.status == NoticeStatus.ISSUED.value, n.valid_until >= on, n.used + k <= n.count]


def _taking(k: int | ColumnElement[Any]) -> Update:
    """Take ``k`` places of a notice issued to the org for the category, open and unexpired on
    the day, only when all ``k`` fit (``k`` a number, or a parameter for the commands of one
    fetch at once); the places used after."""
    n = notices.c
    return (
        update(notices)
        .where(
            n.notice_no == bindparam("b_notice_no"),
            n.org_id == bindparam("b_org_id"),
            n.category == bindparam("b_category"),
            *usable_notice(_param("b_on", n.valid_until), k),
        )
        .values(used=n.used + k, version=n.version + 1)
        .returning(n.used)
    )


_NOTICE_TAKE_ONE = _taking(1)


@cache
def _taking_groups(groups: int) -> Update:
    """``_taking`` for ``groups`` notices at once, each (``b_notice_no_<i>``, ``b_org_id_<i>``,
    ``b_category_<i>``) with its own ``b_k_<i>``, all on the day ``b_on``: a notice whose places
    do not all fit is left as it is; the notices changed come back with their places used."""
    n = notices.c
    want = _group_rows(
        groups, notice_no=n.notice_no, org_id=n.org_id, category=n.category, k=n.used
    ).subquery("want")
    return (
        update(notices)
        .where(
            n.notice_no == want.c.notice_no,
            n.org_id == want.c.org_id,
            n.category == want.c.category,
            *usable_notice(_param("b_on", n.valid_until), want.c.k),
        )
        .values(used=n.used + want.c.k, version=n.version + 1)
        .returning(n.notice_no, n.used)
    )


_NOTICE_GIVE_BACK = (
    update(notices)
    .where(
        notices.c.notice_no == bindparam("b_notice_no"),
        notices.c.status == NoticeStatus.ISSUED.value,
        notices.c.used >= 1,
    )
    .values(used=notices.c.used - 1, version=notices.c.version + 1)
    .returning(*notices.c)
)

_REQUEST_GET = select(slot_requests).where(slot_requests.c.request_id == bindparam("b_request_id"))
_REQUEST_DONE = (
    update(slot_requests)
    .where(slot_requests.c.request_id == bindparam("b_request_id"))
    .values(event_id=bindparam("b_event_id"), event_type=bindparam("b_event_type"))
)
_SLOT_HELD_BY = select(slots).where(slots.c.person_id == bindparam("b_person_id"))
_SLOT_REMOVE = (
    delete(slots)
    .where(slots.c.person_id == bindparam("b_person_id"), slots.c.org_id == bindparam("b_org_id"))
    .returning(*slots.c)
)
_SLOT_REMOVE_OF_REQUEST = (
    delete(slots)
    .where(
        slots.c.person_id == bindparam("b_person_id"),
        slots.c.org_id == bindparam("b_org_id"),
        slots.c.request_id == bindparam("b_request_id"),
    )
    .returning(*slots.c)
)


# A slot request is claimed with the org it names as the org projection has it (all ``None``
# when the projection has no such org): every slot handler reads that org next, and a read of
# its own would be a statement more.
_CLAIMED_WITH_ORG = (
    slot_requests.c.request_id,
    *row_looked_up(
        org_projection,
        ("status", "kind", "division_code", "name"),
        key="org_id",
        of=slot_requests,
        prefix="org_",
    ),
)


def _notice_taken(notice_no: str, org_id: UUID, category: Category, on: date) -> dict[str, Any]:
    """The parameters of ``_NOTICE_TAKE_ONE``."""
    return {
        "b_notice_no": notice_no,
        "b_org_id": str(org_id),
        "b_category": category.value,
        "b_on": on,
    }


def _counts_up_to(after: int, k: int) -> range:
    """What ``k`` one-place steps would each have returned, the last leaving ``after``."""
    return range(after - k + 1, after + 1)


def _org_ref(
    org_id: UUID | str, status: str, kind: str | None, division_code: str | None, name: str | None
) -> OrgRef:
    return OrgRef(
        org_id=org_id if isinstance(org_id, UUID) else UUID(org_id),
        status=OrgStatus(status),
        kind=OrgKind(kind) if kind else None,
        division_code=division_code,
        name=name,
    )


class OrgProjection:
    """Orgs as the orgs events describe them.

    An org read once is kept for the rest of the transaction (the commands of one fetch share
    one, and often name the same orgs); every write here forgets what was kept.
    """

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._seen: dict[UUID, OrgRef] = {}

    async def get(self, org_id: UUID) -> OrgRef | None:
        if (seen := self._seen.get(org_id)) is not None:
            return seen
        row = (await self.session.execute(_ORG_GET, {"b_org_id": str(org_id)})).one_or_none()
        if row is None:
            return None
        org = _org_ref(row.org_id, row.status, row.kind, row.division_code, row.name)
        self._seen[org_id] = org
        return org

    def seen_with(self, org_id: UUID, row: Row[Any]) -> None:
        """Keep the org as read by the statement of ``row`` (``Slots.claim_request``'s) for
        the rest of the transaction, as ``get`` keeps what it reads: its ``org_…`` columns,
        all ``None`` when the projection has no such org (then nothing is kept)."""
        if row.org_status is not None:
            self._seen[org_id] = _org_ref(
                org_id, row.org_status, row.org_kind, row.org_division_code, row.org_name
            )

    async def registered(
        self,
        org_id: UUID,
        *,
        name: str,
        kind: OrgKind,
        division_code: str,
        parent_org_id: UUID | None,
        status: OrgStatus,
    ) -> None:
        """Keep a registered org; a merge seen before the registration keeps its status."""
        self._seen.clear()
        values = {
            "name": name,
            "kind": kind.value,
            "division_code": division_code,
            "parent_org_id": str(parent_org_id) if parent_org_id else None,
            "updated_at": now(),
        }
        done = await self.session.execute(
            update(org_projection).where(org_projection.c.org_id == str(org_id)).values(**values)
        )
        if done.rowcount == 0:  # type: ignore[attr-defined]
            await self.session.execute(
                insert(org_projection).values(org_id=str(org_id), status=status.value, **values)
            )

    async def moved(self, org_id: UUID, parent_org_id: UUID, division_code: str) -> None:
        self._seen.clear()
        await self.session.execute(
            update(org_projection)
            .where(org_projection.c.org_id == str(org_id))
            .values(parent_org_id=str(parent_org_id), division_code=division_code, updated_at=now())
        )

    async def renamed(self, org_id: UUID, name: str) -> None:
        self._seen.clear()
        await self.session.execute(
            update(org_projection)
            .where(org_projection.c.org_id == str(org_id))
            .values(name=name, updated_at=now())
        )

    async def set_status(self, org_ids: Iterable[UUID], status: OrgStatus) -> None:
        """Mark orgs merged or abolished; an org not seen yet is kept as a bare status row."""
        self._seen.clear()
        ids = [str(i) for i in org_ids]
        stamp = now()
        await self.session.execute(
            update(org_projection)
            .where(org_projection.c.org_id.in_(ids))
            .values(status=status.value, updated_at=stamp)
        )
        await insert_rows(
            self.session,
            ignoring_duplicates(self.session, org_projection),
            [{"org_id": i, "status": status.value, "updated_at": stamp} for i in ids],
        )


class Ledger:
    """Establishment, region limits and leader posts, and their append-only history.

    History rows are kept here and written by ``flush`` (one statement for all of them), which
    the unit of work calls before it commits; nothing reads the history in the transaction that
    writes it.
    """

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._history: list[dict[str, Any]] = []
        # What ``occupy_many`` did, by (org, category), for ``occupy_reserved`` to hand out.
        self.occupied_kept: Kept[int] = Kept()

    # guards ---------------------------------------------------------------------------------

    async def lock(self, province_codes: Iterable[str], category: Category) -> None:
        """Lock the guard rows of these provinces for ``category``, in a fixed order."""
        codes = sorted(set(province_codes))
        await insert_rows(
            self.session,
            ignoring_duplicates(self.session, ledger_guards),
            [{"province_code": c, "category": category.value} for c in codes],
        )
        await self.session.execute(
            select(ledger_guards.c.province_code)
            .where(
                ledger_guards.c.province_code.in_(codes),
                ledger_guards.c.category == category.value,
            )
            .order_by(ledger_guards.c.province_code)
            .with_for_update()
        )

    # establishment --------------------------------------------------------------------------

    async def establishment(self, org_id: UUID, category: Category) -> Establishment:
        """The org's establishment of ``category``; all zero if none was ever approved."""
        row = (
            await self.session.execute(
                _EST_GET, {"b_org_id": str(org_id), "b_category": category.value}
            )
        ).one_or_none()
        if row is None:
            return Establishment(org_id=org_id, category=category)
        return Establishment(
            org_id=org_id,
            category=category,
            approved=row.approved,
            occupied=row.occupied,
            reserved=row.reserved,
        )

    async def set_approved(
        self, org_id: UUID, category: Category, approved: int, funding: Funding | None
    ) -> bool:
        """Set the approved total unless it would fall below occupied + reserved."""
        values: dict[str, Any] = {
            "approved": approved,
            "version": establishment.c.version + 1,
            "updated_at": now(),
        }
        if funding is not None:
            values["funding"] = funding.value
        return await self._change(
            org_id, category, approved, values, first=approved, funding=funding
        )

    async def add_approved(self, org_id: UUID, category: Category, amount: int) -> bool:
        """Change the approved total by ``amount`` unless it would fall below what is held."""
        values = {
            "approved": establishment.c.approved + amount,
            "version": establishment.c.version + 1,
            "updated_at": now(),
        }
        new_total = establishment.c.approved + amount
        return await self._change(org_id, category, new_total, values, first=amount)

    async def _change(
        self,
        org_id: UUID,
        category: Category,
        approved: Any,
        values: dict[str, Any],
        *,
        first: int,
        funding: Funding | None = None,
    ) -> bool:
        """Update the row where nothing held exceeds ``approved``; without a row, insert one
        approving ``first`` places. One statement either way (an upsert whose update is
        conditional), so an org's first approval costs what a later one does."""
        held = establishment.c.occupied + establishment.c.reserved
        if first < 0:  # nothing is held without a row, but a total is never negative
            done = await self.session.execute(
                update(establishment)
                .where(*self._est_key(org_id, category), held <= approved)
                .values(**values)
            )
            return done.rowcount == 1  # type: ignore[attr-defined]
        stmt = dialect_insert(self.session, establishment).values(
            org_id=str(org_id),
            category=category.value,
            approved=first,
            occupied=0,
            reserved=0,
            funding=funding.value if funding else None,
            version=1,
            updated_at=now(),
        )
        done = await self.session.execute(
            stmt.on_conflict_do_update(
                index_elements=["org_id", "category"], set_=values, where=held <= approved
            )
        )
        return done.rowcount == 1  # type: ignore[attr-defined]

    async def used(self, division_code: str, category: Category) -> int:
        """Approved places of ``category`` held by orgs in the division and every one below it:
        one indexed read of the maintained roll-up (``division_totals``, kept by triggers in
        this same transaction), not a scan of the subtree."""
        return (await self.used_in([division_code], category))[division_code]

    async def used_in(self, division_codes: Iterable[str], category: Category) -> dict[str, int]:
        """``used`` of several divisions (a division and those enclosing it) in one read."""
        prefixes = {code: division_prefix(code) for code in division_codes}
        if not prefixes:
            return {}
        t = division_totals
        rows = await self.session.execute(
            select(t.c.prefix, func.sum(t.c.approved))
            .where(t.c.prefix.in_(set(prefixes.values())), t.c.category == category.value)
            .group_by(t.c.prefix)
        )
        totals = {prefix: int(total or 0) for prefix, total in rows}
        return {code: totals.get(prefix, 0) for code, prefix in prefixes.items()}

    # region limits --------------------------------------------------------------------------

    async def limits(self, division_codes: Iterable[str], category: Category) -> dict[str, int]:
        """The limits of ``category`` among these divisions (those that have one)."""
        rows = await self.session.execute(
            select(region_limits.c.division_code, region_limits.c.limit).where(
                region_limits.c.division_code.in_(list(division_codes)),
                region_limits.c.category == category.value,
            )
        )
        return {r.division_code: r.limit for r in rows}

    async def limits_below(self, division_code: str, category: Category) -> dict[str, int]:
        """The limits of ``category`` of the divisions inside ``division_code`` (not itself)."""
        rows = await self.session.execute(
            select(region_limits.c.division_code, region_limits.c.limit).where(
                region_limits.c.division_code.like(f"{division_prefix(division_code)}%"),
                region_limits.c.division_code != division_code,
                region_limits.c.category == category.value,
            )
        )
        return {r.division_code: r.limit for r in rows}

    async def set_limit(self, division_code: str, category: Category, limit: int) -> None:
        done = await self.session.execute(
            update(region_limits)
            .where(
                region_limits.c.division_code == division_code,
                region_limits.c.category == category.value,
            )
            .values(limit=limit, version=region_limits.c.version + 1, updated_at=now())
        )
        if done.rowcount == 0:  # type: ignore[attr-defined]
            await self.session.execute(
                insert(region_limits).values(
                    division_code=division_code,
                    category=category.value,
                    limit=limit,
                    version=1,
                    updated_at=now(),
                )
            )

    # leader posts ---------------------------------------------------------------------------

    async def leader_posts(self, org_id: UUID, unit_id: UUID | None) -> LeaderPosts | None:
        row = (
            await self.session.execute(
                select(leader_posts).where(
                    leader_posts.c.org_id == str(org_id),
                    leader_posts.c.unit_id == _unit_key(unit_id),
                )
            )
        ).one_or_none()
        if row is None:
            return None
        return LeaderPosts(
            principal=row.principal,
            deputy=row.deputy,
            principal_held=row.principal_held,
            deputy_held=row.deputy_held,
        )

    async def set_leader_posts(
        self, org_id: UUID, unit_id: UUID | None, principal: int, deputy: int
    ) -> bool:
        """Set the approved posts unless they would fall below the posts held (one upsert: the
        first setting inserts the row)."""
        stmt = dialect_insert(self.session, leader_posts).values(
            org_id=str(org_id),
            unit_id=_unit_key(unit_id),
            principal=principal,
            deputy=deputy,
            principal_held=0,
            deputy_held=0,
            version=1,
            updated_at=now(),
        )
        done = await self.session.execute(
            stmt.on_conflict_do_update(
                index_elements=["org_id", "unit_id"],
                set_={
                    "principal": principal,
                    "deputy": deputy,
                    "version": leader_posts.c.version + 1,
                    "updated_at": now(),
                },
                where=(leader_posts.c.principal_held <= principal)
                & (leader_posts.c.deputy_held <= deputy),
            )
        )
        return done.rowcount == 1  # type: ignore[attr-defined]

    # reservations and occupation ----------------------------------------------------------
    # Each change is one conditional UPDATE: occupied + reserved <= approved is checked by the
    # database against the row as it is when the update takes its lock, never against a read.

    def _est_key(self, org_id: UUID, category: Category) -> tuple[Any, Any]:
        return (
            establishment.c.org_id == str(org_id),
            establishment.c.category == category.value,
        )

    async def reserve(self, org_id: UUID, category: Category, count: int) -> bool:
        """Reserve ``count`` places unless fewer than that are vacant."""
        held = establishment.c.occupied + establishment.c.reserved
        done = await self.session.execute(
            update(establishment)
            .where(*self._est_key(org_id, category), establishment.c.approved - held >= count)
            .values(
                reserved=establishment.c.reserved + count,
                version=establishment.c.version + 1,
                updated_at=now(),
            )
        )
        return done.rowcount == 1  # type: ignore[attr-defined]

    async def unreserve(self, org_id: UUID, category: Category, count: int) -> None:
        """Give back ``count`` reserved places (of a cancelled or expired notice)."""
        if count <= 0:
            return
        done = await self.session.execute(
            update(establishment)
            .where(*self._est_key(org_id, category), establishment.c.reserved >= count)
            .values(
                reserved=establishment.c.reserved - count,
                version=establishment.c.version + 1,
                updated_at=now(),
            )
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise RuntimeError(f"ledger out of step: {count} reserved places of {org_id} missing")

    async def occupy_reserved(self, org_id: UUID, category: Category) -> int | None:
        """Turn one reserved place into an occupied one; the new occupied count, or ``None``
        when nothing is reserved or the org is over its approved count. Done already, with
        its outcome kept, when ``occupy_many`` was given it."""
        key = (str(org_id), category.value)
        if key in self.occupied_kept:
            return self.occupied_kept.take(key, key)
        row = (
            await self.session.execute(
                _OCCUPY_RESERVED,
                {"b_org_id": str(org_id), "b_category": category.value, "b_now": now()},
            )
        ).one_or_none()
        return None if row is None else int(row.occupied)

    async def occupy_many(self, wanted: Sequence[tuple[UUID, Category, int]]) -> None:
        """``occupy_reserved`` ``k`` times for each (org, category, ``k``) of ``wanted`` (each
        org and category once), in one statement: a row takes all its ``k`` steps or none. The
        occupied count each step would have returned, in order, is kept for the
        ``occupy_reserved`` calls that ask for it; nothing is kept for a row left as it was."""
        if not wanted:
            return
        groups = [
            {"org_id": str(org_id), "category": category.value, "k": k}
            for org_id, category, k in wanted
        ]
        steps = {(g["org_id"], g["category"]): g["k"] for g in groups}
        rows = await self.session.execute(
            _occupying_groups(len(groups)), _group_params(groups, b_now=now())
        )
        for row in rows:
            key = (row.org_id, row.category)
            self.occupied_kept.keep(key, key, _counts_up_to(int(row.occupied), steps[key]))

    async def vacate(self, org_id: UUID, category: Category) -> int:
        """Free one occupied place; the new occupied count."""
        row = (
            await self.session.execute(
                _VACATE, {"b_org_id": str(org_id), "b_category": category.value, "b_now": now()}
            )
        ).one_or_none()
        if row is None:
            raise RuntimeError(f"ledger out of step: no occupied {category} place of {org_id}")
        return int(row.occupied)

    async def reserve_again(self, org_id: UUID, category: Category) -> None:
        """Undo ``occupy_reserved``: the occupied place goes back to its notice's reservation."""
        done = await self.session.execute(
            _RESERVE_AGAIN,
            {"b_org_id": str(org_id), "b_category": category.value, "b_now": now()},
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise RuntimeError(f"ledger out of step: no occupied {category} place of {org_id}")

    async def hold_leader_post(self, org_id: UUID, unit_id: UUID | None, post: LeaderPost) -> bool:
        """Take one ``post`` unless every approved one is held."""
        done = await self.session.execute(
            _HOLD_POST[post],
            {"b_org_id": str(org_id), "b_unit_id": _unit_key(unit_id), "b_now": now()},
        )
        return done.rowcount == 1  # type: ignore[attr-defined]

    async def free_leader_post(self, org_id: UUID, unit_id: UUID | None, post: LeaderPost) -> None:
        await self.session.execute(
            _FREE_POST[post],
            {"b_org_id": str(org_id), "b_unit_id": _unit_key(unit_id), "b_now": now()},
        )

    # history --------------------------------------------------------------------------------

    async def record(
        self,
        event: Envelope,
        command: Envelope,
        *,
        document: dict[str, Any] | None,
        effective_date: date,
        after: dict[str, Any],
        before: dict[str, Any] | None = None,
        org_id: UUID | None = None,
        unit_id: UUID | None = None,
        division_code: str | None = None,
        category: Category | None = None,
    ) -> None:
        """Append one change to the ledger's history (written by ``flush``)."""
        self._history.append(
            {
                "event_id": event.id,
                "event_type": event.type,
                "command_id": command.id,
                "org_id": str(org_id) if org_id else None,
                "unit_id": str(unit_id) if unit_id else None,
                "division_code": division_code,
                "category": category.value if category else None,
                "document": document,
                "effective_date": effective_date,
                "recorded_at": now(),
                "actor_id": command.actorid,
                "actor_region": command.actorregion,
                "before": before,
                "after": after,
            }
        )

    async def flush(self) -> None:
        """Write the history rows recorded so far, in their order, in one statement."""
        if self._history:
            rows, self._history = self._history, []
            await insert_rows(self.session, _LEDGER_INSERT, rows)

    def discard(self) -> None:
        """Forget the history rows not written yet (the transaction is rolled back)."""
        self._history = []


class Notices:
    """Quota-use notices (用编通知单)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        # What ``use_many`` did, by notice, for ``use_one`` to hand out.
        self.used_kept: Kept[int] = Kept()

    async def get(self, notice_no: str) -> Notice | None:
        row = (await self.session.execute(_NOTICE_GET, {"b_notice_no": notice_no})).one_or_none()
        return None if row is None else _notice(row)

    async def add(
        self,
        notice_no: str,
        org_id: UUID,
        category: Category,
        count: int,
        valid_until: date,
        document: dict[str, Any],
    ) -> bool:
        """Keep a new notice; ``False`` if its number is taken."""
        stmt = ignoring_duplicates(self.session, notices, returning=notices.c.notice_no)
        row = {
            "notice_no": notice_no,
            "org_id": str(org_id),
            "category": category.value,
            "count": count,
            "used": 0,
            "valid_until": valid_until,
            "status": NoticeStatus.ISSUED.value,
            "document": document,
            "issued_at": now(),
            "closed_at": None,
            "version": 1,
        }
        return (await insert_rows(self.session, stmt, [row])).first() is not None

    async def use_one(
        self, notice_no: str, org_id: UUID, category: Category, on: date
    ) -> int | None:
        """Consume one place of a notice issued to ``org_id`` for ``category`` that is open and
        unexpired on ``on``; the places used after, or ``None`` when it may give none. Done
        already, with its outcome kept, when ``use_many`` was given it."""
        if notice_no in self.used_kept:
            return self.used_kept.take(notice_no, (str(org_id), category.value, on))
        row = (
            await self.session.execute(
                _NOTICE_TAKE_ONE, _notice_taken(notice_no, org_id, category, on)
            )
        ).one_or_none()
        return None if row is None else int(row.used)

    async def use_many(
        self, wanted: Sequence[tuple[str, UUID, Category, int]], on: date
    ) -> set[str]:
        """``use_one`` ``k`` times for each (notice, org, category, ``k``) of ``wanted`` (each
        notice once), in one statement: a notice gives all its ``k`` places or none. The places
        used after each call, in order, are kept for the ``use_one`` calls that ask for them;
        the notices that gave their places."""
        if not wanted:
            return set()
        groups = [
            {"notice_no": notice_no, "org_id": str(org_id), "category": category.value, "k": k}
            for notice_no, org_id, category, k in wanted
        ]
        rows = await self.session.execute(
            _taking_groups(len(groups)), _group_params(groups, b_on=on)
        )
        used = {row.notice_no: int(row.used) for row in rows}
        for notice_no, org_id, category, k in wanted:
            if notice_no in used:
                asked = (str(org_id), category.value, on)
                self.used_kept.keep(notice_no, asked, _counts_up_to(used[notice_no], k))
        return set(used)

    async def give_back(self, notice_no: str) -> Notice | None:
        """Return one used place to a notice that is still issued (a cancelled occupation);
        the notice after, or ``None`` when it is closed (its places are no longer reserved)."""
        row = (
            await self.session.execute(_NOTICE_GIVE_BACK, {"b_notice_no": notice_no})
        ).one_or_none()
        return None if row is None else _notice(row)

    async def close(self, notice_no: str, status: NoticeStatus) -> Notice | None:
        """Cancel or expire an issued notice; the notice as it was, or ``None`` if closed."""
        row = (
            await self.session.execute(
                update(notices)
                .where(
                    notices.c.notice_no == notice_no,
                    notices.c.status == NoticeStatus.ISSUED.value,
                )
                .values(status=status.value, closed_at=now(), version=notices.c.version + 1)
                .returning(*notices.c)
            )
        ).one_or_none()
        if row is None:
            return None
        return replace(_notice(row), status=NoticeStatus.ISSUED)

    async def lapsed(
        self, on: date, *, org_id: UUID | None = None, category: Category | None = None
    ) -> list[str]:
        """Numbers of issued notices whose last day was before ``on``."""
        query = select(notices.c.notice_no).where(
            notices.c.status == NoticeStatus.ISSUED.value, notices.c.valid_until < on
        )
        if org_id is not None:
            query = query.where(notices.c.org_id == str(org_id))
        if category is not None:
            query = query.where(notices.c.category == category.value)
        return list((await self.session.execute(query.order_by(notices.c.notice_no))).scalars())


@dataclass(frozen=True)
class RequestClaim:
    """A slot request taking effect (what ``Slots.claim_request`` records)."""

    request_id: UUID
    request_type: str
    command_id: str
    person_id: UUID
    org_id: UUID
    event_id: str | None = None
    event_type: str | None = None

    def row(self) -> dict[str, Any]:
        return {
            "request_id": str(self.request_id),
            "request_type": self.request_type,
            "command_id": self.command_id,
            "person_id": str(self.person_id),
            "org_id": str(self.org_id),
            "event_id": self.event_id,
            "event_type": self.event_type,
            "created_at": now(),
        }


@dataclass(frozen=True)
class NewSlot:
    """The slot a person comes to hold (what ``Slots.add`` records)."""

    person_id: UUID
    org_id: UUID
    category: Category
    unit_id: UUID | None
    leader_post: LeaderPost | None
    notice_no: str
    request_id: UUID

    def row(self) -> dict[str, Any]:
        return {
            "person_id": str(self.person_id),
            "org_id": str(self.org_id),
            "category": self.category.value,
            "unit_id": _unit_key(self.unit_id),
            "leader_post": self.leader_post.value if self.leader_post else None,
            "notice_no": self.notice_no,
            "request_id": str(self.request_id),
            "occupied_at": now(),
        }


class Slots:
    """The slot each person holds, and the slot requests that took effect."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        # What ``claim_many`` and ``add_many`` did, by request and by person, for
        # ``claim_request`` and ``add`` to hand out.
        self.claims_kept: Kept[Row[Any]] = Kept()
        self.added_kept: Kept[bool] = Kept()

    async def claim_request(
        self,
        request_id: UUID,
        request_type: str,
        command_id: str,
        person_id: UUID,
        org_id: UUID,
        *,
        event_id: str | None = None,
        event_type: str | None = None,
    ) -> Row[Any] | None:
        """Record a slot request as taking effect; ``None`` if its request_id already did.
        ``event_id`` and ``event_type``: the event it will end with, when known already (else
        ``request_done`` sets them). The row returned holds the ``request_id`` and the org
        ``org_id`` as the org projection has it (``org_status``, ``org_kind``,
        ``org_division_code``, ``org_name``; all ``None`` when unknown there):
        ``OrgProjection.seen_with`` keeps it. Done already, with its row kept, when
        ``claim_many`` was given it (``prepared_event`` tells the event it was given)."""
        claim = RequestClaim(
            request_id, request_type, command_id, person_id, org_id, event_id, event_type
        )
        key = str(request_id)
        if key in self.claims_kept:
            return self.claims_kept.take(key, claim)
        return (
            await self.session.execute(
                ignoring_duplicates(self.session, slot_requests, returning=_CLAIMED_WITH_ORG),
                claim.row(),
            )
        ).one_or_none()

    async def claim_many(self, claims: Sequence[RequestClaim]) -> int:
        """``claim_request`` for many requests (each request_id once) in one statement; the
        row of each one claimed is kept for the ``claim_request`` call that asks for it. A
        request that took effect before is not kept: its own call finds that out again. How
        many were claimed."""
        rows = await insert_rows(
            self.session,
            ignoring_duplicates(self.session, slot_requests, returning=_CLAIMED_WITH_ORG),
            [claim.row() for claim in claims],
        )
        # RETURNING gives no order to rely on: the rows are matched by request_id.
        claimed = {row.request_id: row for row in rows}
        for claim in claims:
            key = str(claim.request_id)
            if (row := claimed.get(key)) is not None:
                self.claims_kept.keep(key, claim, [row])
        return len(claimed)

    def prepared_event(self, request_id: UUID) -> str | None:
        """The id of the event the claim of ``request_id`` kept by ``claim_many`` ends with."""
        claim = self.claims_kept.asked(str(request_id))
        return claim.event_id if isinstance(claim, RequestClaim) else None

    async def request(self, request_id: UUID) -> Row[Any] | None:
        return (
            await self.session.execute(_REQUEST_GET, {"b_request_id": str(request_id)})
        ).one_or_none()

    async def request_done(self, request_id: UUID, event: Envelope) -> None:
        await self.session.execute(
            _REQUEST_DONE,
            {"b_request_id": str(request_id), "b_event_id": event.id, "b_event_type": event.type},
        )

    async def held_by(self, person_id: UUID) -> Row[Any] | None:
        return (
            await self.session.execute(_SLOT_HELD_BY, {"b_person_id": str(person_id)})
        ).one_or_none()

    async def add(
        self,
        person_id: UUID,
        org_id: UUID,
        category: Category,
        unit_id: UUID | None,
        leader_post: LeaderPost | None,
        notice_no: str,
        request_id: UUID,
    ) -> bool:
        """Record the slot ``person_id`` now holds; ``False`` if they hold one already. Done
        already when ``add_many`` was given it."""
        slot = NewSlot(person_id, org_id, category, unit_id, leader_post, notice_no, request_id)
        key = str(person_id)
        if key in self.added_kept:
            return self.added_kept.take(key, slot)
        row = (
            await self.session.execute(
                ignoring_duplicates(self.session, slots, returning=slots.c.person_id),
                slot.row(),
            )
        ).one_or_none()
        return row is not None

    async def add_many(self, new: Sequence[NewSlot]) -> int:
        """``add`` for many slots (each person once) in one statement; each one recorded is
        kept for the ``add`` call that asks for it. A person who holds a slot already is not
        kept: their own call finds that out again. How many were recorded."""
        rows = await insert_rows(
            self.session,
            ignoring_duplicates(self.session, slots, returning=slots.c.person_id),
            [slot.row() for slot in new],
        )
        added = set(rows.scalars())
        for slot in new:
            if (key := str(slot.person_id)) in added:
                self.added_kept.keep(key, slot, [True])
        return len(added)

    async def remove(
        self, person_id: UUID, org_id: UUID, request_id: UUID | None = None
    ) -> Row[Any] | None:
        """Take away the slot ``person_id`` holds in ``org_id`` (only the one taken by
        ``request_id``, when given); the slot, or ``None``."""
        params = {"b_person_id": str(person_id), "b_org_id": str(org_id)}
        if request_id is None:
            return (await self.session.execute(_SLOT_REMOVE, params)).one_or_none()
        params["b_request_id"] = str(request_id)
        return (await self.session.execute(_SLOT_REMOVE_OF_REQUEST, params)).one_or_none()


def _notice(row: Any) -> Notice:
    return Notice(
        notice_no=row.notice_no,
        org_id=UUID(row.org_id),
        category=Category(row.category),
        count=row.count,
        used=row.used,
        valid_until=row.valid_until,
        status=NoticeStatus(row.status),
    )


def unit_of(key: str) -> UUID | None:
    """The internal unit of a stored ``unit_id`` key (``None`` for the org itself)."""
    return UUID(key) if key else None


def _unit_key(unit_id: UUID | None) -> str:
    return str(unit_id) if unit_id else ORG_LEVEL


# division totals --------------------------------------------------------------------------------

PREFIX_WIDTHS = (2, 4, 6)
"""The division code prefixes ``division_totals`` keeps: province, city, county (GB/T 2260)."""


@dataclass(frozen=True)
class Totals:
    """Places summed over the establishment rows of a division subtree, and how many rows."""

    approved: int = 0
    occupied: int = 0
    reserved: int = 0
    orgs: int = 0


@dataclass(frozen=True)
class TotalsMismatch:
    """A stored division total that differs from a fresh sum over the orgs."""

    prefix: str
    category: str
    field: str
    stored: int
    counted: int


def _totals(row: Any) -> Totals:
    return Totals(int(row.approved), int(row.occupied), int(row.reserved), int(row.orgs))


class DivisionTotals:
    """The maintained roll-up (``division_totals``, kept by the database triggers of migration
    0003) and the subtree sums it stands for."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def of(self, code: str) -> dict[str, Totals]:
        """Per category, the totals of the division ``code`` and everything below it: one
        indexed read of its prefix's parts. Categories no org of the subtree has a row for are
        left out, as a sum over the subtree leaves them out."""
        t = division_totals
        rows = await self.session.execute(
            select(
                t.c.category,
                func.sum(t.c.approved).label("approved"),
                func.sum(t.c.occupied).label("occupied"),
                func.sum(t.c.reserved).label("reserved"),
                func.sum(t.c.orgs).label("orgs"),
            )
            .where(t.c.prefix == division_prefix(code))
            .group_by(t.c.category)
            .having(func.sum(t.c.orgs) > 0)
        )
        return {r.category: _totals(r) for r in rows}

    async def stored(self) -> dict[tuple[str, str], Totals]:
        """Every stored (prefix, category) total, its parts summed; all-zero totals left out."""
        t = division_totals
        rows = await self.session.execute(
            select(
                t.c.prefix,
                t.c.category,
                func.sum(t.c.approved).label("approved"),
                func.sum(t.c.occupied).label("occupied"),
                func.sum(t.c.reserved).label("reserved"),
                func.sum(t.c.orgs).label("orgs"),
            ).group_by(t.c.prefix, t.c.category)
        )
        found = {(r.prefix, r.category): _totals(r) for r in rows}
        return {key: value for key, value in found.items() if value != Totals()}

    async def counted(self) -> dict[tuple[str, str], Totals]:
        """The same totals summed afresh over ``establishment`` joined to ``org_projection``
        (the scan the stored totals replace), at every prefix width."""
        joined = establishment.join(
            org_projection, org_projection.c.org_id == establishment.c.org_id
        )
        levels = []
        for width in PREFIX_WIDTHS:
            prefix = func.substr(
                org_projection.c.division_code, literal_column("1"), literal_column(str(width))
            )
            levels.append(
                select(
                    prefix.label("prefix"),
                    establishment.c.category.label("category"),
                    func.sum(establishment.c.approved).label("approved"),
                    func.sum(establishment.c.occupied).label("occupied"),
                    func.sum(establishment.c.reserved).label("reserved"),
                    func.count().label("orgs"),
                )
                .select_from(joined)
                .where(
                    org_projection.c.division_code.is_not(None),
                    func.length(org_projection.c.division_code) >= width,
                )
                .group_by(prefix, establishment.c.category)
            )
        rows = await self.session.execute(union_all(*levels))
        return {(r.prefix, r.category): _totals(r) for r in rows}

    async def mismatches(self) -> list[TotalsMismatch]:
        """Every stored total that differs from a fresh sum (a missing total counts as 0);
        empty when the triggers kept the roll-up exact."""
        stored, counted = await self.stored(), await self.counted()
        found = []
        for key in sorted(set(stored) | set(counted)):
            a, b = stored.get(key, Totals()), counted.get(key, Totals())
            for name in ("approved", "occupied", "reserved", "orgs"):
                if getattr(a, name) != getattr(b, name):
                    found.append(
                        TotalsMismatch(key[0], key[1], name, getattr(a, name), getattr(b, name))
                    )
        return found
