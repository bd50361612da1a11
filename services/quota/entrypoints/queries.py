"""The quota query API (WIRE-CONTRACT §6): reads only; writes go through the command topic."""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from contracts import identifiers
from contracts.codes import Category
from contracts.identifiers import division_prefix
from services.quota.adapters.orm import (
    establishment,
    leader_posts,
    notices,
    org_projection,
    quota_ledger,
    region_limits,
)
from services.quota.adapters.repository import DivisionTotals, Totals, usable_notice
from services.quota.domain.model import Replay, today
from services.runtime.db import paged
from services.runtime.http import HttpError, Request, Router

_CATEGORIES = tuple(c.value for c in Category)


def _counts(approved: int, occupied: int, reserved: int) -> dict[str, int]:
    return {
        "approved": approved,
        "occupied": occupied,
        "reserved": reserved,
        "vacant": max(approved - occupied - reserved, 0),
    }


def _leader_posts(row: Any) -> dict[str, Any]:
    return {
        "unit_id": row.unit_id or None,
        "principal": row.principal,
        "deputy": row.deputy,
        "principal_held": row.principal_held,
        "deputy_held": row.deputy_held,
    }


async def _known_org(session: AsyncSession, org_id: str) -> Any:
    """The org's projection row; 404 for an org quota has not seen registered."""
    org = (
        await session.execute(select(org_projection).where(org_projection.c.org_id == org_id))
    ).one_or_none()
    if org is None or org.kind is None:
        raise HttpError(404, "not_found", f"org {org_id} is not known")
    return org


def _division_arg(code: str | None) -> str:
    if not code or identifiers.division(code) is None:
        raise HttpError(400, "unknown_division", f"unknown division code {code}")
    return code


_LEDGER_COLUMNS = (
    quota_ledger.c.seq,
    quota_ledger.c.event_type,
    quota_ledger.c.org_id,
    quota_ledger.c.unit_id,
    quota_ledger.c.division_code,
    quota_ledger.c.category,
    quota_ledger.c.before,
    quota_ledger.c.after,
)


async def _replay(
    session: AsyncSession, as_of: date, *conditions: Any
) -> tuple[Replay, dict[str, str]]:
    """Replay the ledger rows matching ``conditions`` that took effect on or before ``as_of``;
    the replay and, per org, the division recorded with its last change by then."""
    rows = await session.execute(
        select(*_LEDGER_COLUMNS)
        .where(quota_ledger.c.effective_date <= as_of, *conditions)
        .order_by(quota_ledger.c.effective_date, quota_ledger.c.seq)
    )
    replay = Replay()
    divisions: dict[str, str] = {}
    for row in rows.mappings():
        replay.apply_ledger(row)
        if row["org_id"] is not None and row["division_code"] is not None:
            divisions[row["org_id"]] = row["division_code"]
    return replay, divisions


async def _org_as_of(session: AsyncSession, org: Any, as_of: date) -> dict[str, Any]:
    """An org's establishment in effect on ``as_of`` (see ``register_queries``)."""
    replay, _ = await _replay(session, as_of, quota_ledger.c.org_id == org.org_id)
    funding = dict(
        (
            await session.execute(
                select(establishment.c.category, establishment.c.funding).where(
                    establishment.c.org_id == org.org_id
                )
            )
        ).all()
    )
    return {
        "categories": [
            {
                "category": category,
                "funding": funding.get(category),
                **_counts(t.approved, t.occupied, t.reserved),
            }
            for (_, category), t in sorted(replay.establishment.items())
        ],
        "leader_posts": [
            {
                "unit_id": unit_id or None,
                "principal": p.principal,
                "deputy": p.deputy,
                "principal_held": p.principal_held,
                "deputy_held": p.deputy_held,
            }
            for (_, unit_id), p in sorted(replay.posts.items())
        ],
    }


async def _division_as_of(session: AsyncSession, code: str, as_of: date) -> dict[str, Any]:
    """A division's roll-up in effect on ``as_of`` (see ``register_queries``)."""
    prefix = division_prefix(code)
    inside = quota_ledger.c.division_code.like(f"{prefix}%")
    orgs_seen_inside = (
        select(quota_ledger.c.org_id).where(inside, quota_ledger.c.org_id.is_not(None)).distinct()
    )
    replay, divisions = await _replay(
        session,
        as_of,
        or_(
            quota_ledger.c.org_id.in_(orgs_seen_inside),
            and_(quota_ledger.c.org_id.is_(None), inside),
        ),
    )
    members = {org for org, division in divisions.items() if division.startswith(prefix)}
    sums: dict[str, list[int]] = {}
    for (org_id, category), t in replay.establishment.items():
        if org_id in members:
            total = sums.setdefault(category, [0, 0, 0, 0])
            total[0] += t.approved
            total[1] += t.occupied
            total[2] += t.reserved
            total[3] += 1
    own = {cat: value for (div, cat), value in replay.limits.items() if div == code}
    categories = []
    for category in sorted(set(sums) | set(own)):
        approved, occupied, reserved, orgs = sums.get(category, [0, 0, 0, 0])
        limit = own.get(category)
        categories.append(
            {
                "category": category,
                **_counts(approved, occupied, reserved),
                "orgs": orgs,
                "limit": limit,
                "headroom": None if limit is None else limit - approved,
            }
        )
    return {
        "categories": categories,
        "limits_inside": [
            {"division_code": div, "category": cat, "limit": value}
            for (div, cat), value in sorted(replay.limits.items())
            if div != code and div.startswith(prefix)
        ],
    }


def register_queries(router: Router, sessions: async_sessionmaker[AsyncSession]) -> None:
    """The quota queries.

    ``as_of=YYYY-MM-DD`` on the establishment queries answers from the ledger history: the
    counts in effect at the end of that day are the sum of every recorded change whose effective
    date (生效日期) is on or before it, each change counted as the difference it made when it was
    recorded (a new approved total adds ``approved − previous``, a transfer moves its amount, a
    quota-use notice reserves its places from its document date, slots and releases count from
    the day they happened). When changes are entered in the order of their effective dates this
    is exactly the ``after`` of the last change on or before the date; a change entered later
    with an earlier effective date counts from that earlier date, and the answer for any date
    on or after the last effective date equals the live counts. In a division, an org counts
    where its last change on or before the date placed it; limits are those in effect then.
    """

    @router.get("/orgs/{org_id}/establishment")
    async def org_establishment(request: Request) -> tuple[int, Any]:
        org_id = str(request.uuid_param("org_id"))
        as_of = request.date_arg("as_of")
        async with sessions() as session:
            org = await _known_org(session, org_id)
            if as_of is not None:
                return 200, {
                    "org_id": org_id,
                    "name": org.name,
                    "kind": org.kind,
                    "division_code": org.division_code,
                    "status": org.status,
                    "as_of": as_of.isoformat(),
                    **await _org_as_of(session, org, as_of),
                }
            rows = (
                await session.execute(
                    select(establishment)
                    .where(establishment.c.org_id == org_id)
                    .order_by(establishment.c.category)
                )
            ).all()
            posts = (
                await session.execute(
                    select(leader_posts)
                    .where(leader_posts.c.org_id == org_id)
                    .order_by(leader_posts.c.unit_id)
                )
            ).all()
        return 200, {
            "org_id": org_id,
            "name": org.name,
            "kind": org.kind,
            "division_code": org.division_code,
            "status": org.status,
            "categories": [
                {
                    "category": r.category,
                    "funding": r.funding,
                    **_counts(r.approved, r.occupied, r.reserved),
                }
                for r in rows
            ],
            "leader_posts": [_leader_posts(p) for p in posts],
        }

    @router.get("/divisions/{code}/establishment")
    async def division_establishment(request: Request) -> tuple[int, Any]:
        code = _division_arg(request.params["code"])
        as_of = request.date_arg("as_of")
        division = identifiers.division(code)
        if as_of is not None:
            async with sessions() as session:
                history = await _division_as_of(session, code, as_of)
            return 200, {
                "division_code": code,
                "division_name": division.name if division else None,
                "as_of": as_of.isoformat(),
                **history,
            }
        async with sessions() as session:
            # The maintained totals of the subtree (kept by the database in every writing
            # transaction, see DivisionTotals): one indexed read, not a sum over its orgs.
            by_category = await DivisionTotals(session).of(code)
            limits = (
                await session.execute(
                    select(region_limits.c.category, region_limits.c.limit).where(
                        region_limits.c.division_code == code
                    )
                )
            ).all()
            limits_inside = (
                await session.execute(
                    select(
                        region_limits.c.division_code,
                        region_limits.c.category,
                        region_limits.c.limit,
                    )
                    .where(
                        region_limits.c.division_code.like(f"{division_prefix(code)}%"),
                        region_limits.c.division_code != code,
                    )
                    .order_by(region_limits.c.division_code, region_limits.c.category)
                )
            ).all()
        own = {r.category: r.limit for r in limits}
        categories = []
        for category in sorted(set(by_category) | set(own)):
            row = by_category.get(category, Totals())
            counts = _counts(row.approved, row.occupied, row.reserved)
            limit = own.get(category)
            categories.append(
                {
                    "category": category,
                    **counts,
                    "orgs": row.orgs,
                    "limit": limit,
                    "headroom": None if limit is None else limit - counts["approved"],
                }
            )
        return 200, {
            "division_code": code,
            "division_name": division.name if division else None,
            "categories": categories,
            "limits_inside": [
                {"division_code": r.division_code, "category": r.category, "limit": r.limit}
                for r in limits_inside
            ],
        }

    async def _notice(notice_no: str) -> dict[str, Any]:
        async with sessions() as session:
            row = (
                await session.execute(select(notices).where(notices.c.notice_no == notice_no))
            ).one_or_none()
        if row is None:
            raise HttpError(404, "not_found", f"quota-use notice {notice_no} is not known")
        return _notice_body(row)

    def _notice_body(row: Any) -> dict[str, Any]:
        status = row.status
        if status == "issued" and row.valid_until < today():
            status = "expired"  # lapsed; its places are released by the next expiry sweep
        return {
            "notice_no": row.notice_no,
            "org_id": row.org_id,
            "category": row.category,
            "count": row.count,
            "used": row.used,
            "remaining": row.count - row.used if status == "issued" else 0,
            "valid_until": row.valid_until.isoformat(),
            "status": status,
            "document": row.document,
            "issued_at": row.issued_at.isoformat(),
            "closed_at": row.closed_at.isoformat() if row.closed_at else None,
        }

    @router.get("/notices/{notice_no}")
    async def notice(request: Request) -> tuple[int, Any]:
        return 200, await _notice(request.params["notice_no"])

    @router.get("/notices")
    async def notice_by_number(request: Request) -> tuple[int, Any]:
        """``GET /notices?notice_no=…``: the same notice, for numbers with ``/`` in them (a path
        segment cannot carry one: the server decodes ``%2F`` before routing)."""
        notice_no = request.arg("notice_no")
        if not notice_no:
            raise HttpError(400, "invalid_query", "notice_no is required")
        return 200, await _notice(notice_no)

    @router.get("/orgs/{org_id}/notices")
    async def org_notices(request: Request) -> tuple[int, Any]:
        """An org's quota-use notices (用编通知单), as ``GET /notices/{notice_no}`` shows each,
        those that lapse first first: what a clerk looks up to fill in an enrolment.
        ``category=`` keeps one category; ``usable=true`` keeps those an enrolment could use
        today (issued, not lapsed, places left); paged by ``limit`` and ``offset``."""
        org_id = str(request.uuid_param("org_id"))
        category = request.arg("category")
        if category is not None and category not in _CATEGORIES:
            raise HttpError(
                400, "invalid_query", f"unknown category {category!r}; one of {_CATEGORIES}"
            )
        usable = request.bool_arg("usable")
        limit = request.int_arg("limit", 100, low=1, high=1000)
        offset = request.int_arg("offset", 0, high=10_000_000)
        conditions = [notices.c.org_id == org_id]
        if category is not None:
            conditions.append(notices.c.category == category)
        if usable:
            conditions += usable_notice(today())
        async with sessions() as session:
            known = await _known_org(session, org_id)
            in_order = select(notices).order_by(
                notices.c.valid_until, notices.c.issued_at, notices.c.notice_no
            )
            total, rows = await paged(
                session, in_order, notices, conditions, limit=limit, offset=offset
            )
        return 200, {
            "org_id": org_id,
            "name": known.name,
            "total": total,
            "limit": limit,
            "offset": offset,
            "notices": [_notice_body(row) for row in rows],
        }

    @router.get("/orgs/{org_id}/ledger")
    async def org_ledger(request: Request) -> tuple[int, Any]:
        """Every change of one org's establishment, with its document and effective date
        (编制台账), newest first."""
        org_id = str(request.uuid_param("org_id"))
        return 200, await _ledger(request, quota_ledger.c.org_id == org_id, org_id=org_id)

    @router.get("/divisions/{code}/ledger")
    async def division_ledger(request: Request) -> tuple[int, Any]:
        """Every change inside a division and all below it (orgs and region limits)."""
        code = _division_arg(request.params.get("code"))
        inside = quota_ledger.c.division_code.like(f"{division_prefix(code)}%")
        return 200, await _ledger(request, inside, division_code=code)

    async def _ledger(request: Request, where: Any, **subject: str) -> dict[str, Any]:
        limit = request.int_arg("limit", 100, low=1, high=1000)
        offset = request.int_arg("offset", 0, high=10_000_000)
        conditions = [where]
        if (since := request.date_arg("since")) is not None:
            conditions.append(quota_ledger.c.effective_date >= since)
        if (until := request.date_arg("until")) is not None:
            conditions.append(quota_ledger.c.effective_date <= until)
        if category := request.arg("category"):
            conditions.append(quota_ledger.c.category == category)
        async with sessions() as session:
            newest_first = select(quota_ledger).order_by(quota_ledger.c.seq.desc())
            total, rows = await paged(
                session, newest_first, quota_ledger, conditions, limit=limit, offset=offset
            )
        return subject | {
            "total": total,
            "limit": limit,
            "offset": offset,
            "changes": [
                {
                    "seq": r.seq,
                    "event_id": r.event_id,
                    "event_type": r.event_type,
                    "command_id": r.command_id,
                    "org_id": r.org_id,
                    "unit_id": r.unit_id,
                    "division_code": r.division_code,
                    "category": r.category,
                    "document": r.document,
                    "effective_date": r.effective_date,
                    "recorded_at": r.recorded_at,
                    "actor_id": r.actor_id,
                    "before": r.before,
                    "after": r.after,
                }
                for r in rows
            ],
        }

    @router.get("/occupancy")
    async def occupancy(request: Request) -> tuple[int, Any]:
        """Every org of a division (and below) that holds anything: per category approved,
        occupied and reserved. What `bianzhi check` compares with the roster's counts."""
        prefix = division_prefix(_division_arg(request.arg("division_code")))
        async with sessions() as session:
            rows = (
                await session.execute(
                    select(
                        org_projection.c.org_id,
                        org_projection.c.division_code,
                        org_projection.c.status,
                        establishment.c.category,
                        establishment.c.approved,
                        establishment.c.occupied,
                        establishment.c.reserved,
                    )
                    .join(establishment, establishment.c.org_id == org_projection.c.org_id)
                    .where(
                        org_projection.c.division_code.like(f"{prefix}%"),
                        (
                            establishment.c.approved
                            + establishment.c.occupied
                            + establishment.c.reserved
                        )
                        > 0,
                    )
                    .order_by(org_projection.c.org_id, establishment.c.category)
                )
            ).all()
        orgs: dict[str, dict[str, Any]] = {}
        for r in rows:
            entry = orgs.setdefault(
                r.org_id,
                {
                    "org_id": r.org_id,
                    "division_code": r.division_code,
                    "status": r.status,
                    "categories": {},
                },
            )
            entry["categories"][r.category] = {
                "approved": r.approved,
                "occupied": r.occupied,
                "reserved": r.reserved,
            }
        return 200, {"orgs": list(orgs.values())}

    @router.get("/over-quota")
    async def over_quota(request: Request) -> tuple[int, Any]:
        conditions = []
        if (code := request.arg("division_code")) is not None:
            prefix = division_prefix(_division_arg(code))
            conditions.append(org_projection.c.division_code.like(f"{prefix}%"))
        org_cols = (org_projection.c.org_id, org_projection.c.name, org_projection.c.division_code)
        async with sessions() as session:
            slots = (
                await session.execute(
                    select(
                        *org_cols,
                        establishment.c.category,
                        establishment.c.approved,
                        establishment.c.occupied,
                    )
                    .join(establishment, establishment.c.org_id == org_projection.c.org_id)
                    .where(establishment.c.occupied > establishment.c.approved, *conditions)
                    .order_by(org_projection.c.division_code, org_projection.c.org_id)
                )
            ).all()
            posts = (
                await session.execute(
                    select(
                        *org_cols,
                        leader_posts.c.unit_id,
                        leader_posts.c.principal,
                        leader_posts.c.deputy,
                        leader_posts.c.principal_held,
                        leader_posts.c.deputy_held,
                    )
                    .join(leader_posts, leader_posts.c.org_id == org_projection.c.org_id)
                    .where(
                        or_(
                            leader_posts.c.principal_held > leader_posts.c.principal,
                            leader_posts.c.deputy_held > leader_posts.c.deputy,
                        ),
                        *conditions,
                    )
                    .order_by(org_projection.c.division_code, org_projection.c.org_id)
                )
            ).all()
        return 200, {
            "establishment": [
                {
                    "org_id": r.org_id,
                    "name": r.name,
                    "division_code": r.division_code,
                    "category": r.category,
                    "approved": r.approved,
                    "occupied": r.occupied,
                }
                for r in slots
            ],
            "leader_posts": [
                {"org_id": r.org_id, "name": r.name, "division_code": r.division_code}
                | _leader_posts(r)
                for r in posts
            ],
        }
