"""Command handlers of the roster service.

``EnrolPerson``, ``TransferPerson`` and ``ReleasePerson`` start a saga: the handler settles what
the roster can decide alone (the person, their state), writes the person in an in-between state,
sends one slot request to quota in the same transaction and defers the command's result.
``services.roster.service_layer.saga`` ends the saga when quota answers or the step times out.
``UpdatePerson`` needs no one else and completes at once.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any

from contracts import identifiers
from contracts.codes import ReasonCode, Role
from contracts.common import office_today
from contracts.envelope import Envelope, new_id, now
from contracts.quota import MoveSlot, OccupySlot, ReleaseSlot
from contracts.roster import (
    EnrolPerson,
    PersonUpdated,
    ReleasePerson,
    TransferPerson,
    UpdatePerson,
)
from services.roster.adapters.repository import OrgRef
from services.roster.domain import model
from services.roster.domain.model import Status
from services.roster.domain.personal_data import PersonalDataCipher
from services.roster.service_layer.restricted import stage_restricted
from services.roster.service_layer.unit_of_work import RosterUnitOfWork
from services.runtime.messaging import CommandRoute, HandlerContext
from services.runtime.rules import Rejection


async def _start_saga(
    uow: RosterUnitOfWork,
    ctx: HandlerContext,
    *,
    kind: str,
    person_id: str,
    step: OccupySlot | MoveSlot | ReleaseSlot,
    payload: dict[str, Any],
) -> None:
    """Record the saga, send its one step to quota (its request id is the message id) and
    defer the command's result: all in the handler's transaction."""
    saga_id = str(step.request_id)
    await uow.sagas.start(
        saga_id=saga_id,
        kind=kind,
        person_id=person_id,
        command=ctx.envelope,
        step_type=step.TYPE,
        payload=payload,
        deadline=now() + timedelta(seconds=uow.saga_timeout_s),
    )
    ctx.send(step, id=saga_id)
    ctx.defer_result()


def identity(
    cmd: EnrolPerson, cipher: PersonalDataCipher, person_id: str, index: str
) -> dict[str, Any]:
    """The columns that name a new person: the citizen ID encrypted, blind-indexed, masked."""
    return {
        "person_id": person_id,
        "citizen_index": index,
        "citizen_enc": cipher.encrypt(cmd.citizen_id, context=person_id),
        "citizen_masked": identifiers.mask_citizen_id(cmd.citizen_id),
    }


def person_values(
    cmd: EnrolPerson,
    cipher: PersonalDataCipher,
    person_id: str,
    *,
    status: Status,
    saga_id: str | None,
    enrolled_on: date | None = None,
) -> dict[str, Any]:
    """The columns an enrolment sets on a person's row (new or enrolled again)."""
    return {
        "name": cmd.name,
        # The command's citizen ID was validated when it was read.
        "sex": identifiers.sex_of_valid(cmd.citizen_id),
        "birth_date": identifiers.birth_date_of_valid(cmd.citizen_id),
        "ethnicity": cmd.ethnicity,
        "education": cmd.education,
        "political_status": cmd.political_status,
        "phone_enc": cipher.encrypt(cmd.phone, context=person_id) if cmd.phone else None,
        "status": status.value,
        "org_id": str(cmd.org_id),
        "category": cmd.category.value,
        "notice_no": cmd.notice_no,
        "position": cmd.position,
        "leader_post": cmd.leader_post.value if cmd.leader_post else None,
        "unit_id": str(cmd.unit_id) if cmd.unit_id else None,
        "entry_method": cmd.entry_method.value,
        "enrolled_on": enrolled_on,
        "released_on": None,
        "release_reason": None,
        "saga_id": saga_id,
    }


def _check_org(ctx: HandlerContext, org: OrgRef | None, cmd: EnrolPerson) -> None:
    if org is not None and org.division_code:
        ctx.require_region(org.division_code)
    model.check_org(org, cmd.category)


async def enrol_person(cmd: EnrolPerson, uow: RosterUnitOfWork, ctx: HandlerContext) -> None:
    cipher = uow.personal_data
    index = cipher.blind_index(cmd.citizen_id)
    saga_id = model.step_id(ctx.envelope.id, "occupy")
    # Most people are new: their row goes in at once, and the unique blind index (or person
    # id) turns away a number already on the roster, which is then looked up. The insert
    # brings back the org as the projection has it, which is checked before anything else
    # is decided: a refusal rolls the transaction back, the new row with it. In a fetch of
    # enrolments the insert was made for all of them at once (``prepare_enrolments``).
    previous: str | None = None
    if (kept := uow.people.added(index)) is not None:
        person_id, added = kept
    else:
        person_id = str(cmd.person_id) if cmd.person_id else new_id()
        values = person_values(cmd, cipher, person_id, status=Status.ENROLLING, saga_id=saga_id)
        added = await uow.people.add({**identity(cmd, cipher, person_id, index), **values})
    if added is not None:
        _check_org(ctx, uow.orgs.seen_with(cmd.org_id, added), cmd)
    else:
        _check_org(ctx, await uow.orgs.get(cmd.org_id), cmd)
        existing = await uow.people.by_index(index)
        if existing is None:  # the person id is someone else's
            raise Rejection(
                ReasonCode.CONFLICT,
                f"person id {person_id} is taken / 人员编号已被占用",
                {"person_id": person_id, "taken": True},
            )
        person_id = existing.person_id
        if cmd.person_id is not None and str(cmd.person_id) != person_id:
            raise Rejection(
                ReasonCode.CONFLICT,
                f"this citizen ID belongs to person {person_id} / 该身份证号已对应其他人员编号",
                {"person_id": person_id, "given_person_id": str(cmd.person_id)},
            )
        previous = existing.status
        values = person_values(cmd, cipher, person_id, status=Status.ENROLLING, saga_id=saga_id)
        if not await uow.people.transition(person_id, model.ENROLLABLE, **values):
            raise model.already_enrolled(person_id, existing.org_id, existing.status)
    ctx.result_subject = person_id
    await _start_saga(
        uow,
        ctx,
        kind="enrol",
        person_id=person_id,
        step=OccupySlot(
            request_id=uuid.UUID(saga_id),
            person_id=uuid.UUID(person_id),
            org_id=cmd.org_id,
            category=cmd.category,
            notice_no=cmd.notice_no,
            leader_post=cmd.leader_post,
            unit_id=cmd.unit_id,
        ),
        payload={
            "previous_status": previous,
            "effective_date": cmd.effective_date.isoformat(),
            "document": cmd.document.model_dump(mode="json") if cmd.document else None,
        },
    )


async def prepare_enrolments(
    uow: RosterUnitOfWork, commands: Sequence[tuple[Envelope, EnrolPerson]]
) -> None:
    """The insert ``enrol_person`` makes for a new person, for a run of enrolments of one
    fetch at once (``CommandRoute.prepare``): one statement instead of one per command. Each
    handler then finds its row (or that the number or person id was taken) and goes on as
    alone. A citizen ID or person id twice in the run is left to its handlers, whose usual
    refusal sends the fetch to be handled one by one."""
    cipher = uow.personal_data
    indexes = [cipher.blind_index(cmd.citizen_id) for _, cmd in commands]
    times = Counter(indexes)
    given = Counter(cmd.person_id for _, cmd in commands if cmd.person_id is not None)
    rows: list[dict[str, Any]] = []
    for (env, cmd), index in zip(commands, indexes, strict=True):
        if times[index] > 1 or (cmd.person_id is not None and given[cmd.person_id] > 1):
            continue
        person_id = str(cmd.person_id) if cmd.person_id else new_id()
        saga_id = model.step_id(env.id, "occupy")
        values = person_values(cmd, cipher, person_id, status=Status.ENROLLING, saga_id=saga_id)
        rows.append({**identity(cmd, cipher, person_id, index), **values})
    if rows:
        await uow.people.add_many(rows)


async def _holder(uow: RosterUnitOfWork, ctx: HandlerContext, citizen_id: str) -> Any:
    """The enrolled person with this citizen ID, settled (not in another saga)."""
    person = await uow.people.by_index(uow.personal_data.blind_index(citizen_id))
    if person is None or person.status not in model.HOLDING:
        raise model.not_enrolled(
            person.person_id if person else None, person.status if person else None
        )
    ctx.result_subject = person.person_id
    if person.status != Status.ACTIVE:
        raise model.busy(person.person_id, person.status)
    org = await uow.orgs.get(uuid.UUID(person.org_id))
    if org is not None and org.division_code:
        ctx.require_region(org.division_code, what="the person's org")
    return person


async def transfer_person(cmd: TransferPerson, uow: RosterUnitOfWork, ctx: HandlerContext) -> None:
    person = await _holder(uow, ctx, cmd.citizen_id)
    if person.org_id == str(cmd.to_org_id):
        raise Rejection(
            ReasonCode.CONFLICT,
            "the person already belongs to this org / 该人员已在目标单位",
            {"person_id": person.person_id, "org_id": person.org_id},
        )
    target = await uow.orgs.get(cmd.to_org_id)
    if target is not None and target.division_code:
        ctx.require_region(target.division_code, what="target org")
    model.check_org(target, cmd.category, role="target org")
    saga_id = model.step_id(ctx.envelope.id, "move")
    if not await uow.people.transition(
        person.person_id, {Status.ACTIVE}, status=Status.TRANSFERRING.value, saga_id=saga_id
    ):
        raise model.busy(person.person_id, person.status)
    await _start_saga(
        uow,
        ctx,
        kind="transfer",
        person_id=person.person_id,
        step=MoveSlot(
            request_id=uuid.UUID(saga_id),
            person_id=uuid.UUID(person.person_id),
            from_org_id=uuid.UUID(person.org_id),
            to_org_id=cmd.to_org_id,
            category=cmd.category,
            notice_no=cmd.notice_no,
            leader_post=cmd.leader_post,
            unit_id=cmd.unit_id,
        ),
        payload={
            "from_org_id": person.org_id,
            "from_category": person.category,
            "to_org_id": str(cmd.to_org_id),
            "category": cmd.category.value,
            "notice_no": cmd.notice_no,
            "position": cmd.position,
            "leader_post": cmd.leader_post.value if cmd.leader_post else None,
            "unit_id": str(cmd.unit_id) if cmd.unit_id else None,
            "effective_date": cmd.effective_date.isoformat(),
            "document": cmd.document.model_dump(mode="json"),
        },
    )


async def release_person(cmd: ReleasePerson, uow: RosterUnitOfWork, ctx: HandlerContext) -> None:
    person = await _holder(uow, ctx, cmd.citizen_id)
    saga_id = model.step_id(ctx.envelope.id, "release")
    if not await uow.people.transition(
        person.person_id, {Status.ACTIVE}, status=Status.RELEASING.value, saga_id=saga_id
    ):
        raise model.busy(person.person_id, person.status)
    await _start_saga(
        uow,
        ctx,
        kind="release",
        person_id=person.person_id,
        step=ReleaseSlot(
            request_id=uuid.UUID(saga_id),
            person_id=uuid.UUID(person.person_id),
            org_id=uuid.UUID(person.org_id),
            category=person.category,
            leader_post=person.leader_post,
            unit_id=uuid.UUID(person.unit_id) if person.unit_id else None,
        ),
        payload={
            "reason": cmd.reason.value,
            "effective_date": cmd.effective_date.isoformat(),
            "document": cmd.document.model_dump(mode="json") if cmd.document else None,
            "note": cmd.note,
        },
    )


_EDITABLE = ("position", "unit_id", "education", "ethnicity", "political_status", "phone")


async def update_person(cmd: UpdatePerson, uow: RosterUnitOfWork, ctx: HandlerContext) -> None:
    person = await _holder(uow, ctx, cmd.citizen_id)
    changes: dict[str, Any] = {}
    changed: list[str] = []
    for name in _EDITABLE:
        value = getattr(cmd, name)
        if value is None:
            continue
        if name == "phone":
            old = (
                uow.personal_data.decrypt(person.phone_enc, context=person.person_id)
                if person.phone_enc
                else None
            )
            if old != value:
                changes["phone_enc"] = uow.personal_data.encrypt(value, context=person.person_id)
                changed.append(name)
            continue
        stored = str(value) if name == "unit_id" else value
        if getattr(person, name) != stored:
            changes[name] = stored
            changed.append(name)
    if not changed:
        raise Rejection(
            ReasonCode.CONFLICT,
            "nothing would change / 信息无变化",
            {"person_id": person.person_id},
        )
    if not await uow.people.transition(person.person_id, {Status.ACTIVE}, **changes):
        raise model.busy(person.person_id, person.status)
    on = cmd.effective_date or office_today()
    event = ctx.emit(
        PersonUpdated(
            person_id=uuid.UUID(person.person_id),
            citizen_id_masked=person.citizen_masked,
            org_id=uuid.UUID(person.org_id),
            changed=changed,
            position=cmd.position if "position" in changed else None,
            unit_id=cmd.unit_id if "unit_id" in changed else None,
            education=cmd.education if "education" in changed else None,
            ethnicity=cmd.ethnicity if "ethnicity" in changed else None,
            political_status=cmd.political_status if "political_status" in changed else None,
            effective_date=on,
        )
    )
    stage_restricted(uow, event, person)
    await uow.people.record(
        event,
        person_id=person.person_id,
        org_id=person.org_id,
        category=person.category,
        effective_date=on,
        document=None,
        details={"changed": changed},
        command=ctx.envelope,
    )


# The routing table: command type → handler and the least role that may issue it. Entering and
# changing people is a clerk's work (WIRE-CONTRACT §2).
COMMANDS: list[CommandRoute] = [
    CommandRoute(EnrolPerson, enrol_person, Role.CLERK, prepare=prepare_enrolments),
    CommandRoute(TransferPerson, transfer_person, Role.CLERK),
    CommandRoute(ReleasePerson, release_person, Role.CLERK),
    CommandRoute(UpdatePerson, update_person, Role.CLERK),
]
