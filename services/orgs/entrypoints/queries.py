"""The orgs query API (WIRE-CONTRACT §6): reads only; writes go through the command topic."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from sqlalchemy import String, cast, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from contracts import identifiers
from contracts.codes import OrgKind, OrgStatus
from contracts.identifiers import division_prefix
from services.orgs.adapters.orm import org_history, org_units, orgs
from services.runtime.db import paged
from services.runtime.http import HttpError, Request, Router


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _org_summary(row: Any) -> dict[str, Any]:
    return {
        "org_id": row.org_id,
        "name": row.name,
        "kind": row.kind,
        "division_code": row.division_code,
        "parent_org_id": row.parent_org_id,
        "uscc": row.uscc,
        "grade": row.grade,
        "status": row.status,
    }


def register_queries(router: Router, sessions: async_sessionmaker[AsyncSession]) -> None:
    @router.get("/orgs/{org_id}")
    async def get_org(request: Request) -> tuple[int, Any]:
        org_id = str(request.uuid_param("org_id"))
        async with sessions() as session:
            row = (await session.execute(select(orgs).where(orgs.c.org_id == org_id))).one_or_none()
            if row is None:
                raise HttpError(404, "not_found", f"org {org_id} does not exist")
            units = (
                await session.execute(
                    select(org_units.c.unit_id, org_units.c.name)
                    .where(org_units.c.org_id == org_id)
                    .order_by(org_units.c.position)
                )
            ).all()
            parent = None
            if row.parent_org_id:
                parent_row = (
                    await session.execute(
                        select(orgs.c.org_id, orgs.c.name, orgs.c.status).where(
                            orgs.c.org_id == row.parent_org_id
                        )
                    )
                ).one_or_none()
                if parent_row is not None:
                    parent = dict(parent_row._mapping)
            children = (
                await session.execute(select(func.count()).where(orgs.c.parent_org_id == org_id))
            ).scalar_one()
        division = identifiers.division(row.division_code)
        return 200, {
            **_org_summary(row),
            "division_name": division.name if division else None,
            "alt_names": row.alt_names,
            "functions": row.functions,
            "funding": row.funding,
            "effective_date": row.effective_date,
            "updated_at": row.updated_at,
            "version": row.version,
            "parent": parent,
            "children": children,
            "units": [{"unit_id": u.unit_id, "name": u.name} for u in units],
        }

    @router.get("/orgs")
    async def search_orgs(request: Request) -> tuple[int, Any]:
        limit = request.int_arg("limit", 50, low=1, high=500)
        offset = request.int_arg("offset", 0, low=0, high=10_000_000)
        conditions = []
        include_sub = request.bool_arg("include_sub")
        if code := request.arg("division_code"):
            if identifiers.division(code) is None:
                raise HttpError(400, "unknown_division", f"unknown division code {code}")
            if include_sub:
                prefix = division_prefix(code)
                conditions.append(orgs.c.division_code.like(f"{prefix}%"))
            else:
                conditions.append(orgs.c.division_code == code)
        if kind := request.arg("kind"):
            if kind not in OrgKind._value2member_map_:
                raise HttpError(400, "invalid_query", f"kind must be one of {list(OrgKind)}")
            conditions.append(orgs.c.kind == kind)
        if status := request.arg("status"):
            if status not in OrgStatus._value2member_map_:
                raise HttpError(400, "invalid_query", f"status must be one of {list(OrgStatus)}")
            conditions.append(orgs.c.status == status)
        if parent := request.arg("parent_org_id"):
            try:
                conditions.append(orgs.c.parent_org_id == str(UUID(parent)))
            except ValueError:
                raise HttpError(400, "invalid_query", "parent_org_id must be a UUID") from None
        if q := request.arg("q"):
            # lower() on both sides: the same (case-insensitive) answer on SQLite and PostgreSQL.
            pattern = f"%{_escape_like(q.strip().lower())}%"
            conditions.append(
                or_(
                    func.lower(orgs.c.name).like(pattern, escape="\\"),
                    func.lower(cast(orgs.c.alt_names, String)).like(pattern, escape="\\"),
                )
            )

        async with sessions() as session:
            in_order = select(orgs).order_by(orgs.c.division_code, orgs.c.name, orgs.c.org_id)
            total, rows = await paged(
                session, in_order, orgs, conditions, limit=limit, offset=offset
            )
        return 200, {
            "items": [_org_summary(r) for r in rows],
            "total": total,
            "limit": limit,
            "offset": offset,
        }

    @router.get("/orgs/{org_id}/history")
    async def org_history_query(request: Request) -> tuple[int, Any]:
        org_id = str(request.uuid_param("org_id"))
        async with sessions() as session:
            exists = (
                await session.execute(select(orgs.c.org_id).where(orgs.c.org_id == org_id))
            ).scalar_one_or_none()
            if exists is None:
                raise HttpError(404, "not_found", f"org {org_id} does not exist")
            rows = (
                await session.execute(
                    select(org_history)
                    .where(org_history.c.org_id == org_id)
                    .order_by(org_history.c.seq)
                )
            ).all()
        return 200, {
            "org_id": org_id,
            "changes": [
                {
                    "event_id": r.event_id,
                    "type": r.event_type,
                    "command_id": r.command_id,
                    "document": r.document,
                    "effective_date": r.effective_date,
                    "recorded_at": r.recorded_at,
                    "actor_id": r.actor_id,
                    "data": r.data,
                }
                for r in rows
            ],
        }
