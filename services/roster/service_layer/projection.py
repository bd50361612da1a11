"""The org projection: what the roster keeps of the orgs events (status, kind, division).

Handlers are safe to apply again (replays) and tolerate a merge seen before the registration.
"""

from __future__ import annotations

from uuid import UUID

import structlog

from contracts.codes import Category, LeaderPost, OrgStatus
from contracts.envelope import Envelope
from contracts.orgs import OrgAbolished, OrgMoved, OrgRegistered, OrgRenamed, OrgsMerged
from contracts.roster import PersonTransferred
from services.roster.domain.model import Status
from services.roster.service_layer.restricted import stage_restricted
from services.roster.service_layer.unit_of_work import RosterUnitOfWork
from services.runtime.messaging import EventRoute, emit_caused

log = structlog.get_logger("bianzhi.roster.projection")


async def org_registered(event: OrgRegistered, uow: RosterUnitOfWork, env: Envelope) -> None:
    current = await uow.orgs.get(event.org_id)
    values = {"name": event.name, "kind": event.kind.value, "division_code": event.division_code}
    if current is None:
        values["status"] = event.status.value
    await uow.orgs.upsert(event.org_id, **values)


async def org_moved(event: OrgMoved, uow: RosterUnitOfWork, env: Envelope) -> None:
    await uow.orgs.upsert(event.org_id, division_code=event.division_code)


async def org_renamed(event: OrgRenamed, uow: RosterUnitOfWork, env: Envelope) -> None:
    await uow.orgs.upsert(event.org_id, name=event.name)


async def org_abolished(event: OrgAbolished, uow: RosterUnitOfWork, env: Envelope) -> None:
    await uow.orgs.set_status([event.org_id], OrgStatus.ABOLISHED)


async def orgs_merged(event: OrgsMerged, uow: RosterUnitOfWork, env: Envelope) -> None:
    """The people of merged orgs now belong to the target (quota moved their slots in the same
    merge): each person who holds a slot is moved and ``PersonTransferred`` (``by_merge``)
    published; people still enrolling move too, and their enrolment ends as quota decides."""
    await uow.orgs.set_status(event.source_org_ids, OrgStatus.MERGED)
    moved = await uow.people.move_org(event.source_org_ids, event.target_org_id)
    for person in moved:
        if person.status == Status.ENROLLING:
            continue
        transferred = emit_caused(
            uow,
            PersonTransferred(
                person_id=UUID(person.person_id),
                citizen_id_masked=person.citizen_masked,
                from_org_id=UUID(person.org_id),
                to_org_id=event.target_org_id,
                from_category=Category(person.category),
                category=Category(person.category),
                notice_no=event.document.number,
                position=person.position,
                leader_post=LeaderPost(person.leader_post) if person.leader_post else None,
                unit_id=UUID(person.unit_id) if person.unit_id else None,
                effective_date=event.effective_date,
                document=event.document,
                by_merge=True,
            ),
            env,
            env.id,
        )
        stage_restricted(uow, transferred, person)
        await uow.people.record(
            transferred,
            person_id=person.person_id,
            org_id=event.target_org_id,
            category=person.category,
            effective_date=event.effective_date,
            document=event.document.model_dump(mode="json"),
            details={"from_org_id": person.org_id, "by_merge": True},
            command=None,
        )
    if moved:
        log.info("people moved by a merge", count=len(moved), target=str(event.target_org_id))


# The routing table of bianzhi.orgs.events.v1; other org events are acknowledged and ignored.
ORG_EVENTS: list[EventRoute] = [
    EventRoute(OrgRegistered, org_registered),
    EventRoute(OrgMoved, org_moved),
    EventRoute(OrgRenamed, org_renamed),
    EventRoute(OrgAbolished, org_abolished),
    EventRoute(OrgsMerged, orgs_merged),
]
