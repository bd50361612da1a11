"""The org projection: what the roster keeps of the orgs events (status, kind, division).

Handlers are safe to apply again (replays) and tolerate a merge seen before the registration.
"""

from __future__ import annotations

from contracts.codes import OrgStatus
from contracts.envelope import Envelope
from contracts.orgs import OrgAbolished, OrgMoved, OrgRegistered, OrgRenamed, OrgsMerged
from services.roster.service_layer.unit_of_work import RosterUnitOfWork
from services.runtime.messaging import EventRoute


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
    await uow.orgs.set_status(event.source_org_ids, OrgStatus.MERGED)


# The routing table of bianzhi.orgs.events.v1; other org events are acknowledged and ignored.
ORG_EVENTS: list[EventRoute] = [
    EventRoute(OrgRegistered, org_registered),
    EventRoute(OrgMoved, org_moved),
    EventRoute(OrgRenamed, org_renamed),
    EventRoute(OrgAbolished, org_abolished),
    EventRoute(OrgsMerged, orgs_merged),
]
