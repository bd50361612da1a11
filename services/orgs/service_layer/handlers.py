"""Command handlers of the orgs service: plain functions of (command, uow, context)."""

from __future__ import annotations

from datetime import date
from uuid import UUID

from contracts.codes import ReasonCode, Role
from contracts.common import Document, effective_date
from contracts.envelope import Envelope
from contracts.orgs import (
    AddInternalUnit,
    InternalUnitAdded,
    InternalUnitRemoved,
    MoveOrg,
    OrgFunctionsUpdated,
    OrgMoved,
    OrgRegistered,
    OrgRenamed,
    RegisterOrg,
    RemoveInternalUnit,
    RenameOrg,
    UpdateFunctions,
)
from services.orgs.domain import model
from services.orgs.service_layer.unit_of_work import OrgsUnitOfWork
from services.runtime.messaging import CommandRoute, HandlerContext
from services.runtime.rules import Rejection


async def _load(uow: OrgsUnitOfWork, org_id: UUID, *, role: str = "org") -> model.Org:
    org = await uow.orgs.get(org_id)
    if org is None:
        raise Rejection(
            ReasonCode.NOT_FOUND,
            f"{role} {org_id} does not exist / 机构不存在",
            {"org_id": str(org_id)},
        )
    return org


async def _load_in_region(
    uow: OrgsUnitOfWork, ctx: HandlerContext, org_id: UUID, *, role: str = "org"
) -> model.Org:
    org = await _load(uow, org_id, role=role)
    ctx.require_region(org.division_code, what=role)
    return org


async def _record(
    uow: OrgsUnitOfWork,
    ctx: HandlerContext,
    org_id: UUID,
    event: Envelope,
    document: Document | None,
    effective_date: date,
) -> None:
    await uow.orgs.record(
        org_id,
        event,
        ctx.envelope,
        document=document.model_dump(mode="json") if document else None,
        effective_date=effective_date,
    )


async def register_org(cmd: RegisterOrg, uow: OrgsUnitOfWork, ctx: HandlerContext) -> None:
    ctx.require_region(cmd.division_code)
    parent = None
    if cmd.parent_org_id is not None:
        parent = await _load_in_region(uow, ctx, cmd.parent_org_id, role="parent org")
    if cmd.uscc is not None and (holder := await uow.orgs.uscc_holder(cmd.uscc)) is not None:
        raise Rejection(
            ReasonCode.CONFLICT,
            f"USCC {cmd.uscc} already belongs to org {holder} / 统一社会信用代码已被占用",
            {"uscc": cmd.uscc, "org_id": str(holder)},
        )
    effective = effective_date(cmd.effective_date, cmd.document)
    org, warnings = model.register(
        org_id=cmd.org_id,
        name=cmd.name,
        kind=cmd.kind,
        division_code=cmd.division_code,
        parent=parent,
        uscc=cmd.uscc,
        grade=cmd.grade,
        alt_names=cmd.alt_names,
        functions=cmd.functions,
        funding=cmd.funding,
        effective_date=effective,
    )
    if not await uow.orgs.add(org):
        raise Rejection(
            ReasonCode.CONFLICT,
            f"org {cmd.org_id} already exists / 机构标识已存在",
            {"org_id": str(cmd.org_id)},
        )
    event = ctx.emit(
        OrgRegistered(
            org_id=org.org_id,
            name=org.name,
            kind=org.kind,
            division_code=org.division_code,
            parent_org_id=org.parent_org_id,
            uscc=org.uscc,
            grade=org.grade,
            alt_names=list(org.alt_names),
            functions=list(org.functions),
            funding=org.funding,
            status=org.status,
            document=cmd.document,
            effective_date=effective,
            warnings=warnings,
        )
    )
    await _record(uow, ctx, org.org_id, event, cmd.document, effective)


async def rename_org(cmd: RenameOrg, uow: OrgsUnitOfWork, ctx: HandlerContext) -> None:
    org = await _load_in_region(uow, ctx, cmd.org_id)
    renamed = model.rename(org, cmd.name, cmd.alt_names)
    await uow.orgs.save(renamed)
    effective = effective_date(cmd.effective_date, cmd.document)
    event = ctx.emit(
        OrgRenamed(
            org_id=org.org_id,
            name=renamed.name,
            previous_name=org.name,
            alt_names=list(renamed.alt_names),
            document=cmd.document,
            effective_date=effective,
        )
    )
    await _record(uow, ctx, org.org_id, event, cmd.document, effective)


async def update_functions(cmd: UpdateFunctions, uow: OrgsUnitOfWork, ctx: HandlerContext) -> None:
    org = await _load_in_region(uow, ctx, cmd.org_id)
    updated = model.update_functions(org, cmd.functions)
    await uow.orgs.save(updated)
    effective = effective_date(cmd.effective_date, cmd.document)
    event = ctx.emit(
        OrgFunctionsUpdated(
            org_id=org.org_id,
            functions=list(updated.functions),
            document=cmd.document,
            effective_date=effective,
        )
    )
    await _record(uow, ctx, org.org_id, event, cmd.document, effective)


async def add_internal_unit(cmd: AddInternalUnit, uow: OrgsUnitOfWork, ctx: HandlerContext) -> None:
    org = await _load_in_region(uow, ctx, cmd.org_id)
    updated = model.add_unit(org, cmd.unit_id, cmd.name)
    await uow.orgs.save(updated)
    effective = effective_date(cmd.effective_date, cmd.document)
    event = ctx.emit(
        InternalUnitAdded(
            org_id=org.org_id,
            unit_id=cmd.unit_id,
            name=cmd.name,
            document=cmd.document,
            effective_date=effective,
        )
    )
    await _record(uow, ctx, org.org_id, event, cmd.document, effective)


async def remove_internal_unit(
    cmd: RemoveInternalUnit, uow: OrgsUnitOfWork, ctx: HandlerContext
) -> None:
    org = await _load_in_region(uow, ctx, cmd.org_id)
    updated, unit = model.remove_unit(org, cmd.unit_id)
    await uow.orgs.save(updated)
    effective = effective_date(cmd.effective_date, cmd.document)
    event = ctx.emit(
        InternalUnitRemoved(
            org_id=org.org_id,
            unit_id=unit.unit_id,
            name=unit.name,
            document=cmd.document,
            effective_date=effective,
        )
    )
    await _record(uow, ctx, org.org_id, event, cmd.document, effective)


async def move_org(cmd: MoveOrg, uow: OrgsUnitOfWork, ctx: HandlerContext) -> None:
    org = await _load_in_region(uow, ctx, cmd.org_id)
    parent = await _load_in_region(uow, ctx, cmd.parent_org_id, role="parent org")
    chain = await uow.orgs.ancestors(parent.org_id)
    moved = model.move(org, parent, chain)
    await uow.orgs.save(moved)
    effective = effective_date(cmd.effective_date, cmd.document)
    event = ctx.emit(
        OrgMoved(
            org_id=org.org_id,
            parent_org_id=parent.org_id,
            previous_parent_org_id=org.parent_org_id,
            division_code=org.division_code,
            document=cmd.document,
            effective_date=effective,
        )
    )
    await _record(uow, ctx, org.org_id, event, cmd.document, effective)


# The routing table: command type → handler and the least role that may issue it.
# Org changes (register, rename, move) need an approver; details (functions, units) a clerk.
COMMANDS: list[CommandRoute] = [
    CommandRoute(RegisterOrg, register_org, Role.APPROVER),
    CommandRoute(RenameOrg, rename_org, Role.APPROVER),
    CommandRoute(MoveOrg, move_org, Role.APPROVER),
    CommandRoute(UpdateFunctions, update_functions, Role.CLERK),
    CommandRoute(AddInternalUnit, add_internal_unit, Role.CLERK),
    CommandRoute(RemoveInternalUnit, remove_internal_unit, Role.CLERK),
]
