"""The roster query API (WIRE-CONTRACT §6): reads only; citizen IDs only ever masked."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from contracts import identifiers
from services.roster.adapters.orm import org_projection, people, person_history, sagas
from services.roster.domain.model import HOLDING, Status
from services.runtime.http import HttpError, Request, Router

_STATUSES = {s.value for s in Status}


def _person(row: Any) -> dict[str, Any]:
    return {
        "person_id": row.person_id,
        "citizen_id_masked": row.citizen_masked,
        "name": row.name,
        "sex": row.sex,
        "status": row.status,
        "org_id": row.org_id,
        "category": row.category,
        "notice_no": row.notice_no,
        "position": row.position,
        "leader_post": row.leader_post,
        "unit_id": row.unit_id,
        "entry_method": row.entry_method,
        "enrolled_on": row.enrolled_on,
        "released_on": row.released_on,
        "release_reason": row.release_reason,
    }


def _zero() -> dict[str, int]:
    return {"held": 0, "changing": 0, "enrolling": 0}


async def _enrolments_being_undone(session: AsyncSession) -> list[tuple[str, str | None, str]]:
    """(org, its division, category) of each timed-out enrolment whose compensation quota
    has not confirmed yet (saga ``timed_out``; ``compensated`` once it has): the person's row
    still names the org and category the enrolment asked quota for."""
    rows = await session.execute(
        select(people.c.org_id, org_projection.c.division_code, people.c.category)
        .select_from(
            sagas.join(people, people.c.person_id == sagas.c.person_id).outerjoin(
                org_projection, org_projection.c.org_id == people.c.org_id
            )
        )
        .where(sagas.c.kind == "enrol", sagas.c.status == "timed_out")
    )
    return [(org, division, category) for org, division, category in rows]


def register_queries(router: Router, sessions: async_sessionmaker[AsyncSession]) -> None:
    @router.get("/orgs/{org_id}/people")
    async def org_people(request: Request) -> tuple[int, Any]:
        org_id = str(request.uuid_param("org_id"))
        wanted = request.arg("status")
        if wanted and wanted not in _STATUSES:
            raise HttpError(400, "invalid_query", f"status must be one of {sorted(_STATUSES)}")
        statuses = [wanted] if wanted else sorted(s.value for s in HOLDING - {Status.ENROLLING})
        limit = request.int_arg("limit", 100, low=1, high=1000)
        offset = request.int_arg("offset", 0, high=10_000_000)
        where = (people.c.org_id == org_id, people.c.status.in_(statuses))
        async with sessions() as session:
            total = (await session.execute(select(func.count()).where(*where))).scalar_one()
            rows = (
                await session.execute(
                    select(people)
                    .where(*where)
                    .order_by(people.c.name, people.c.person_id)
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
        return 200, {
            "org_id": org_id,
            "statuses": statuses,
            "total": total,
            "limit": limit,
            "offset": offset,
            "people": [_person(r) for r in rows],
        }

    @router.get("/people/{person_id}")
    async def person(request: Request) -> tuple[int, Any]:
        person_id = str(request.uuid_param("person_id"))
        async with sessions() as session:
            row = (
                await session.execute(select(people).where(people.c.person_id == person_id))
            ).one_or_none()
            if row is None:
                raise HttpError(404, "not_found", f"person {person_id} is not on the roster")
            history = (
                await session.execute(
                    select(person_history)
                    .where(person_history.c.person_id == person_id)
                    .order_by(person_history.c.seq)
                )
            ).all()
        body = _person(row)
        body |= {
            "birth_date": row.birth_date,
            "ethnicity": row.ethnicity,
            "education": row.education,
            "political_status": row.political_status,
            "history": [
                {
                    "event_id": h.event_id,
                    "event_type": h.event_type,
                    "org_id": h.org_id,
                    "category": h.category,
                    "effective_date": h.effective_date,
                    "document": h.document,
                    "details": h.details,
                    "command_id": h.command_id,
                    "actor_id": h.actor_id,
                    "recorded_at": h.recorded_at,
                }
                for h in history
            ],
        }
        return 200, body

    @router.get("/counts")
    async def counts(request: Request) -> tuple[int, Any]:
        """People per org and category — ``held`` (in a slot; ``changing`` of them are being
        transferred or released) and ``enrolling`` (waiting for quota, or a timed-out
        enrolment quota has not yet confirmed undoing) — with each org's
        division, for one org
        (``org_id``), the orgs of a division and all below it (``division_code``), or all.
        What `bianzhi check` compares with quota's occupied counts."""
        stmt = (
            select(
                people.c.org_id,
                org_projection.c.division_code,
                people.c.category,
                people.c.status,
                func.count(),
            )
            .select_from(
                people.outerjoin(org_projection, org_projection.c.org_id == people.c.org_id)
            )
            .where(people.c.status.in_([s.value for s in HOLDING]))
        )
        only_org: str | None = None
        prefix: str | None = None
        if org_id := request.arg("org_id"):
            try:
                only_org = str(uuid.UUID(org_id))
            except ValueError:
                raise HttpError(400, "invalid_query", "org_id must be a UUID") from None
            stmt = stmt.where(people.c.org_id == only_org)
        if division := request.arg("division_code"):
            try:
                identifiers.validate_division_code(division)
            except identifiers.IdentifierError as exc:
                raise HttpError(400, "invalid_query", str(exc)) from None
            prefix = identifiers.division_prefix(division)
            stmt = stmt.where(org_projection.c.division_code.like(prefix + "%"))
        stmt = stmt.group_by(
            people.c.org_id, org_projection.c.division_code, people.c.category, people.c.status
        )
        orgs: dict[str, dict[str, Any]] = {}
        totals: dict[str, dict[str, int]] = {}
        async with sessions() as session:
            for org, division_code, category, status, n in (await session.execute(stmt)).all():
                entry = orgs.setdefault(
                    org, {"org_id": org, "division_code": division_code, "categories": {}}
                )
                for bucket in (
                    entry["categories"].setdefault(category, _zero()),
                    totals.setdefault(category, _zero()),
                ):
                    if status == Status.ENROLLING:
                        bucket["enrolling"] += n
                        continue
                    bucket["held"] += n
                    if status in (Status.TRANSFERRING, Status.RELEASING):
                        bucket["changing"] += n
            # An enrolment that timed out is being undone in quota (its ReleaseSlot is on the
            # way): until quota answers it may still count the place, so it counts as
            # enrolling in its org, not as a mismatch.
            for org, division_code, category in await _enrolments_being_undone(session):
                if (only_org and org != only_org) or (
                    prefix and not (division_code or "").startswith(prefix)
                ):
                    continue
                entry = orgs.setdefault(
                    org, {"org_id": org, "division_code": division_code, "categories": {}}
                )
                for bucket in (
                    entry["categories"].setdefault(category, _zero()),
                    totals.setdefault(category, _zero()),
                ):
                    bucket["enrolling"] += 1
        return 200, {"orgs": sorted(orgs.values(), key=lambda o: o["org_id"]), "totals": totals}

    @router.get("/sagas")
    async def saga_list(request: Request) -> tuple[int, Any]:
        """Sagas by status (default: those still waiting for quota), oldest first."""
        status = request.arg("status", "waiting")
        limit = request.int_arg("limit", 100, low=1, high=1000)
        async with sessions() as session:
            rows = (
                await session.execute(
                    select(sagas)
                    .where(sagas.c.status == status)
                    .order_by(sagas.c.created_at)
                    .limit(limit)
                )
            ).all()
        return 200, {
            "status": status,
            "sagas": [
                {
                    "saga_id": r.saga_id,
                    "kind": r.kind,
                    "person_id": r.person_id,
                    "command_id": r.command_id,
                    "step_type": r.step_type,
                    "status": r.status,
                    "deadline": r.deadline,
                    "created_at": r.created_at,
                    "finished_at": r.finished_at,
                }
                for r in rows
            ],
        }
