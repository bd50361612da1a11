"""Merging and abolishing orgs (机构合并 / 撤销): sagas with quota.

The orgs service decides what it alone can (the orgs exist, are active, lie in the actor's region,
have no active sub-orgs left behind, are in no other merge or abolition), locks the orgs, and asks
quota to move or close their establishment. Quota's answer ends the saga: on success the orgs
are marked merged or abolished and ``OrgsMerged`` / ``OrgAbolished`` published (the roster moves
the people of merged orgs when it reads ``OrgsMerged``); on refusal the command is rejected with
quota's reason (``org_not_empty``, ``category_not_allowed``, ``region_limit_exceeded``, …).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Any
from uuid import UUID

import structlog

from contracts.codes import OrgStatus, ReasonCode, Role
from contracts.common import Document, effective_date
from contracts.envelope import Envelope, derived_id_after, now
from contracts.orgs import AbolishOrg, MergeOrgs, OrgAbolished, OrgsMerged
from contracts.quota import CloseEstablishment, MergeEstablishments
from contracts.results import CommandCompleted, CommandRejected, CommandResult
from services.orgs.domain import model
from services.orgs.service_layer.handlers import _load_in_region
from services.orgs.service_layer.unit_of_work import OrgsUnitOfWork
from services.runtime.commands import finish_command
from services.runtime.messaging import (
    CommandRoute,
    EventRoute,
    HandlerContext,
    emit_caused,
    send_caused,
)
from services.runtime.periodic import every
from services.runtime.rules import Rejection

log = structlog.get_logger("bianzhi.orgs.sagas")

_NAMESPACE = uuid.UUID("0f6b1c52-8d4e-4c6a-9b0e-7a3d2e5f1c48")
STEP_TYPES = frozenset({MergeEstablishments.TYPE, CloseEstablishment.TYPE})
SWEEP_BATCH = 100


def _step_id(command_id: str, step: str) -> str:
    return derived_id_after(command_id, _NAMESPACE, f"{command_id}/{step}")


async def _lock(uow: OrgsUnitOfWork, org_ids: list[UUID], saga_id: str) -> None:
    taken = await uow.sagas.lock(org_ids, saga_id)
    if taken:
        raise Rejection(
            ReasonCode.CONFLICT,
            "an org is already being merged or abolished / 机构正在办理合并或撤销",
            {"org_ids": taken},
        )


async def _no_children_left(uow: OrgsUnitOfWork, org_ids: list[UUID], leaving: set[UUID]) -> None:
    children = [c for c in await uow.sagas.active_children(org_ids) if UUID(c) not in leaving]
    if children:
        raise Rejection(
            ReasonCode.CONFLICT,
            "the org still has active sub-orgs; move, merge or abolish them first / "
            "机构仍有下属机构，请先调整",
            {"children": children},
        )


async def merge_orgs(cmd: MergeOrgs, uow: OrgsUnitOfWork, ctx: HandlerContext) -> None:
    if cmd.target_org_id in cmd.source_org_ids or len(set(cmd.source_org_ids)) != len(
        cmd.source_org_ids
    ):
        raise Rejection(
            ReasonCode.INVALID_MESSAGE,
            "the target must not be a source and no source may repeat / 合并对象有误",
            {"source_org_ids": [str(s) for s in cmd.source_org_ids]},
        )
    target = await _load_in_region(uow, ctx, cmd.target_org_id, role="target org")
    model.require_active(target, role="target org")
    for org_id in cmd.source_org_ids:
        source = await _load_in_region(uow, ctx, org_id, role="source org")
        model.require_active(source, role="source org")
    sources = set(cmd.source_org_ids)
    if sources & set(await uow.orgs.ancestors(target.org_id)):
        raise Rejection(
            ReasonCode.CONFLICT,
            "the target lies under one of the sources / 合并目标隶属于被合并机构",
            {"target_org_id": str(target.org_id)},
        )
    await _no_children_left(uow, cmd.source_org_ids, sources)
    saga_id = _step_id(ctx.envelope.id, "merge")
    await _lock(uow, [target.org_id, *cmd.source_org_ids], saga_id)
    on = effective_date(cmd.effective_date, cmd.document)
    await _start(uow, ctx, "merge", saga_id, [target.org_id, *cmd.source_org_ids], on)


async def abolish_org(cmd: AbolishOrg, uow: OrgsUnitOfWork, ctx: HandlerContext) -> None:
    org = await _load_in_region(uow, ctx, cmd.org_id)
    model.require_active(org)
    await _no_children_left(uow, [org.org_id], set())
    saga_id = _step_id(ctx.envelope.id, "close")
    await _lock(uow, [org.org_id], saga_id)
    on = effective_date(cmd.effective_date, cmd.document)
    await _start(uow, ctx, "abolish", saga_id, [org.org_id], on)


async def _start(
    uow: OrgsUnitOfWork,
    ctx: HandlerContext,
    kind: str,
    saga_id: str,
    org_ids: list[UUID],
    on: date,
) -> None:
    """Record the saga and send its step to quota; the command's result waits for the answer."""
    payload = {"effective_date": on.isoformat()}
    await uow.sagas.start(
        saga_id=saga_id,
        kind=kind,
        command=ctx.envelope,
        org_ids=org_ids,
        payload=payload,
        step_due_at=now() + timedelta(seconds=uow.saga_step_resend_after_s),
    )
    ctx.send(_step(kind, saga_id, ctx.envelope, payload), id=saga_id)
    ctx.defer_result()


def _step(
    kind: str, saga_id: str, command: Envelope, payload: dict[str, str]
) -> MergeEstablishments | CloseEstablishment:
    """The step a saga sends quota, from its command: the same each time it is sent."""
    on = date.fromisoformat(payload["effective_date"])
    if kind == "merge":
        merge = MergeOrgs.model_validate(command.data)
        return MergeEstablishments(
            request_id=UUID(saga_id),
            source_org_ids=merge.source_org_ids,
            target_org_id=merge.target_org_id,
            document=merge.document,
            effective_date=on,
        )
    abolish = AbolishOrg.model_validate(command.data)
    return CloseEstablishment(
        request_id=UUID(saga_id),
        org_id=abolish.org_id,
        document=abolish.document,
        effective_date=on,
    )


async def resend_overdue_steps(
    uow_factory: Callable[[], OrgsUnitOfWork], *, at: datetime | None = None
) -> int:
    """Send again the step of every saga that has waited for quota's answer past its due time;
    how many. The step keeps its id, so quota answers one it has handled with its stored
    result and handles one it never got: a lost step or a lost answer ends in one outcome."""
    at = at or now()
    async with uow_factory() as uow:
        due = await uow.sagas.overdue(at, SWEEP_BATCH)
        if not due:
            return 0  # nothing written: left without a commit
        for saga in due:
            command = Envelope.from_bytes(saga.command_envelope)
            step = _step(saga.kind, saga.saga_id, command, saga.payload)
            send_caused(uow, step, command, id=saga.saga_id)
            await uow.sagas.resent(
                saga.saga_id, at + timedelta(seconds=uow.saga_step_resend_after_s)
            )
            log.warning(
                "org saga step sent again: no answer from quota yet",
                saga_id=saga.saga_id,
                kind=saga.kind,
                command_id=saga.command_id,
                started=saga.created_at.isoformat(),
            )
        await uow.commit()
    return len(due)


async def resend_unanswered_steps(runtime: Any) -> None:
    """The background task: look for unanswered saga steps every few seconds."""
    interval = runtime.definition.uow_class.saga_sweep_interval_s
    await every(interval, lambda: resend_overdue_steps(runtime.uow), "org saga sweep")


def _ours(result: CommandResult) -> bool:
    return result.command_type in STEP_TYPES


async def step_completed(result: CommandCompleted, uow: OrgsUnitOfWork, env: Envelope) -> None:
    saga = await uow.sagas.get(result.command_id)
    if saga is None or not await uow.sagas.finish(saga.saga_id, "completed"):
        return
    command = Envelope.from_bytes(saga.command_envelope)
    on = date.fromisoformat(saga.payload["effective_date"])
    if saga.kind == "merge":
        cmd = MergeOrgs.model_validate(command.data)
        for org_id in cmd.source_org_ids:
            await _set_status(uow, org_id, OrgStatus.MERGED)
        event = emit_caused(
            uow,
            OrgsMerged(
                source_org_ids=cmd.source_org_ids,
                target_org_id=cmd.target_org_id,
                document=cmd.document,
                effective_date=on,
            ),
            command,
            env.id,
        )
        await _history(uow, cmd.target_org_id, event, command, cmd.document, on)
        subject = str(cmd.target_org_id)
    else:
        abolish = AbolishOrg.model_validate(command.data)
        await _set_status(uow, abolish.org_id, OrgStatus.ABOLISHED)
        event = emit_caused(
            uow,
            OrgAbolished(org_id=abolish.org_id, document=abolish.document, effective_date=on),
            command,
            env.id,
        )
        await _history(uow, abolish.org_id, event, command, abolish.document, on)
        subject = str(abolish.org_id)
    await finish_command(uow, command, uow.source, subject=subject, events=[event])
    log.info("org saga completed", saga_id=saga.saga_id, kind=saga.kind, command_id=command.id)


async def _set_status(uow: OrgsUnitOfWork, org_id: UUID, status: OrgStatus) -> None:
    org = await uow.orgs.get(org_id)
    assert org is not None  # locked by the saga since it started
    await uow.orgs.save(dataclasses.replace(org, status=status))


async def _history(
    uow: OrgsUnitOfWork,
    org_id: UUID,
    event: Envelope,
    command: Envelope,
    document: Document,
    on: date,
) -> None:
    await uow.orgs.record(
        org_id, event, command, document=document.model_dump(mode="json"), effective_date=on
    )


async def step_rejected(result: CommandRejected, uow: OrgsUnitOfWork, env: Envelope) -> None:
    saga = await uow.sagas.get(result.command_id)
    if saga is None or not await uow.sagas.finish(saga.saga_id, "rejected"):
        return
    command = Envelope.from_bytes(saga.command_envelope)
    await finish_command(
        uow, command, uow.source, rejection=Rejection(result.code, result.message, result.details)
    )
    log.warning(
        "org saga refused by quota", saga_id=saga.saga_id, kind=saga.kind, code=result.code.value
    )


RESULT_ROUTES: list[EventRoute] = [
    EventRoute(CommandCompleted, step_completed, accept=_ours),
    EventRoute(CommandRejected, step_rejected, accept=_ours),
]

# Merging and abolishing are org changes: an approver at least (WIRE-CONTRACT §2).
SAGA_COMMANDS: list[CommandRoute] = [
    CommandRoute(MergeOrgs, merge_orgs, Role.APPROVER),
    CommandRoute(AbolishOrg, abolish_org, Role.APPROVER),
]
