"""Quota-use notices (用编通知单) in the quota service, without Kafka (SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any

import pytest
from sqlalchemy import select

from contracts.codes import Category, OrgKind
from contracts.quota import CancelQuotaUseNotice, IssueQuotaUseNotice
from services.quota.adapters.orm import establishment, notices, quota_ledger
from services.quota.service_layer import handlers
from services.runtime.app import ServiceRuntime
from tests.component import test_quota_handlers
from tests.component.test_orgs_handlers import count
from tests.component.test_quota_handlers import (
    DOC,
    approve,
    completed,
    events,
    get,
    limit,
    org,
    posts,
    rejected,
    transfer,
)
from tests.support.sql import commits, recorded, uncached

FAR = date(2099, 12, 31)

# The service and its org projection, as the handler tests build them.
quota = test_quota_handlers.quota
projection = test_quota_handlers.projection


def issue(
    org_id: uuid.UUID,
    count_: int,
    notice_no: str | None = None,
    category: str = "admin",
    valid_until: date = FAR,
) -> IssueQuotaUseNotice:
    return IssueQuotaUseNotice(
        notice_no=notice_no or f"冀编用〔2026〕{uuid.uuid4().hex[:8]}",
        org_id=org_id,
        category=Category(category),
        count=count_,
        valid_until=valid_until,
        document=DOC,
    )


async def counts(rt: ServiceRuntime, org_id: uuid.UUID, category: str = "admin") -> Any:
    async with rt.sessions() as session:
        return (
            await session.execute(
                select(
                    establishment.c.approved, establishment.c.occupied, establishment.c.reserved
                ).where(establishment.c.org_id == str(org_id), establishment.c.category == category)
            )
        ).one()


async def test_issue_reserves_places_and_the_notice_can_be_read(quota, projection) -> None:
    org_id = await org(projection)
    await completed(quota, approve(org_id, 10))
    cmd = issue(org_id, 4, "冀编用〔2026〕1号")
    await completed(quota, cmd)
    assert tuple(await counts(quota, org_id)) == (10, 0, 4)
    (event,) = await events(quota, "QuotaUseNoticeIssued")
    assert event.data["count"] == 4 and event.subject == str(org_id)
    body = await get(quota, f"/notices/{cmd.notice_no}")
    assert (body["status"], body["count"], body["used"], body["remaining"]) == ("issued", 4, 0, 4)
    assert body["document"]["number"] == DOC.number
    est = await get(quota, f"/orgs/{org_id}/establishment")
    (admin,) = est["categories"]
    assert (admin["reserved"], admin["vacant"]) == (4, 6)
    await get(quota, "/notices/nope", 404)
    rows = await count(quota, quota_ledger, quota_ledger.c.event_type == event.type)
    assert rows == 1


async def test_issue_needs_vacancy_an_unused_number_and_an_approver(quota, projection) -> None:
    org_id = await org(projection)
    await completed(quota, approve(org_id, 5))
    await completed(quota, issue(org_id, 3, "N-1"))
    details = await rejected(quota, issue(org_id, 3), "no_vacancy")
    assert (details["approved"], details["reserved"], details["vacant"], details["asked"]) == (
        5,
        3,
        2,
        3,
    )
    await rejected(quota, issue(org_id, 1, "N-1"), "conflict")
    await rejected(quota, issue(org_id, 1), "forbidden", actorroles="clerk")
    await rejected(quota, issue(org_id, 1), "forbidden", actorregion="130200")
    institution = await org(projection, kind=OrgKind.PUBLIC_INSTITUTION)
    await rejected(quota, issue(institution, 1), "category_not_allowed")
    await rejected(quota, issue(uuid.uuid4(), 1), "not_found")
    await rejected(quota, issue(org_id, 1, valid_until=date(2020, 1, 1)), "invalid_message")
    assert tuple(await counts(quota, org_id)) == (5, 0, 3)
    assert await count(quota, notices) == 1


async def test_reserved_places_cannot_be_approved_away(quota, projection) -> None:
    org_id = await org(projection)
    await completed(quota, approve(org_id, 5))
    await completed(quota, issue(org_id, 4))
    details = await rejected(quota, approve(org_id, 3), "below_occupied")
    assert details["reserved"] == 4


async def test_cancel_releases_the_unused_places_once(quota, projection) -> None:
    org_id = await org(projection)
    await completed(quota, approve(org_id, 5))
    cmd = issue(org_id, 4)
    await completed(quota, cmd)
    await rejected(
        quota, CancelQuotaUseNotice(notice_no=cmd.notice_no), "forbidden", actorregion="130200"
    )
    await rejected(
        quota,
        CancelQuotaUseNotice(notice_no=cmd.notice_no, org_id=uuid.uuid4()),
        "notice_invalid",
    )
    await completed(quota, CancelQuotaUseNotice(notice_no=cmd.notice_no, reason="不再招录"))
    assert tuple(await counts(quota, org_id)) == (5, 0, 0)
    (event,) = await events(quota, "QuotaUseNoticeCancelled")
    assert (event.data["remaining"], event.data["reason"]) == (4, "不再招录")
    details = await rejected(quota, CancelQuotaUseNotice(notice_no=cmd.notice_no), "notice_invalid")
    assert details["status"] == "cancelled"
    await rejected(quota, CancelQuotaUseNotice(notice_no="unknown-1"), "notice_invalid")
    body = await get(quota, f"/notices/{cmd.notice_no}")
    assert (body["status"], body["remaining"]) == ("cancelled", 0)


async def test_expiry_releases_unused_places_and_emits_expired(
    quota, projection, monkeypatch: pytest.MonkeyPatch
) -> None:
    org_id = await org(projection)
    await completed(quota, approve(org_id, 6))
    lapsing = issue(org_id, 4, valid_until=date(2030, 6, 30))
    await completed(quota, lapsing)
    await completed(quota, issue(org_id, 1, valid_until=date(2030, 7, 31)))
    async with quota.uow() as uow:
        assert await handlers.expire_notices(uow, date(2030, 6, 30)) == []
        assert await handlers.expire_notices(uow, date(2030, 7, 1)) == [lapsing.notice_no]
        await uow.commit()
    assert tuple(await counts(quota, org_id)) == (6, 0, 1)
    (event,) = await events(quota, "QuotaUseNoticeExpired")
    assert (event.data["remaining"], event.data["valid_until"]) == (4, "2030-06-30")
    details = await rejected(
        quota, CancelQuotaUseNotice(notice_no=lapsing.notice_no), "notice_invalid"
    )
    assert details["status"] == "expired"
    # Lazily: a lapsed notice the sweep has not reached yet is expired by the next change of
    # that org's establishment, and its places are free again.
    monkeypatch.setattr(handlers, "today", lambda: date(2030, 8, 1))
    await completed(quota, issue(org_id, 6, valid_until=date(2030, 8, 31)))
    assert tuple(await counts(quota, org_id)) == (6, 0, 6)
    assert len(await events(quota, "QuotaUseNoticeExpired")) == 2


async def test_the_periodic_sweep_expires_lapsed_notices(
    quota, projection, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.quota.service_layer import expiry

    org_id = await org(projection)
    await completed(quota, approve(org_id, 3))
    lapsing = issue(org_id, 2, valid_until=date(2030, 6, 30))
    await completed(quota, lapsing)
    monkeypatch.setattr(handlers, "today", lambda: date(2030, 6, 30))
    with commits(quota.engine) as committed:
        assert await expiry.sweep_once(quota) == []
    assert committed == []  # a sweep that finds nothing writes nothing
    monkeypatch.setattr(handlers, "today", lambda: date(2030, 7, 1))
    with commits(quota.engine) as committed:
        assert await expiry.sweep_once(quota) == [lapsing.notice_no]
        assert await expiry.sweep_once(quota) == []
    assert len(committed) == 1
    assert tuple(await counts(quota, org_id)) == (3, 0, 0)
    (event,) = await events(quota, "QuotaUseNoticeExpired")
    assert event.source.endswith("/quota")
    assert event.data["remaining"] == 2
    assert expiry.sweep_expired_notices in quota.definition.background


async def test_every_statement_of_quotas_commands_is_compiled_once(quota, projection) -> None:
    # A statement SQLAlchemy can make no cache key for (one with a multi-row VALUES, say) is
    # compiled again at every execution, which costs more than running it.
    a = await org(projection)
    b = await org(projection, division_code="130104", name="桥西区财政局")
    with recorded(quota.engine) as seen:
        await completed(quota, limit("130100", 50))
        await completed(quota, approve(a, 10))
        await completed(quota, approve(a, 12))
        await completed(quota, transfer(a, b, 2))
        await completed(quota, posts(a, 1, 2))
        first = issue(a, 3)
        await completed(quota, first)
        await completed(quota, CancelQuotaUseNotice(notice_no=first.notice_no))
        await rejected(quota, approve(b, 60), "region_limit_exceeded")
    assert len(seen) > 30
    assert uncached(seen) == []
