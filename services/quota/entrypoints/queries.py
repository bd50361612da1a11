"""The quota query API (WIRE-CONTRACT §6): reads only; writes go through the command topic."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from contracts import identifiers
from contracts.identifiers import division_prefix
from services.quota.adapters.orm import (
    establishment,
    leader_posts,
    notices,
    org_projection,
    region_limits,
)
from services.quota.domain.model import today
from services.runtime.http import HttpError, Request, Router


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


def _division_arg(code: str | None) -> str:
    if not code or identifiers.division(code) is None:
        raise HttpError(400, "unknown_division", f"unknown division code {code}")
    return code


def register_queries(router: Router, sessions: async_sessionmaker[AsyncSession]) -> None:
    @router.get("/orgs/{org_id}/establishment")
    async def org_establishment(request: Request) -> tuple[int, Any]:
        org_id = str(request.uuid_param("org_id"))
        async with sessions() as session:
            org = (
                await session.execute(
                    select(org_projection).where(org_projection.c.org_id == org_id)
                )
            ).one_or_none()
            if org is None or org.kind is None:
                raise HttpError(404, "not_found", f"org {org_id} is not known")
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
        inside = org_projection.c.division_code.like(f"{division_prefix(code)}%")
        async with sessions() as session:
            sums = (
                await session.execute(
                    select(
                        establishment.c.category,
                        func.sum(establishment.c.approved).label("approved"),
                        func.sum(establishment.c.occupied).label("occupied"),
                        func.sum(establishment.c.reserved).label("reserved"),
                        func.count().label("orgs"),
                    )
                    .select_from(
                        establishment.join(
                            org_projection, org_projection.c.org_id == establishment.c.org_id
                        )
                    )
                    .where(inside)
                    .group_by(establishment.c.category)
                )
            ).all()
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
        by_category = {r.category: r for r in sums}
        categories = []
        for category in sorted(set(by_category) | set(own)):
            row = by_category.get(category)
            counts = _counts(
                int(row.approved) if row else 0,
                int(row.occupied) if row else 0,
                int(row.reserved) if row else 0,
            )
            limit = own.get(category)
            categories.append(
                {
                    "category": category,
                    **counts,
                    "orgs": row.orgs if row else 0,
                    "limit": limit,
                    "headroom": None if limit is None else limit - counts["approved"],
                }
            )
        division = identifiers.division(code)
        return 200, {
            "division_code": code,
            "division_name": division.name if division else None,
            "categories": categories,
            "limits_inside": [
                {"division_code": r.division_code, "category": r.category, "limit": r.limit}
                for r in limits_inside
            ],
        }

    @router.get("/notices/{notice_no}")
    async def notice(request: Request) -> tuple[int, Any]:
        notice_no = request.params["notice_no"]
        async with sessions() as session:
            row = (
                await session.execute(select(notices).where(notices.c.notice_no == notice_no))
            ).one_or_none()
        if row is None:
            raise HttpError(404, "not_found", f"quota-use notice {notice_no} is not known")
        status = row.status
        if status == "issued" and row.valid_until < today():
            status = "expired"  # lapsed; its places are released by the next expiry sweep
        return 200, {
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
