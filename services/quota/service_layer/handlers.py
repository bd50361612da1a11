"""Command handlers of the quota service: plain functions of (command, uow, context)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import date
from typing import Any
from uuid import UUID

import structlog

from contracts import identifiers
from contracts.codes import Category, LeaderPost, ReasonCode, Role
from contracts.common import Document, effective_date
from contracts.envelope import Envelope, new_id
from contracts.quota import (
    ApproveQuota,
    CancelQuotaUseNotice,
    CancelSlotRequest,
    IssueQuotaUseNotice,
    LeaderPostsSet,
    MoveSlot,
    OccupySlot,
    QuotaApproved,
    QuotaTransferred,
    QuotaUseNoticeCancelled,
    QuotaUseNoticeExpired,
    QuotaUseNoticeIssued,
    RegionLimitReached,
    RegionLimitSet,
    ReleaseSlot,
    SetLeaderPosts,
    SetRegionLimit,
    SlotMoved,
    SlotOccupied,
    SlotReleased,
    TransferQuota,
)
from services.quota.adapters.repository import NewSlot, RequestClaim, unit_of
from services.quota.domain import model
from services.quota.service_layer.unit_of_work import QuotaUnitOfWork
from services.runtime.messaging import CommandRoute, HandlerContext
from services.runtime.rules import Rejection

log = structlog.get_logger("bianzhi.quota.handlers")

# The calendar day the handlers judge notices by; tests replace it to move time.
today = model.today


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
    limited = [code for code in codes if code in limits]
    used = await uow.ledger.used_in(limited, category)
    return [model.RegionUse(code, limits[code], used[code]) for code in limited]


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
    effective = effective_date(cmd.effective_date, cmd.document)
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
    await expire_notices(uow, today(), ctx, org_id=org.org_id, category=cmd.category)
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
    await expire_notices(uow, today(), ctx, org_id=source.org_id, category=cmd.category)
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
    effective = effective_date(cmd.effective_date, cmd.document)
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
    effective = effective_date(cmd.effective_date, cmd.document)
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


# --- quota-use notices (用编通知单) ---------------------------------------------------------


async def expire_notices(
    uow: QuotaUnitOfWork,
    on: date,
    ctx: HandlerContext | None = None,
    *,
    org_id: UUID | None = None,
    category: Category | None = None,
    source: str = "/bianzhi/quota",
) -> list[str]:
    """Expire every issued notice whose last day was before ``on`` (of one org and category, if
    given): release its unused places and emit ``QuotaUseNoticeExpired``. The numbers expired.

    Inside a handler the events go out with the handler's command (``ctx``); without one they are
    staged on ``uow`` as the service's own events.
    """
    expired: list[str] = []
    for notice_no in await uow.notices.lapsed(on, org_id=org_id, category=category):
        notice = await uow.notices.close(notice_no, model.NoticeStatus.EXPIRED)
        if notice is None:  # closed meanwhile by a concurrent transaction
            continue
        await uow.ledger.unreserve(notice.org_id, notice.category, notice.remaining)
        event = QuotaUseNoticeExpired(
            notice_no=notice.notice_no,
            org_id=notice.org_id,
            category=notice.category,
            valid_until=notice.valid_until,
            remaining=notice.remaining,
        )
        if ctx is not None:
            env = ctx.emit(event)
            cause = ctx.envelope
        else:
            env = event.envelope(source=source, actorid="system")
            uow.stage(env, event.TOPIC, env.subject)
            cause = env
        await _record_notice(uow, env, cause, notice, on, before_status="issued")
        expired.append(notice.notice_no)
    return expired


async def _record_notice(
    uow: QuotaUnitOfWork,
    event: Envelope,
    cause: Envelope,
    notice: model.Notice,
    effective: date,
    *,
    before_status: str | None,
    document: dict[str, str] | None = None,
) -> None:
    org = await uow.orgs.get(notice.org_id)
    est = await uow.ledger.establishment(notice.org_id, notice.category)
    await uow.ledger.record(
        event,
        cause,
        document=document,
        effective_date=effective,
        org_id=notice.org_id,
        division_code=org.division_code if org else None,
        category=notice.category,
        before=None if before_status is None else {"notice_status": before_status},
        after={
            "notice_no": notice.notice_no,
            "notice_remaining": notice.remaining if before_status is None else 0,
            "released": notice.remaining if before_status is not None else 0,
            "reserved": est.reserved,
            "occupied": est.occupied,
        },
    )


async def issue_notice(cmd: IssueQuotaUseNotice, uow: QuotaUnitOfWork, ctx: HandlerContext) -> None:
    org = await _holder(uow, ctx, cmd.org_id, cmd.category, "org")
    on = today()
    if cmd.valid_until < on:
        raise Rejection(
            ReasonCode.INVALID_MESSAGE,
            f"valid_until {cmd.valid_until} is already past / 有效期已过",
            {
                "errors": [
                    {
                        "field": "valid_until",
                        "error": f"must not be before {on.isoformat()}",
                        "type": "value_error",
                    }
                ]
            },
        )
    await expire_notices(uow, on, ctx, org_id=org.org_id, category=cmd.category)
    document = _document(cmd.document)
    if not await uow.notices.add(
        cmd.notice_no, org.org_id, cmd.category, cmd.count, cmd.valid_until, document
    ):
        existing = await uow.notices.get(cmd.notice_no)
        raise Rejection(
            ReasonCode.CONFLICT,
            f"notice number {cmd.notice_no} is already issued / 通知单编号已存在",
            {
                "notice_no": cmd.notice_no,
                "org_id": str(existing.org_id) if existing else None,
                "status": existing.status.value if existing else None,
            },
        )
    if not await uow.ledger.reserve(org.org_id, cmd.category, cmd.count):
        raise model.no_vacancy(await uow.ledger.establishment(org.org_id, cmd.category), cmd.count)
    event = ctx.emit(
        QuotaUseNoticeIssued(
            notice_no=cmd.notice_no,
            org_id=org.org_id,
            category=cmd.category,
            count=cmd.count,
            valid_until=cmd.valid_until,
            document=cmd.document,
        )
    )
    notice = model.Notice(
        cmd.notice_no,
        org.org_id,
        cmd.category,
        cmd.count,
        0,
        cmd.valid_until,
        model.NoticeStatus.ISSUED,
    )
    await _record_notice(
        uow, event, ctx.envelope, notice, cmd.document.date, before_status=None, document=document
    )


async def cancel_notice(
    cmd: CancelQuotaUseNotice, uow: QuotaUnitOfWork, ctx: HandlerContext
) -> None:
    on = today()
    found = await uow.notices.get(cmd.notice_no)
    if found is not None and cmd.org_id is not None and found.org_id != cmd.org_id:
        raise model.notice_invalid(cmd.notice_no, "issued to another org", org_id=str(cmd.org_id))
    if found is not None:
        await _load_in_region(uow, ctx, found.org_id)
    model.check_notice_open(found, cmd.notice_no, on)
    notice = await uow.notices.close(cmd.notice_no, model.NoticeStatus.CANCELLED)
    if notice is None:  # closed by a concurrent transaction since the read
        raise model.notice_invalid(cmd.notice_no, "already closed")
    await uow.ledger.unreserve(notice.org_id, notice.category, notice.remaining)
    event = ctx.emit(
        QuotaUseNoticeCancelled(
            notice_no=notice.notice_no,
            org_id=notice.org_id,
            category=notice.category,
            remaining=notice.remaining,
            reason=cmd.reason,
        )
    )
    await _record_notice(uow, event, ctx.envelope, notice, on, before_status="issued")


# --- slots (internal steps of the roster sagas) -------------------------------------------


async def _claim_request(
    uow: QuotaUnitOfWork,
    ctx: HandlerContext,
    request_id: UUID,
    person_id: UUID,
    org_id: UUID,
    *,
    ends_with: tuple[str, str] | None = None,
) -> None:
    """The first statement of a slot request: a request_id that already took effect under
    another message id is a conflict carrying the first outcome. ``ends_with``: the id and type
    of the event the request will end with, when known now (no ``request_done`` then)."""
    event_id, event_type = ends_with or (None, None)
    claimed = await uow.slots.claim_request(
        request_id,
        ctx.envelope.type,
        ctx.envelope.id,
        person_id,
        org_id,
        event_id=event_id,
        event_type=event_type,
    )
    if claimed is not None:
        # The claim read the org too: the handler's checks of it need no statement more.
        uow.orgs.seen_with(org_id, claimed)
        return
    first = await uow.slots.request(request_id)
    details: dict[str, Any] = {"request_id": str(request_id)}
    if first is not None:
        details |= {
            "first_command_id": first.command_id,
            "first_request_type": first.request_type,
            "person_id": first.person_id,
            "org_id": first.org_id,
            "event_id": first.event_id,
            "event_type": first.event_type,
            "outcome": "completed",
        }
    raise Rejection(
        ReasonCode.CONFLICT,
        f"slot request {request_id} was already carried out / 该占编请求已处理",
        details,
    )


async def _occupy(
    uow: QuotaUnitOfWork,
    *,
    request_id: UUID,
    person_id: UUID,
    org_id: UUID,
    category: Category,
    notice_no: str,
    leader_post: LeaderPost | None,
    unit_id: UUID | None,
    on: date,
) -> int:
    """Occupy one slot against a notice; the org's occupied count after."""
    if await uow.notices.use_one(notice_no, org_id, category, on) is None:
        # The conditional update found no place to give: say why.
        notice = model.check_notice_usable(
            await uow.notices.get(notice_no), notice_no, org_id, category, on
        )
        raise model.notice_exhausted(notice)
    if not await uow.slots.add(
        person_id, org_id, category, unit_id, leader_post, notice_no, request_id
    ):
        held = await uow.slots.held_by(person_id)
        raise Rejection(
            ReasonCode.ALREADY_ENROLLED,
            f"person {person_id} already holds a slot / 该人员已占编",
            {
                "person_id": str(person_id),
                "org_id": held.org_id if held else None,
                "category": held.category if held else None,
            },
        )
    occupied = await uow.ledger.occupy_reserved(org_id, category)
    if occupied is None:
        raise model.no_vacancy(await uow.ledger.establishment(org_id, category), 1)
    if leader_post is not None and not await uow.ledger.hold_leader_post(
        org_id, unit_id, leader_post
    ):
        posts = await uow.ledger.leader_posts(org_id, unit_id)
        raise model.leader_posts_exceeded(posts or model.LeaderPosts(), leader_post)
    return occupied


async def _vacate(
    uow: QuotaUnitOfWork, person_id: UUID, org_id: UUID, category: Category | None
) -> tuple[Any, int]:
    """Free the slot ``person_id`` holds in ``org_id``; the slot and the occupied count after."""
    slot = await uow.slots.remove(person_id, org_id)
    if slot is None or (category is not None and slot.category != category.value):
        held = slot or await uow.slots.held_by(person_id)
        raise Rejection(
            ReasonCode.NOT_ENROLLED,
            f"person {person_id} holds no {category.value if category else ''} slot of "
            f"{org_id} / 该人员未在本单位占编",
            {
                "person_id": str(person_id),
                "org_id": str(org_id),
                "held_org_id": held.org_id if held else None,
                "held_category": held.category if held else None,
            },
        )
    slot_category = Category(slot.category)
    occupied = await uow.ledger.vacate(org_id, slot_category)
    if slot.leader_post:
        await uow.ledger.free_leader_post(
            org_id, unit_of(slot.unit_id), LeaderPost(slot.leader_post)
        )
    return slot, occupied


async def _record_slot(
    uow: QuotaUnitOfWork,
    ctx: HandlerContext,
    event: Envelope,
    org: model.OrgRef,
    category: Category,
    on: date,
    after: dict[str, Any],
    unit_id: UUID | None = None,
) -> None:
    await uow.ledger.record(
        event,
        ctx.envelope,
        document=None,
        effective_date=on,
        org_id=org.org_id,
        unit_id=unit_id,
        division_code=org.division_code,
        category=category,
        after=after,
    )


async def prepare_occupations(
    uow: QuotaUnitOfWork, commands: Sequence[tuple[Envelope, OccupySlot]]
) -> None:
    """The four statements ``occupy_slot`` runs per command, for a run of OccupySlot commands
    of one fetch at once (``CommandRoute.prepare``): one claims every request, one takes the
    places of every notice, one records every slot, one turns reserved places into occupied
    ones for every org and category. What each would have given the handlers one after
    another in fetch order is kept for them; they then find it and do the rest command by
    command.

    A step that cannot serve all its commands is left to them: a request id or a person twice
    in the run, a request carried out before, a person holding a slot, a notice or an
    establishment without room for all of its commands (or a notice named with different orgs
    or categories). Their handlers run those statements themselves, and one of them is refused
    as it would be alone, which rolls the fetch back to be handled one by one."""
    on = today()
    requests = Counter(cmd.request_id for _, cmd in commands)
    people = Counter(cmd.person_id for _, cmd in commands)
    claims = [
        RequestClaim(
            cmd.request_id,
            env.type,
            env.id,
            cmd.person_id,
            cmd.org_id,
            event_id=new_id(),
            event_type=SlotOccupied.TYPE,
        )
        for env, cmd in commands
        if requests[cmd.request_id] == 1
    ]
    if claims:
        await uow.slots.claim_many(claims)
    by_notice: dict[str, list[OccupySlot]] = {}
    for _, cmd in commands:
        by_notice.setdefault(cmd.notice_no, []).append(cmd)
    taking = []
    for notice_no, cmds in by_notice.items():
        named = {(cmd.org_id, cmd.category) for cmd in cmds}
        if len(named) == 1:
            ((org_id, category),) = named
            taking.append((notice_no, org_id, category, len(cmds)))
    await uow.notices.use_many(taking, on)
    new = [
        NewSlot(
            cmd.person_id,
            cmd.org_id,
            cmd.category,
            cmd.unit_id,
            cmd.leader_post,
            cmd.notice_no,
            cmd.request_id,
        )
        for _, cmd in commands
        if people[cmd.person_id] == 1
    ]
    if new:
        await uow.slots.add_many(new)
    held = Counter((cmd.org_id, cmd.category) for _, cmd in commands)
    await uow.ledger.occupy_many([(org_id, category, k) for (org_id, category), k in held.items()])


async def occupy_slot(cmd: OccupySlot, uow: QuotaUnitOfWork, ctx: HandlerContext) -> None:
    # The request is claimed with the id of the event it ends with: a rejection rolls both
    # back, so the claim needs no second statement to mark it done. A claim made by
    # ``prepare_occupations`` chose that id already.
    event_id = uow.slots.prepared_event(cmd.request_id) or new_id()
    await _claim_request(
        uow,
        ctx,
        cmd.request_id,
        cmd.person_id,
        cmd.org_id,
        ends_with=(event_id, SlotOccupied.TYPE),
    )
    org = await _holder(uow, ctx, cmd.org_id, cmd.category, "org")
    on = today()
    occupied = await _occupy(
        uow,
        request_id=cmd.request_id,
        person_id=cmd.person_id,
        org_id=org.org_id,
        category=cmd.category,
        notice_no=cmd.notice_no,
        leader_post=cmd.leader_post,
        unit_id=cmd.unit_id,
        on=on,
    )
    event = ctx.emit(
        SlotOccupied(
            request_id=cmd.request_id,
            person_id=cmd.person_id,
            org_id=org.org_id,
            category=cmd.category,
            notice_no=cmd.notice_no,
            leader_post=cmd.leader_post,
            unit_id=cmd.unit_id,
            occupied=occupied,
        ),
        id=event_id,
    )
    after = {"occupied": occupied, "notice_no": cmd.notice_no, "person_id": str(cmd.person_id)}
    if cmd.leader_post:
        after["leader_post"] = cmd.leader_post.value
    await _record_slot(uow, ctx, event, org, cmd.category, on, after, cmd.unit_id)


async def _cancel_if_pending(
    uow: QuotaUnitOfWork, ctx: HandlerContext, request_id: UUID, person_id: UUID, org_id: UUID
) -> bool:
    """Cancel the slot request ``request_id`` if it has not taken effect: claiming its id here,
    in this transaction, makes it a conflict should it arrive later. ``False`` when it had
    already been carried out or cancelled."""
    if (
        await uow.slots.claim_request(
            request_id, f"cancelled by {ctx.envelope.type}", ctx.envelope.id, person_id, org_id
        )
        is None
    ):
        return False
    log.info("slot request cancelled before it took effect", request=str(request_id))
    return True


async def _compensation_needed(uow: QuotaUnitOfWork, ctx: HandlerContext, cmd: ReleaseSlot) -> bool:
    """For a saga's compensation: whether the occupy request it undoes holds a slot now (one
    that has not taken effect is cancelled instead)."""
    assert cmd.occupy_request_id is not None
    if await _cancel_if_pending(uow, ctx, cmd.occupy_request_id, cmd.person_id, cmd.org_id):
        return False
    held = await uow.slots.held_by(cmd.person_id)
    return held is not None and held.request_id == str(cmd.occupy_request_id)


async def release_slot(cmd: ReleaseSlot, uow: QuotaUnitOfWork, ctx: HandlerContext) -> None:
    await _claim_request(uow, ctx, cmd.request_id, cmd.person_id, cmd.org_id)
    org = await _load_in_region(uow, ctx, cmd.org_id)
    if cmd.occupy_request_id is not None and not await _compensation_needed(uow, ctx, cmd):
        return  # nothing to undo: completed with no event
    returned_to: str | None = None
    if cmd.occupy_request_id is None:
        slot, occupied = await _vacate(uow, cmd.person_id, org.org_id, cmd.category)
    else:
        # Undoing an occupation: the place goes back to its notice while the notice is open.
        slot = await uow.slots.remove(cmd.person_id, org.org_id, cmd.occupy_request_id)
        assert slot is not None  # _compensation_needed saw it in this transaction
        category = Category(slot.category)
        if await uow.notices.give_back(slot.notice_no) is not None:
            await uow.ledger.reserve_again(org.org_id, category)
            returned_to = slot.notice_no
        else:
            await uow.ledger.vacate(org.org_id, category)
        if slot.leader_post:
            await uow.ledger.free_leader_post(
                org.org_id, unit_of(slot.unit_id), LeaderPost(slot.leader_post)
            )
        occupied = (await uow.ledger.establishment(org.org_id, category)).occupied
    leader_post = LeaderPost(slot.leader_post) if slot.leader_post else None
    event = ctx.emit(
        SlotReleased(
            request_id=cmd.request_id,
            person_id=cmd.person_id,
            org_id=org.org_id,
            category=cmd.category,
            leader_post=leader_post,
            unit_id=unit_of(slot.unit_id),
            occupied=occupied,
            returned_to_notice=returned_to,
        )
    )
    await uow.slots.request_done(cmd.request_id, event)
    after: dict[str, Any] = {"occupied": occupied, "person_id": str(cmd.person_id)}
    if leader_post:
        after["leader_post"] = leader_post.value
    if returned_to:
        after["returned_to_notice"] = returned_to
    await _record_slot(uow, ctx, event, org, cmd.category, today(), after, unit_of(slot.unit_id))


async def move_slot(cmd: MoveSlot, uow: QuotaUnitOfWork, ctx: HandlerContext) -> None:
    await _claim_request(uow, ctx, cmd.request_id, cmd.person_id, cmd.to_org_id)
    source = await _load_in_region(uow, ctx, cmd.from_org_id, role="source org")
    target = await _holder(uow, ctx, cmd.to_org_id, cmd.category, "target org")
    on = today()
    slot, from_occupied = await _vacate(uow, cmd.person_id, source.org_id, None)
    occupied = await _occupy(
        uow,
        request_id=cmd.request_id,
        person_id=cmd.person_id,
        org_id=target.org_id,
        category=cmd.category,
        notice_no=cmd.notice_no,
        leader_post=cmd.leader_post,
        unit_id=cmd.unit_id,
        on=on,
    )
    from_category = Category(slot.category)
    event = ctx.emit(
        SlotMoved(
            request_id=cmd.request_id,
            person_id=cmd.person_id,
            from_org_id=source.org_id,
            to_org_id=target.org_id,
            from_category=from_category,
            category=cmd.category,
            notice_no=cmd.notice_no,
            leader_post=cmd.leader_post,
            unit_id=cmd.unit_id,
        )
    )
    await uow.slots.request_done(cmd.request_id, event)
    person = str(cmd.person_id)
    await _record_slot(
        uow,
        ctx,
        event,
        source,
        from_category,
        on,
        {"occupied": from_occupied, "person_id": person, "moved_to": str(target.org_id)},
        unit_of(slot.unit_id),
    )
    after: dict[str, Any] = {"occupied": occupied, "notice_no": cmd.notice_no, "person_id": person}
    if cmd.leader_post:
        after["leader_post"] = cmd.leader_post.value
    await _record_slot(uow, ctx, event, target, cmd.category, on, after, cmd.unit_id)


async def cancel_slot_request(
    cmd: CancelSlotRequest, uow: QuotaUnitOfWork, ctx: HandlerContext
) -> None:
    """Cancel a slot request that has not taken effect (it never will); refuse with the
    outcome when it has."""
    org = await _load_in_region(uow, ctx, cmd.org_id)
    if await _cancel_if_pending(uow, ctx, cmd.cancels_request_id, cmd.person_id, org.org_id):
        return
    first = await uow.slots.request(cmd.cancels_request_id)
    assert first is not None
    if first.request_type.startswith("cancelled"):
        return  # cancelled before: the same answer
    raise Rejection(
        ReasonCode.CONFLICT,
        f"slot request {cmd.cancels_request_id} already took effect / 该占编请求已办结",
        {
            "outcome": "completed",
            "request_id": str(cmd.cancels_request_id),
            "request_type": first.request_type,
            "event_id": first.event_id,
            "event_type": first.event_type,
        },
    )


# The routing table: command type → handler and the least role that may issue it.
# Quota, limits, leader posts and notices are approvals (WIRE-CONTRACT §2): an approver at least.
COMMANDS: list[CommandRoute] = [
    CommandRoute(SetRegionLimit, set_region_limit, Role.APPROVER),
    CommandRoute(ApproveQuota, approve_quota, Role.APPROVER),
    CommandRoute(TransferQuota, transfer_quota, Role.APPROVER),
    CommandRoute(SetLeaderPosts, set_leader_posts, Role.APPROVER),
    CommandRoute(IssueQuotaUseNotice, issue_notice, Role.APPROVER),
    CommandRoute(CancelQuotaUseNotice, cancel_notice, Role.APPROVER),
    # Internal steps of the roster sagas, sent with the original actor (a clerk enrols people).
    CommandRoute(OccupySlot, occupy_slot, Role.CLERK, prepare=prepare_occupations),
    CommandRoute(ReleaseSlot, release_slot, Role.CLERK),
    CommandRoute(MoveSlot, move_slot, Role.CLERK),
    CommandRoute(CancelSlotRequest, cancel_slot_request, Role.CLERK),
]
