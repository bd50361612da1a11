"""The ends of the roster sagas: quota's answer to a slot request, or the step's timeout.

Quota answers each slot request (sent with the request id as its message id) with one result on
``bianzhi.command-results.v1`` and, as the request names it (``replyto``), on the roster's
answers topic ``bianzhi.roster.answers.v1``, where the roster reads them. The saga
row decides, by a conditional update, which of answer and timeout ends the saga: the one that
comes second changes nothing. An enrolment whose step timed out is refused with ``timeout`` and
its slot request is cancelled in quota (``ReleaseSlot`` with ``occupy_request_id``), which
also undoes it if it took effect after all, so a late answer never counts twice. An overdue
transfer or release is cancelled in quota if it has not taken effect (``CancelSlotRequest``)
and ends on that answer: ``timeout`` when cancelled, completed when it had taken effect.

Saga statuses: ``waiting`` (for quota's answer), then ``completed`` or ``rejected``; on a
timeout an enrolment goes ``timed_out`` (its compensation on the way to quota) and then
``compensated``, a transfer or release goes ``cancelling`` and then ``cancelled`` (or
``completed`` when the step had taken effect); ``compensation_failed`` when quota refused the
compensation or the cancel.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import date
from typing import Any

import structlog
from sqlalchemy.engine import Row

from contracts.codes import Category, EntryMethod, LeaderPost, ReasonCode, ReleaseReason
from contracts.common import Document
from contracts.envelope import Envelope, now
from contracts.quota import CancelSlotRequest, MoveSlot, OccupySlot, ReleaseSlot
from contracts.results import CommandCompleted, CommandRejected, CommandResult
from contracts.roster import PersonEnrolled, PersonReleased, PersonTransferred
from services.roster.adapters.repository import command_envelope
from services.roster.domain import model
from services.roster.domain.model import Status
from services.roster.service_layer.restricted import stage_restricted
from services.roster.service_layer.unit_of_work import RosterUnitOfWork
from services.runtime.commands import finish_command
from services.runtime.messaging import EventRoute, emit_caused, send_caused
from services.runtime.periodic import every
from services.runtime.rules import Rejection

log = structlog.get_logger("bianzhi.roster.saga")

STEP_TYPES = frozenset({OccupySlot.TYPE, MoveSlot.TYPE, ReleaseSlot.TYPE, CancelSlotRequest.TYPE})
SWEEP_BATCH = 100


def _ours(result: CommandResult) -> bool:
    return result.command_type in STEP_TYPES


async def prepare_answers(
    uow: RosterUnitOfWork, answers: Sequence[tuple[Envelope, CommandResult]]
) -> None:
    """The usual work of a fetch of quota's answers, in a statement or two instead of two per
    answer: the sagas waiting for them end (one statement per outcome) and the enrolments
    among them take effect (one statement per effective date). ``step_completed`` and
    ``step_rejected`` then find those rows kept for them and do the rest answer by answer.
    An id answered twice in one fetch is left to them, so the first answer wins as ever. Doing
    this before the fetch's other answers is safe: those (late answers, a compensation's or a
    cancel's) concern sagas no longer waiting, and a person has one waiting saga at most."""
    times = Counter(result.command_id for _, result in answers)
    by_outcome: dict[str, list[str]] = {"completed": [], "rejected": []}
    for _, result in answers:
        if times[result.command_id] == 1:
            outcome = "completed" if isinstance(result, CommandCompleted) else "rejected"
            by_outcome[outcome].append(result.command_id)
    enrolled: list[tuple[str, str, date]] = []
    for outcome, request_ids in by_outcome.items():
        if not request_ids:
            continue
        for saga in await uow.sagas.answer_many(request_ids, outcome):
            if outcome == "completed" and saga.kind == "enrol":
                on = date.fromisoformat((saga.payload or {})["effective_date"])
                enrolled.append((saga.person_id, saga.saga_id, on))
    if enrolled:
        await uow.people.activate_many(enrolled)


async def step_completed(result: CommandCompleted, uow: RosterUnitOfWork, env: Envelope) -> None:
    # The usual answer: the step of a saga still waiting for it, which it ends.
    ended = await uow.sagas.answered(result.command_id, "completed")
    if ended is not None:
        await _succeeded(uow, ended, env)
        return
    saga = await uow.sagas.by_request(result.command_id)
    if saga is None:
        return
    if saga.compensation_request_id == result.command_id:
        if saga.kind == "enrol":
            await uow.sagas.finish(saga.saga_id, "timed_out", "compensated")
            log.info("saga compensated", saga_id=saga.saga_id, kind=saga.kind)
        elif await uow.sagas.finish(saga.saga_id, "cancelling", "cancelled"):
            # The step was cancelled before it took effect: nothing changed anywhere.
            await _undo_in_roster(uow, saga)
            await finish_command(uow, command_envelope(saga), uow.source, rejection=_timeout(saga))
            log.warning("saga cancelled, its step overdue", saga_id=saga.saga_id, kind=saga.kind)
        return
    log.info("late answer ignored", saga_id=saga.saga_id, status=saga.status)


async def _succeeded(uow: RosterUnitOfWork, saga: Row[Any], env: Envelope) -> None:
    """Apply a step that took effect in quota and complete the saga's command."""
    command = command_envelope(saga)
    if saga.kind == "enrol":
        event = await _enrolled(uow, saga, command, env.id)
    else:
        person = await uow.people.get(saga.person_id)
        assert person is not None
        if saga.kind == "transfer":
            event = await _transferred(uow, saga, person, command, env.id)
        else:
            event = await _released(uow, saga, person, command, env.id)
    await finish_command(uow, command, uow.source, subject=saga.person_id, events=[event])
    log.info("saga completed", saga_id=saga.saga_id, kind=saga.kind, command_id=command.id)


async def _enrolled(
    uow: RosterUnitOfWork, saga: Row[Any], command: Envelope, cause: str
) -> Envelope:
    payload = saga.payload or {}
    on = date.fromisoformat(payload["effective_date"])
    person = await uow.people.activate(saga.person_id, saga.saga_id, on)
    if person is None:  # no longer enrolling under this saga: the event tells what quota did
        person = await uow.people.get(saga.person_id)
        assert person is not None
    document = payload.get("document")
    event = emit_caused(
        uow,
        PersonEnrolled(
            person_id=uuid.UUID(person.person_id),
            citizen_id_masked=person.citizen_masked,
            name=person.name,
            org_id=uuid.UUID(person.org_id),
            category=Category(person.category),
            notice_no=person.notice_no,
            position=person.position,
            leader_post=LeaderPost(person.leader_post) if person.leader_post else None,
            unit_id=uuid.UUID(person.unit_id) if person.unit_id else None,
            entry_method=EntryMethod(person.entry_method),
            effective_date=on,
            document=Document.model_validate(document) if document else None,
            sex=person.sex,
            ethnicity=person.ethnicity,
            education=person.education,
            political_status=person.political_status,
        ),
        command,
        cause,
    )
    stage_restricted(uow, event, person)
    await uow.people.record(
        event,
        person_id=person.person_id,
        org_id=person.org_id,
        category=person.category,
        effective_date=on,
        document=document,
        details={"notice_no": person.notice_no, "entry_method": person.entry_method},
        command=command,
    )
    return event


async def _transferred(
    uow: RosterUnitOfWork, saga: Row[Any], person: Row[Any], command: Envelope, cause: str
) -> Envelope:
    p = saga.payload
    on = date.fromisoformat(p["effective_date"])
    await uow.people.transition(
        saga.person_id,
        {Status.TRANSFERRING},
        only_saga=saga.saga_id,
        status=Status.ACTIVE.value,
        org_id=p["to_org_id"],
        category=p["category"],
        notice_no=p["notice_no"],
        position=p["position"] if p["position"] is not None else person.position,
        leader_post=p["leader_post"],
        unit_id=p["unit_id"],
    )
    event = emit_caused(
        uow,
        PersonTransferred(
            person_id=uuid.UUID(person.person_id),
            citizen_id_masked=person.citizen_masked,
            from_org_id=uuid.UUID(p["from_org_id"]),
            to_org_id=uuid.UUID(p["to_org_id"]),
            from_category=Category(p["from_category"]),
            category=Category(p["category"]),
            notice_no=p["notice_no"],
            position=p["position"],
            leader_post=LeaderPost(p["leader_post"]) if p["leader_post"] else None,
            unit_id=uuid.UUID(p["unit_id"]) if p["unit_id"] else None,
            effective_date=on,
            document=Document.model_validate(p["document"]),
        ),
        command,
        cause,
    )
    stage_restricted(uow, event, person)
    await uow.people.record(
        event,
        person_id=person.person_id,
        org_id=p["to_org_id"],
        category=p["category"],
        effective_date=on,
        document=p["document"],
        details={"from_org_id": p["from_org_id"], "notice_no": p["notice_no"]},
        command=command,
    )
    return event


async def _released(
    uow: RosterUnitOfWork, saga: Row[Any], person: Row[Any], command: Envelope, cause: str
) -> Envelope:
    p = saga.payload
    on = date.fromisoformat(p["effective_date"])
    await uow.people.transition(
        saga.person_id,
        {Status.RELEASING},
        only_saga=saga.saga_id,
        status=Status.RELEASED.value,
        released_on=on,
        release_reason=p["reason"],
    )
    event = emit_caused(
        uow,
        PersonReleased(
            person_id=uuid.UUID(person.person_id),
            citizen_id_masked=person.citizen_masked,
            org_id=uuid.UUID(person.org_id),
            category=Category(person.category),
            reason=ReleaseReason(p["reason"]),
            effective_date=on,
            document=Document.model_validate(p["document"]) if p["document"] else None,
        ),
        command,
        cause,
    )
    stage_restricted(uow, event, person)
    await uow.people.record(
        event,
        person_id=person.person_id,
        org_id=person.org_id,
        category=person.category,
        effective_date=on,
        document=p["document"],
        details={"reason": p["reason"], "note": p.get("note")},
        command=command,
    )
    return event


async def step_rejected(result: CommandRejected, uow: RosterUnitOfWork, env: Envelope) -> None:
    ended = await uow.sagas.answered(result.command_id, "rejected")
    if ended is not None:
        await _refused(uow, ended, result)
        return
    saga = await uow.sagas.by_request(result.command_id)
    if saga is None:
        return
    if saga.compensation_request_id == result.command_id:
        if (
            saga.kind != "enrol"
            and result.code is ReasonCode.CONFLICT
            and result.details.get("outcome") == "completed"
            and await uow.sagas.finish(saga.saga_id, "cancelling", "completed")
        ):
            # Too late to cancel: the step had taken effect, so the saga ends as it would have.
            log.info("overdue step had taken effect", saga_id=saga.saga_id, kind=saga.kind)
            await _succeeded(uow, saga, env)
            return
        # The compensation could not run (the org is gone from quota's view, say): an operator
        # must look. The enrolment itself was refused already.
        log.error(
            "saga compensation refused by quota",
            saga_id=saga.saga_id,
            code=result.code.value,
            reason=result.message,
        )
        await uow.sagas.finish(saga.saga_id, saga.status, "compensation_failed")
        return
    log.info("late answer ignored", saga_id=saga.saga_id, status=saga.status)


async def _refused(uow: RosterUnitOfWork, saga: Row[Any], result: CommandRejected) -> None:
    """Undo a step quota refused and refuse the saga's command with quota's reason."""
    await _undo_in_roster(uow, saga)
    command = command_envelope(saga)
    await finish_command(
        uow,
        command,
        uow.source,
        rejection=Rejection(result.code, result.message, result.details),
    )
    log.warning(
        "saga refused by quota", saga_id=saga.saga_id, kind=saga.kind, code=result.code.value
    )


async def _undo_in_roster(uow: RosterUnitOfWork, saga: Row[Any]) -> None:
    """Put the person back where they stood before the saga."""
    if saga.kind == "enrol":
        previous = (saga.payload or {}).get("previous_status") or Status.FAILED.value
        await uow.people.transition(
            saga.person_id, {Status.ENROLLING}, only_saga=saga.saga_id, status=previous
        )
    else:
        busy = Status.TRANSFERRING if saga.kind == "transfer" else Status.RELEASING
        await uow.people.transition(
            saga.person_id, {busy}, only_saga=saga.saga_id, status=Status.ACTIVE.value
        )


async def time_out(uow: RosterUnitOfWork, saga: Row[Any]) -> bool:
    """End an overdue saga: refuse its command with ``timeout`` and cancel its step in quota.

    A transfer or release is one atomic step in quota: it is cancelled if it has not taken
    effect (``CancelSlotRequest``, keyed like the step so it arrives after it), and the saga
    ends on quota's answer to that: refused with ``timeout`` when cancelled (saga
    ``cancelled``), completed as usual when the step had taken effect after all.
    """
    if saga.kind != "enrol":
        cancel = model.step_id(saga.command_id, "cancel")
        if not await uow.sagas.finish(
            saga.saga_id, "waiting", "cancelling", compensation_request_id=cancel
        ):
            return False
        person = await uow.people.get(saga.person_id)
        assert person is not None
        payload = saga.payload or {}
        keyed_by = payload["to_org_id"] if saga.kind == "transfer" else person.org_id
        command = command_envelope(saga)
        step = CancelSlotRequest(
            request_id=uuid.UUID(cancel),
            cancels_request_id=uuid.UUID(saga.step_request_id),
            person_id=uuid.UUID(person.person_id),
            org_id=uuid.UUID(keyed_by),
        )
        send_caused(uow, step, command, id=cancel)
        log.warning("saga step overdue, cancelling it", saga_id=saga.saga_id, kind=saga.kind)
        return True
    compensation = model.step_id(saga.command_id, "compensate")
    if not await uow.sagas.finish(
        saga.saga_id, "waiting", "timed_out", compensation_request_id=compensation
    ):
        return False
    person = await uow.people.get(saga.person_id)
    assert person is not None
    await _undo_in_roster(uow, saga)
    command = command_envelope(saga)
    release = ReleaseSlot(
        request_id=uuid.UUID(compensation),
        person_id=uuid.UUID(person.person_id),
        org_id=uuid.UUID(person.org_id),
        category=Category(person.category),
        leader_post=LeaderPost(person.leader_post) if person.leader_post else None,
        unit_id=uuid.UUID(person.unit_id) if person.unit_id else None,
        occupy_request_id=uuid.UUID(saga.step_request_id),
    )
    send_caused(uow, release, command, id=compensation)
    await finish_command(uow, command, uow.source, rejection=_timeout(saga))
    log.warning("saga timed out, compensating", saga_id=saga.saga_id, command_id=command.id)
    return True


def _timeout(saga: Row[Any]) -> Rejection:
    return Rejection(
        ReasonCode.TIMEOUT,
        "quota did not answer in time; nothing was changed / 编制核验超时，未作变更",
        {"person_id": saga.person_id, "step": saga.step_type, "saga_id": saga.saga_id},
    )


async def sweep_once(uow_factory: Any, *, at: Any = None) -> int:
    """Time out every overdue saga step; how many were ended."""
    ended = 0
    async with uow_factory() as uow:
        due = await uow.sagas.overdue(at or now(), SWEEP_BATCH)
        if not due:
            return 0  # nothing written: left without a commit
        for saga in due:
            if await time_out(uow, saga):
                ended += 1
        await uow.commit()
    return ended


async def sweep_overdue_sagas(runtime: Any) -> None:
    """The background task: look for overdue saga steps every few seconds."""
    interval = runtime.definition.uow_class.saga_sweep_interval_s
    await every(interval, lambda: sweep_once(runtime.uow), "saga timeout sweep")


# The results of the roster's own slot requests, read from its answers topic (anything else
# there, such as a front end's command that named it, ends no saga and is passed over).
RESULT_ROUTES: list[EventRoute] = [
    EventRoute(CommandCompleted, step_completed, accept=_ours),
    EventRoute(CommandRejected, step_rejected, accept=_ours),
]
