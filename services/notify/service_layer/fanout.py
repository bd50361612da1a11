"""Fan-out: every event of the topics notify follows is matched against the active
subscriptions, and a pending delivery is queued per match, in the transaction that records the
event in the inbox. Notify also keeps org → division (and the org's name, for e-mails) from the
orgs events, to place events that only name an org.

Where an event concerns:
- ``data.division_code`` when the event carries one;
- else the divisions of the orgs it names (``org_id``, ``from_org_id``, ``to_org_id``,
  ``target_org_id``, ``source_org_ids``), from the projection;
- else nothing can be known (an org notify has not seen registered): then only the event type
  decides, so such an event goes to every subscription whose patterns match it.
"""

from __future__ import annotations

from typing import Any

from contracts.base import Event, registry
from contracts.envelope import Envelope
from contracts.orgs import OrgMoved, OrgRegistered, OrgRenamed
from contracts.topics import ORGS_EVENTS, QUOTA_EVENTS, ROSTER_EVENTS
from services.notify.domain import model
from services.notify.service_layer.unit_of_work import NotifyUnitOfWork
from services.runtime.messaging import EventHandler, EventRoute

FOLLOWED_TOPICS: tuple[str, ...] = (ORGS_EVENTS, QUOTA_EVENTS, ROSTER_EVENTS)
_ORG_FIELDS = ("org_id", "from_org_id", "to_org_id", "target_org_id")
_ORG_LIST_FIELDS = ("source_org_ids",)


async def event_divisions(uow: NotifyUnitOfWork, data: dict[str, Any]) -> set[str] | None:
    """The divisions an event concerns, or ``None`` when they cannot be known."""
    code = data.get("division_code")
    if isinstance(code, str) and code:
        return {code}
    org_ids = [str(data[f]) for f in _ORG_FIELDS if data.get(f)]
    for f in _ORG_LIST_FIELDS:
        org_ids.extend(str(v) for v in data.get(f) or () if v)
    found = set((await uow.orgs.of(org_ids)).values())
    return found or None


async def fan_out(topic: str, uow: NotifyUnitOfWork, env: Envelope) -> int:
    """Queue ``env`` for every subscription owed it; the number of deliveries queued.

    The active subscriptions are read once per transaction (a fetch of events is one), and
    the divisions an event concerns are looked up only when a subscription wants its type:
    most events of a busy platform (every enrolment's) go to nobody, and cost no query then.
    """
    wanting = [
        s for s in await uow.active_subscriptions() if model.type_matches(s.event_types, env.type)
    ]
    if not wanting:
        return 0
    divisions = await event_divisions(uow, env.data)
    owed = [s.subscription_id for s in wanting if model.wants(s, env.type, divisions)]
    if owed:
        await uow.deliveries.queue(
            event_id=env.id,
            event_type=env.type,
            topic=topic,
            correlation_id=env.effective_correlation_id,
            body=env.to_bytes(),
            subscription_ids=owed,
        )
    return len(owed)


def _fan_out_handler(topic: str) -> EventHandler:
    async def handle(event: Event, uow: NotifyUnitOfWork, env: Envelope) -> None:
        if isinstance(event, OrgRegistered):
            await uow.orgs.set(event.org_id, event.division_code, event.name)
        elif isinstance(event, OrgMoved):
            await uow.orgs.set(event.org_id, event.division_code)
        elif isinstance(event, OrgRenamed):
            await uow.orgs.rename(event.org_id, event.name)
        await fan_out(topic, uow, env)

    return handle


def routes_for(topic: str) -> list[EventRoute]:
    """A route for every event type the contract places on ``topic`` (the runtime routes by
    exact type; types it does not know are acknowledged and ignored)."""
    handler = _fan_out_handler(topic)
    return [
        EventRoute(m, handler)
        for m in registry().values()
        if issubclass(m, Event) and topic == m.TOPIC
    ]
