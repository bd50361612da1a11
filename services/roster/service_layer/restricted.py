"""The restricted counterpart of every ``Person*`` event (docs/security.md §5).

Wherever the roster writes a ``Person*`` event to ``bianzhi.roster.events.v1`` (citizen ID
masked) it also stages, in the same unit of work, the event's ``Person*Restricted`` counterpart
for ``bianzhi.roster.events.restricted.v1``: the same data plus the full citizen ID and the
public event's id, keyed by ``person_id`` like the public event. Both reach the outbox in one
transaction, so there is never one without the other.

The full number comes from the person's stored ciphertext, decrypted here and nowhere else; it
is never logged.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Row

from contracts.envelope import Envelope
from contracts.roster import (
    PersonEnrolled,
    PersonEnrolledRestricted,
    PersonReleased,
    PersonReleasedRestricted,
    PersonTransferred,
    PersonTransferredRestricted,
    PersonUpdated,
    PersonUpdatedRestricted,
    RestrictedPersonEvent,
)
from services.roster.service_layer.unit_of_work import RosterUnitOfWork


def counterpart(public: Envelope, citizen_id: str) -> RestrictedPersonEvent:
    """The restricted event that accompanies the public ``Person*`` event ``public``."""
    fields: dict[str, Any] = {**public.data, "citizen_id": citizen_id, "event_id": public.id}
    if public.type == PersonEnrolled.TYPE:
        return PersonEnrolledRestricted(**fields)
    if public.type == PersonTransferred.TYPE:
        return PersonTransferredRestricted(**fields)
    if public.type == PersonReleased.TYPE:
        return PersonReleasedRestricted(**fields)
    if public.type == PersonUpdated.TYPE:
        return PersonUpdatedRestricted(**fields)
    raise ValueError(f"{public.type} has no restricted counterpart")


def stage_restricted(uow: RosterUnitOfWork, public: Envelope, person: Row[Any]) -> Envelope:
    """Stage the restricted counterpart of ``public``, the ``Person*`` event just written about
    ``person`` (a row of the people table), in ``uow``; the staged envelope.

    It shares the public event's correlation, cause, actor and time.
    """
    citizen_id = uow.personal_data.decrypt(person.citizen_enc, context=person.person_id)
    event = counterpart(public, citizen_id)
    env = event.envelope(
        source=public.source,
        correlationid=public.correlationid,
        causationid=public.causationid,
        actorid=public.actorid,
        actorregion=public.actorregion,
        actorroles=public.actorroles,
    ).model_copy(update={"time": public.time})
    uow.stage(env, event.TOPIC, env.subject)
    return env
