"""The org projection: what quota keeps of the orgs events (org → kind, division, status).

Each handler only translates an event into a change of ``org_projection``; handlers are safe to
apply again (replays) and tolerate a merge seen before the merged org's registration.
"""

from __future__ import annotations

from contracts.codes import OrgStatus
from contracts.envelope import Envelope
from contracts.orgs import OrgAbolished, OrgMoved, OrgRegistered, OrgRenamed, OrgsMerged
from services.quota.service_layer.unit_of_work import QuotaUnitOfWork
from services.runtime.messaging import EventRoute


async def org_registered(event: OrgRegistered, uow: QuotaUnitOfWork, env: Envelope) -> None:
    await uow.orgs.registered(
        event.org_id,
        name=event.name,
        kind=event.kind,
        division_code=event.division_code,
        parent_org_id=event.parent_org_id,
        status=event.status,
    )


async def org_moved(event: OrgMoved, uow: QuotaUnitOfWork, env: Envelope) -> None:
    await uow.orgs.moved(event.org_id, event.parent_org_id, event.division_code)


async def org_renamed(event: OrgRenamed, uow: QuotaUnitOfWork, env: Envelope) -> None:
    await uow.orgs.renamed(event.org_id, event.name)


async def org_abolished(event: OrgAbolished, uow: QuotaUnitOfWork, env: Envelope) -> None:
    await uow.orgs.set_status([event.org_id], OrgStatus.ABOLISHED)


async def orgs_merged(event: OrgsMerged, uow: QuotaUnitOfWork, env: Envelope) -> None:
    await uow.orgs.set_status(event.source_org_ids, OrgStatus.MERGED)


# The routing table of bianzhi.orgs.events.v1; other org events are acknowledged and ignored.
ORG_EVENTS: list[EventRoute] = [
    EventRoute(OrgRegistered, org_registered),
    EventRoute(OrgMoved, org_moved),
    EventRoute(OrgRenamed, org_renamed),
    EventRoute(OrgAbolished, org_abolished),
    EventRoute(OrgsMerged, orgs_merged),
]
