"""Command handlers of the quota service: plain functions of (command, uow, context)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from uuid import UUID

from contracts import identifiers
from contracts.codes import Category, ReasonCode, Role
from contracts.common import Document
from contracts.quota import (
    ApproveQuota,
    LeaderPostsSet,
    QuotaApproved,
    QuotaTransferred,
    RegionLimitReached,
    RegionLimitSet,
    SetLeaderPosts,
    SetRegionLimit,
    TransferQuota,
)
from services.quota.domain import model
from services.quota.service_layer.unit_of_work import QuotaUnitOfWork
from services.runtime.messaging import CommandRoute, HandlerContext
from services.runtime.rules import Rejection


async def _load_in_region(
    uow: QuotaUnitOfWork, ctx: HandlerContext, org_id: UUID, *, role: str = "org"
) -> model.OrgRef:
    org = await uow.orgs.get(org_id)
    if org is None or not org.registered:
        raise Rejection(
            ReasonCode.NOT_FOUND,
            f"{role} {org_id} is not known to the quota service / 机构不存在或尚未同步",
            {"org_id": str(org_id)},
        )
    assert org.division_code is not None
    ctx.require_region(org.division_code, what=role)
    return org


async def _holder(
    uow: QuotaUnitOfWork, ctx: HandlerContext, org_id: UUID, category: Category, role: str
) -> model.OrgRef:
    """An org in the actor's region that is active and may hold ``category``."""
    org = await _load_in_region(uow, ctx, org_id, role=role)
    model.require_active(org, role=role)
    model.require_category(org, category)
    return org


def _chain(division_code: str) -> list[str]:
    """The division and every division enclosing it, nearest first."""
    return [division_code, *identifiers.ancestors(division_code)]


async def _regions(
    uow: QuotaUnitOfWork, codes: Iterable[str], category: Category
) -> list[model.RegionUse]:
    """The regions among ``codes`` with a limit of ``category``, and what is approved in each,
    in the order of ``codes`` (nearest first)."""
    codes = list(codes)
    limits = await uow.ledger.limits(codes, category)
    return [
        model.RegionUse(code, limits[code], await uow.ledger.used(code, category))
        for code in codes
        if code in limits
    ]


def _emit_thresholds(
    ctx: HandlerContext,
    category: Category,
    region: model.RegionUse,
    *,
    used_after: int,
    limit_before: int | None = None,
    limit_after: int | None = None,
) -> None:
    before = region.limit if limit_before is None else limit_before
    after = region.limit if limit_after is None else limit_after
    for percent in model.crossed_thresholds(before, region.used, after, used_after):
        ctx.emit(
            RegionLimitReached(
                division_code=region.division_code,
                category=category,
                limit=after,
                used=used_after,
                threshold_percent=percent,
            )
        )


def _effective(effective_date: date | None, document: Document) -> date:
    return effective_date if effective_date is not None else document.date


def _document(document: Document) -> dict[str, str]:
    return document.model_dump(mode="json")


async def set_region_limit(cmd: SetRegionLimit, uow: QuotaUnitOfWork, ctx: HandlerContext) -> None:
    ctx.require_region(cmd.division_code)
    await uow.ledger.lock([model.province_of(cmd.division_code)], cmd.category)
    chain = _chain(cmd.division_code)
    limits = await uow.ledger.limits(chain, cmd.category)
    previous = limits.pop(cmd.division_code, None)
    used = await uow.ledger.used(cmd.division_code, cmd.category)
    model.check_region_limit(
        cmd.division_code,
        cmd.category,
        cmd.limit,
        used=used,
        ancestor_limits=limits,
        descendant_limits=await uow.ledger.limits_below(cmd.division_code, cmd.category),
    )
    await uow.ledger.set_limit(cmd.division_code, cmd.category, cmd.limit)
    effective = _effective(cmd.effective_date, cmd.document)
    event = ctx.emit(
        RegionLimitSet(
            division_code=cmd.division_code,
            category=cmd.category,
            limit=cmd.limit,
            previous_limit=previous,
            document=cmd.document,
            effective_date=effective,
        )
    )
    await uow.ledger.record(
        event,
        ctx.envelope,
        document=_document(cmd.document),
        effective_date=effective,
        division_code=cmd.division_code,
        category=cmd.category,
        before=None if previous is None else {"limit": previous},
        after={"limit": cmd.limit, "used": used},
    )
    region = model.RegionUse(cmd.division_code, cmd.limit, used)
    _emit_thresholds(
        ctx,
        cmd.category,
        region,
        used_after=used,
        limit_before=previous or 0,
        limit_after=cmd.limit,
    )


async def approve_quota(cmd: ApproveQuota, uow: QuotaUnitOfWork, ctx: HandlerContext) -> None:
    org = await _holder(uow, ctx, cmd.org_id, cmd.category, "org")
    assert org.division_code is not None
    await uow.ledger.lock([model.province_of(org.division_code)], cmd.category)
    current = await uow.ledger.establishment(org.org_id, cmd.category)
    model.check_not_below_held(current, cmd.approved)
    delta = cmd.approved - current.approved
    regions = await _regions(uow, _chain(org.division_code), cmd.category)
    model.check_within_limits(regions, {r.division_code: delta for r in regions}, cmd.category)
    if not await uow.ledger.set_approved(org.org_id, cmd.category, cmd.approved, cmd.funding):
        # A slot was taken since the read above; the conditional update refused the change.
        now_held = await uow.ledger.establishment(org.org_id, cmd.category)
        raise model.below_occupied(now_held, cmd.approved)
    event = ctx.emit(
        QuotaApproved(
            org_id=org.org_id,
            category=cmd.category,
            approved=cmd.approved,
            previous_approved=current.approved,
            funding=cmd.funding,
            document=cmd.document,
            effective_date=cmd.effective_date,
        )
    )
    await uow.ledger.record(
        event,
        ctx.envelope,
        document=_document(cmd.document),
        effective_date=cmd.effective_date,
        org_id=org.org_id,
        division_code=org.division_code,
        category=cmd.category,
        before={"approved": current.approved},
        after={"approved": cmd.approved},
    )
    for region in regions:
        _emit_thresholds(ctx, cmd.category, region, used_after=region.used + delta)


async def transfer_quota(cmd: TransferQuota, uow: QuotaUnitOfWork, ctx: HandlerContext) -> None:
    source = await _holder(uow, ctx, cmd.from_org_id, cmd.category, "source org")
    target = await _holder(uow, ctx, cmd.to_org_id, cmd.category, "target org")
    assert source.division_code is not None and target.division_code is not None
    provinces = {model.province_of(source.division_code), model.province_of(target.division_code)}
    await uow.ledger.lock(provinces, cmd.category)
    giving = await uow.ledger.establishment(source.org_id, cmd.category)
    receiving = await uow.ledger.establishment(target.org_id, cmd.category)
    model.check_not_below_held(giving, giving.approved - cmd.amount)
    # A region enclosing both orgs keeps its total; only regions around the target alone gain.
    source_chain, target_chain = _chain(source.division_code), _chain(target.division_code)
    asked = {code: cmd.amount for code in target_chain if code not in source_chain}
    regions = await _regions(uow, asked, cmd.category)
    model.check_within_limits(regions, asked, cmd.category)
    if not await uow.ledger.add_approved(source.org_id, cmd.category, -cmd.amount):
        now_held = await uow.ledger.establishment(source.org_id, cmd.category)
        raise model.below_occupied(now_held, now_held.approved - cmd.amount)
    await uow.ledger.add_approved(target.org_id, cmd.category, cmd.amount)
    from_approved = giving.approved - cmd.amount
    to_approved = receiving.approved + cmd.amount
    effective = _effective(cmd.effective_date, cmd.document)
    event = ctx.emit(
        QuotaTransferred(
            from_org_id=source.org_id,
            to_org_id=target.org_id,
            category=cmd.category,
            amount=cmd.amount,
            from_approved=from_approved,
            to_approved=to_approved,
            document=cmd.document,
            effective_date=effective,
        )
    )
    for org, before, after in (
        (source, giving.approved, from_approved),
        (target, receiving.approved, to_approved),
    ):
        await uow.ledger.record(
            event,
            ctx.envelope,
            document=_document(cmd.document),
            effective_date=effective,
            org_id=org.org_id,
            division_code=org.division_code,
            category=cmd.category,
            before={"approved": before},
            after={"approved": after},
        )
    for region in regions:
        _emit_thresholds(ctx, cmd.category, region, used_after=region.used + cmd.amount)


async def set_leader_posts(cmd: SetLeaderPosts, uow: QuotaUnitOfWork, ctx: HandlerContext) -> None:
    org = await _load_in_region(uow, ctx, cmd.org_id)
    model.require_active(org)
    previous = await uow.ledger.leader_posts(org.org_id, cmd.unit_id)
    model.check_leader_posts(previous or model.LeaderPosts(), cmd.principal, cmd.deputy)
    if not await uow.ledger.set_leader_posts(org.org_id, cmd.unit_id, cmd.principal, cmd.deputy):
        held = await uow.ledger.leader_posts(org.org_id, cmd.unit_id)
        model.check_leader_posts(held or model.LeaderPosts(), cmd.principal, cmd.deputy)
    effective = _effective(cmd.effective_date, cmd.document)
    event = ctx.emit(
        LeaderPostsSet(
            org_id=org.org_id,
            unit_id=cmd.unit_id,
            principal=cmd.principal,
            deputy=cmd.deputy,
            previous_principal=previous.principal if previous else None,
            previous_deputy=previous.deputy if previous else None,
            document=cmd.document,
            effective_date=effective,
        )
    )
    await uow.ledger.record(
        event,
        ctx.envelope,
        document=_document(cmd.document),
        effective_date=effective,
        org_id=org.org_id,
        unit_id=cmd.unit_id,
        division_code=org.division_code,
        before=({"principal": previous.principal, "deputy": previous.deputy} if previous else None),
        after={"principal": cmd.principal, "deputy": cmd.deputy},
    )


# The routing table: command type → handler and the least role that may issue it.
# Quota, limits and leader posts are approvals (WIRE-CONTRACT §2): an approver at least.
COMMANDS: list[CommandRoute] = [
    CommandRoute(SetRegionLimit, set_region_limit, Role.APPROVER),
    CommandRoute(ApproveQuota, approve_quota, Role.APPROVER),
    CommandRoute(TransferQuota, transfer_quota, Role.APPROVER),
    CommandRoute(SetLeaderPosts, set_leader_posts, Role.APPROVER),
]
