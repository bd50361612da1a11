"""Merging and closing orgs' establishments: internal steps of the orgs sagas (机构合并 / 撤销).

``MergeEstablishments`` moves, in one transaction, every source org's approved, occupied and
reserved places per category, the slots its people hold, its open quota-use notices and the
leader posts held to the target, and closes the sources. The merged org may then hold more
leader posts than approved, which is reported by ``OverQuotaDetected``. ``CloseEstablishment``
closes an empty org and refuses (``org_not_empty``) while anything remains.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any
from uuid import UUID

from contracts.codes import Category, LeaderPost, OrgStatus, ReasonCode, Role
from contracts.common import effective_date
from contracts.quota import (
    CloseEstablishment,
    EstablishmentClosed,
    EstablishmentsMerged,
    MergedCategory,
    MergeEstablishments,
    OverQuotaDetected,
)
from services.quota.adapters.merging import Merging
from services.quota.domain import model
from services.quota.service_layer.handlers import (
    _chain,
    _document,
    _emit_thresholds,
    _load_in_region,
    _regions,
    expire_notices,
    today,
)
from services.quota.service_layer.unit_of_work import QuotaUnitOfWork
from services.runtime.messaging import CommandRoute, HandlerContext
from services.runtime.rules import Rejection


async def merge_establishments(
    cmd: MergeEstablishments, uow: QuotaUnitOfWork, ctx: HandlerContext
) -> None:
    target = await _load_in_region(uow, ctx, cmd.target_org_id, role="target org")
    model.require_active(target, role="target org")
    sources = []
    for org_id in cmd.source_org_ids:
        source = await _load_in_region(uow, ctx, org_id, role="source org")
        model.require_active(source, role="source org")
        sources.append(source)
    assert target.division_code is not None
    merging = Merging(uow.session)
    held = await merging.held(cmd.source_org_ids)
    by_category: dict[Category, list[Any]] = defaultdict(list)
    for row in held:
        by_category[Category(row.category)].append(row)
    for category in sorted(by_category):
        model.require_category(target, category)
    on = effective_date(cmd.effective_date, cmd.document)
    divisions = {s.org_id: s.division_code for s in sources}
    target_chain = _chain(target.division_code)
    merged: list[MergedCategory] = []
    thresholds = []
    for category in sorted(by_category):
        rows = by_category[category]
        provinces = {model.province_of(target.division_code)} | {
            model.province_of(d) for d in divisions.values() if d
        }
        await uow.ledger.lock(provinces, category)
        await expire_notices(uow, today(), ctx, org_id=target.org_id, category=category)
        # Regions around the target that do not already hold a source gain its approved places.
        asked: dict[str, int] = defaultdict(int)
        for row in rows:
            source_chain = _chain(divisions[UUID(row.org_id)] or target.division_code)
            for code in target_chain:
                if code not in source_chain:
                    asked[code] += row.approved
        regions = await _regions(uow, asked, category)
        model.check_within_limits(regions, dict(asked), category)
        approved = sum(r.approved for r in rows)
        occupied = sum(r.occupied for r in rows)
        reserved = sum(r.reserved for r in rows)
        after = await merging.add_to(target.org_id, category, approved, occupied, reserved)
        merged.append(
            MergedCategory(
                category=category,
                approved=approved,
                occupied=occupied,
                reserved=reserved,
                target_approved=after.approved,
                target_occupied=after.occupied,
                target_reserved=after.reserved,
            )
        )
        thresholds.extend(
            (category, region, region.used + asked[region.code]) for region in regions
        )
    await merging.empty_sources(cmd.source_org_ids)
    slots_moved = await merging.move_slots(cmd.source_org_ids, target.org_id)
    notices_moved = await merging.move_open_notices(cmd.source_org_ids, target.org_id)
    posts = await merging.move_leader_posts(cmd.source_org_ids, target.org_id)
    await uow.orgs.set_status(cmd.source_org_ids, OrgStatus.MERGED)
    event = ctx.emit(
        EstablishmentsMerged(
            request_id=cmd.request_id,
            source_org_ids=cmd.source_org_ids,
            target_org_id=target.org_id,
            categories=merged,
            slots_moved=slots_moved,
            notices_moved=notices_moved,
            document=cmd.document,
            effective_date=on,
        )
    )
    doc = _document(cmd.document)
    for row in held:
        source_division = divisions[UUID(row.org_id)]
        await uow.ledger.record(
            event,
            ctx.envelope,
            document=doc,
            effective_date=on,
            org_id=UUID(row.org_id),
            division_code=source_division,
            category=Category(row.category),
            before={"approved": row.approved, "occupied": row.occupied, "reserved": row.reserved},
            after={"approved": 0, "occupied": 0, "reserved": 0, "merged_into": str(target.org_id)},
        )
    for item in merged:
        await uow.ledger.record(
            event,
            ctx.envelope,
            document=doc,
            effective_date=on,
            org_id=target.org_id,
            division_code=target.division_code,
            category=item.category,
            before={
                "approved": item.target_approved - item.approved,
                "occupied": item.target_occupied - item.occupied,
                "reserved": item.target_reserved - item.reserved,
            },
            after={
                "approved": item.target_approved,
                "occupied": item.target_occupied,
                "reserved": item.target_reserved,
            },
        )
        if item.target_occupied > item.target_approved:
            ctx.emit(
                OverQuotaDetected(
                    org_id=target.org_id,
                    category=item.category,
                    approved=item.target_approved,
                    occupied=item.target_occupied,
                )
            )
    if posts is not None:
        for post, approved, holding in (
            (LeaderPost.PRINCIPAL, posts.principal, posts.principal_held),
            (LeaderPost.DEPUTY, posts.deputy, posts.deputy_held),
        ):
            if holding > approved:
                ctx.emit(
                    OverQuotaDetected(
                        org_id=target.org_id,
                        leader_post=post,
                        approved=approved,
                        occupied=holding,
                    )
                )
    for category, region, used_after in thresholds:
        _emit_thresholds(ctx, category, region, used_after=used_after)


async def close_establishment(
    cmd: CloseEstablishment, uow: QuotaUnitOfWork, ctx: HandlerContext
) -> None:
    org = await _load_in_region(uow, ctx, cmd.org_id)
    model.require_active(org)
    await expire_notices(uow, today(), ctx, org_id=org.org_id)
    remains = await Merging(uow.session).what_remains(org.org_id)
    if remains:
        raise Rejection(
            ReasonCode.ORG_NOT_EMPTY,
            f"org {org.org_id} still holds establishment, people or notices / "
            "机构仍有编制、人员或用编通知单，不能撤销",
            {"org_id": str(org.org_id), **remains},
        )
    await uow.orgs.set_status([org.org_id], OrgStatus.ABOLISHED)
    on = effective_date(cmd.effective_date, cmd.document)
    event = ctx.emit(
        EstablishmentClosed(
            request_id=cmd.request_id, org_id=org.org_id, document=cmd.document, effective_date=on
        )
    )
    await uow.ledger.record(
        event,
        ctx.envelope,
        document=_document(cmd.document),
        effective_date=on,
        org_id=org.org_id,
        division_code=org.division_code,
        category=None,
        before=None,
        after={"closed": True},
    )


# Internal steps of the orgs sagas, sent with the approver who merged or abolished.
MERGE_COMMANDS: list[CommandRoute] = [
    CommandRoute(MergeEstablishments, merge_establishments, Role.APPROVER),
    CommandRoute(CloseEstablishment, close_establishment, Role.APPROVER),
]
