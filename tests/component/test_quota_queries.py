"""Quota queries answered from the ledger history (``as_of``) and notice numbers with ``/``,
without Kafka, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any
from urllib.parse import quote

import pytest

from contracts.codes import Category, LeaderPost
from contracts.common import Document
from contracts.quota import (
    ApproveQuota,
    CancelQuotaUseNotice,
    IssueQuotaUseNotice,
    MoveSlot,
    OccupySlot,
    ReleaseSlot,
    SetLeaderPosts,
    SetRegionLimit,
    TransferQuota,
)
from services.quota.service_layer import handlers
from services.runtime.app import ServiceRuntime
from tests.component import test_quota_handlers
from tests.component.test_quota_handlers import completed, get, org

quota = test_quota_handlers.quota
projection = test_quota_handlers.projection

CLERK = {"actorroles": "clerk"}
FAR = date(2099, 12, 31)


def doc(day: date, number: str = "冀编〔2026〕9号") -> Document:
    return Document(title="关于核定编制的批复", number=number, date=day)


def approve(org_id: uuid.UUID, total: int, effective: date) -> ApproveQuota:
    return ApproveQuota(
        org_id=org_id,
        category=Category.ADMIN,
        approved=total,
        document=doc(effective),
        effective_date=effective,
    )


def notice(org_id: uuid.UUID, number: str, count: int, issued: date) -> IssueQuotaUseNotice:
    return IssueQuotaUseNotice(
        notice_no=number,
        org_id=org_id,
        category=Category.ADMIN,
        count=count,
        valid_until=FAR,
        document=doc(issued, number),
    )


def admin(body: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """(approved, occupied, reserved, vacant) of the admin category, or None if absent."""
    for row in body["categories"]:
        if row["category"] == "admin":
            return row["approved"], row["occupied"], row["reserved"], row["vacant"]
    return None


def on(monkeypatch: pytest.MonkeyPatch, day: date) -> None:
    """Move the service's calendar to ``day`` (slots and cancellations take effect that day)."""
    monkeypatch.setattr(handlers, "today", lambda: day)


async def history(quota: ServiceRuntime, projection: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Two orgs in Shijiazhuang (130102), one in Tangshan (130203), and a year of changes."""
    a = await org(projection, name="长安区财政局")
    b = await org(projection, name="长安区发改局")
    c = await org(projection, division_code="130203", name="路北区财政局")
    on(monkeypatch, date(2026, 1, 1))
    await completed(
        quota,
        SetRegionLimit(
            division_code="130100",
            category=Category.ADMIN,
            limit=100,
            document=doc(date(2026, 1, 10)),
        ),
    )
    await completed(quota, approve(a, 10, date(2026, 2, 1)))
    await completed(
        quota,
        SetLeaderPosts(
            org_id=a, principal=1, deputy=2, document=doc(date(2026, 2, 1)), effective_date=None
        ),
    )
    await completed(quota, approve(b, 8, date(2026, 2, 15)))
    await completed(quota, approve(a, 15, date(2026, 3, 1)))
    await completed(quota, approve(c, 5, date(2026, 3, 10)))
    await completed(
        quota,
        TransferQuota(
            from_org_id=a,
            to_org_id=b,
            category=Category.ADMIN,
            amount=3,
            document=doc(date(2026, 4, 1)),
        ),
    )
    # Entered after the transfer, effective before it: B's total 11 → 20 counts from 20 February.
    await completed(quota, approve(b, 20, date(2026, 2, 20)))
    await completed(quota, notice(a, "冀编用〔2026〕A/1号", 4, date(2026, 5, 1)))
    person = uuid.uuid4()
    on(monkeypatch, date(2026, 6, 1))
    await completed(
        quota,
        OccupySlot(
            request_id=uuid.uuid4(),
            person_id=person,
            org_id=a,
            category=Category.ADMIN,
            notice_no="冀编用〔2026〕A/1号",
            leader_post=LeaderPost.DEPUTY,
        ),
        **CLERK,
    )
    await completed(quota, notice(c, "冀编用〔2026〕C/1号", 2, date(2026, 6, 15)))
    # A saga takes a place of C's notice and gives it back the same day (its compensation).
    on(monkeypatch, date(2026, 6, 20))
    undone = OccupySlot(
        request_id=uuid.uuid4(),
        person_id=uuid.uuid4(),
        org_id=c,
        category=Category.ADMIN,
        notice_no="冀编用〔2026〕C/1号",
    )
    await completed(quota, undone, **CLERK)
    await completed(
        quota,
        ReleaseSlot(
            request_id=uuid.uuid4(),
            person_id=undone.person_id,
            org_id=c,
            category=Category.ADMIN,
            occupy_request_id=undone.request_id,
        ),
        **CLERK,
    )
    on(monkeypatch, date(2026, 7, 1))
    await completed(
        quota,
        MoveSlot(
            request_id=uuid.uuid4(),
            person_id=person,
            from_org_id=a,
            to_org_id=c,
            category=Category.ADMIN,
            notice_no="冀编用〔2026〕C/1号",
        ),
        **CLERK,
    )
    on(monkeypatch, date(2026, 8, 1))
    await completed(quota, CancelQuotaUseNotice(notice_no="冀编用〔2026〕A/1号"))
    return a, b, c


async def org_as_of(quota: ServiceRuntime, org_id: uuid.UUID, day: date) -> dict[str, Any]:
    return await get(quota, f"/orgs/{org_id}/establishment", as_of=day.isoformat())


async def test_org_establishment_as_of_any_past_date(quota, projection, monkeypatch) -> None:
    a, b, c = await history(quota, projection, monkeypatch)
    expected_a = {
        date(2026, 1, 31): None,
        date(2026, 2, 1): (10, 0, 0, 10),
        date(2026, 2, 28): (10, 0, 0, 10),
        date(2026, 3, 1): (15, 0, 0, 15),
        date(2026, 4, 1): (12, 0, 0, 12),
        date(2026, 5, 1): (12, 0, 4, 8),
        date(2026, 6, 1): (12, 1, 3, 8),
        date(2026, 7, 1): (12, 0, 3, 9),
        date(2026, 8, 1): (12, 0, 0, 12),
    }
    for day, counts in expected_a.items():
        body = await org_as_of(quota, a, day)
        assert body["as_of"] == day.isoformat()
        assert admin(body) == counts, day
    expected_b = {
        date(2026, 2, 14): None,
        date(2026, 2, 15): (8, 0, 0, 8),
        date(2026, 2, 20): (17, 0, 0, 17),
        date(2026, 3, 31): (17, 0, 0, 17),
        date(2026, 4, 1): (20, 0, 0, 20),
    }
    for day, counts in expected_b.items():
        assert admin(await org_as_of(quota, b, day)) == counts, day
    expected_c = {
        date(2026, 3, 10): (5, 0, 0, 5),
        date(2026, 6, 15): (5, 0, 2, 3),
        date(2026, 6, 20): (5, 0, 2, 3),
        date(2026, 7, 1): (5, 1, 1, 3),
    }
    for day, counts in expected_c.items():
        assert admin(await org_as_of(quota, c, day)) == counts, day

    posts = {d: (await org_as_of(quota, a, d))["leader_posts"] for d in expected_a}
    assert posts[date(2026, 1, 31)] == []
    assert [(p["principal"], p["deputy"], p["deputy_held"]) for p in posts[date(2026, 2, 1)]] == [
        (1, 2, 0)
    ]
    assert [p["deputy_held"] for p in posts[date(2026, 6, 1)]] == [1]
    assert [p["deputy_held"] for p in posts[date(2026, 7, 1)]] == [0]

    # Once every change is in effect, history and the live counts agree.
    for org_id in (a, b, c):
        live = await get(quota, f"/orgs/{org_id}/establishment")
        then = await org_as_of(quota, org_id, FAR)
        assert then["categories"] == live["categories"]
        assert then["leader_posts"] == live["leader_posts"]


async def test_division_establishment_as_of_rolls_up_history(
    quota, projection, monkeypatch
) -> None:
    await history(quota, projection, monkeypatch)

    async def division(code: str, day: date) -> dict[str, Any]:
        return await get(quota, f"/divisions/{code}/establishment", as_of=day.isoformat())

    before_any = await division("130100", date(2026, 1, 9))
    assert before_any["categories"] == []
    (limit_only,) = (await division("130100", date(2026, 1, 10)))["categories"]
    assert (limit_only["limit"], limit_only["approved"], limit_only["orgs"]) == (100, 0, 0)
    (row,) = (await division("130100", date(2026, 2, 20)))["categories"]
    assert (row["approved"], row["orgs"], row["limit"], row["headroom"]) == (27, 2, 100, 73)
    (row,) = (await division("130100", date(2026, 4, 1)))["categories"]
    assert (row["approved"], row["headroom"]) == (32, 68)
    province = await division("130000", date(2026, 6, 1))
    assert admin(province) == (37, 1, 3, 33)
    assert province["limits_inside"] == [
        {"division_code": "130100", "category": "admin", "limit": 100}
    ]
    province = await division("130000", date(2026, 7, 1))
    assert admin(province) == (37, 1, 4, 32)
    tangshan = await division("130200", date(2026, 7, 1))
    assert admin(tangshan) == (5, 1, 1, 3)
    for code in ("130000", "130100", "130200"):
        live = await get(quota, f"/divisions/{code}/establishment")
        assert (await division(code, FAR))["categories"] == live["categories"]
        assert "as_of" not in live


async def test_as_of_must_be_a_date(quota, projection) -> None:
    org_id = await org(projection)
    body = await get(quota, f"/orgs/{org_id}/establishment", 400, as_of="2026-13-01")
    assert body["error"] == "invalid_query"
    body = await get(quota, "/divisions/130000/establishment", 400, as_of="yesterday")
    assert body["error"] == "invalid_query"
    await get(quota, f"/orgs/{uuid.uuid4()}/establishment", 404, as_of="2026-01-01")


async def test_a_notice_number_with_a_slash_is_found_by_query(
    quota, projection, monkeypatch
) -> None:
    org_id = await org(projection)
    on(monkeypatch, date(2026, 1, 1))
    await completed(quota, approve(org_id, 10, date(2026, 1, 1)))
    await completed(quota, notice(org_id, "冀编用〔2026〕12/3号", 3, date(2026, 1, 2)))
    await completed(quota, notice(org_id, "冀编用〔2026〕13号", 1, date(2026, 1, 2)))
    body = await get(quota, "/notices", notice_no="冀编用〔2026〕12/3号")
    assert (body["notice_no"], body["count"], body["remaining"]) == ("冀编用〔2026〕12/3号", 3, 3)
    plain = await get(quota, f"/notices/{quote('冀编用〔2026〕13号')}")
    assert plain["count"] == 1
    assert (await get(quota, "/notices", notice_no="冀编用〔2026〕13号")) == plain
    missing = await get(quota, "/notices", 404, notice_no="冀编用〔2026〕12/4号")
    assert missing["error"] == "not_found"
    assert (await get(quota, "/notices", 400))["error"] == "invalid_query"
    # The path form works too when the "/" is sent encoded (%2F), as clients send it.
    by_path = await get(quota, f"/notices/{quote('冀编用〔2026〕12/3号', safe='')}")
    assert by_path == body


async def test_an_orgs_notices_are_listed_soonest_to_lapse_first(
    quota, projection, monkeypatch
) -> None:
    org_id = await org(projection, name="长安区财政局")
    other = await org(projection, name="长安区发改局")
    on(monkeypatch, date(2026, 1, 1))
    await completed(quota, approve(org_id, 20, date(2026, 1, 1)))
    await completed(quota, approve(other, 5, date(2026, 1, 1)))
    support_places = approve(org_id, 4, date(2026, 1, 1)).model_copy(
        update={"category": Category.SUPPORT}
    )
    await completed(quota, support_places)

    def issued(number: str, count: int, until: date, category: Category = Category.ADMIN) -> Any:
        return completed(
            quota,
            notice(org_id, number, count, date(2026, 1, 2)).model_copy(
                update={"valid_until": until, "category": category}
            ),
        )

    await issued("冀编用〔2026〕1号", 3, date(2099, 6, 30))  # usable
    await issued("冀编用〔2026〕2号", 1, date(2098, 1, 1))  # its one place used below
    await issued("冀编用〔2026〕3号", 2, date(2097, 1, 1))  # cancelled below
    await issued("冀编用〔2026〕4号", 2, date(2026, 3, 31))  # lapsed (the query's today is later)
    await issued("冀编用〔2026〕5号", 2, date(2099, 1, 1), Category.SUPPORT)  # usable, support
    await completed(quota, notice(other, "冀编用〔2026〕9号", 2, date(2026, 1, 2)))
    await completed(
        quota,
        OccupySlot(
            request_id=uuid.uuid4(),
            person_id=uuid.uuid4(),
            org_id=org_id,
            category=Category.ADMIN,
            notice_no="冀编用〔2026〕2号",
        ),
        **CLERK,
    )
    await completed(quota, CancelQuotaUseNotice(notice_no="冀编用〔2026〕3号"))

    body = await get(quota, f"/orgs/{org_id}/notices")
    assert (body["org_id"], body["name"], body["total"]) == (str(org_id), "长安区财政局", 5)
    listed = [(n["notice_no"], n["status"], n["remaining"]) for n in body["notices"]]
    assert listed == [
        ("冀编用〔2026〕4号", "expired", 0),
        ("冀编用〔2026〕3号", "cancelled", 0),
        ("冀编用〔2026〕2号", "issued", 0),
        ("冀编用〔2026〕5号", "issued", 2),
        ("冀编用〔2026〕1号", "issued", 3),
    ]
    # Each as the notice's own query shows it.
    one = await get(quota, "/notices", notice_no="冀编用〔2026〕1号")
    assert body["notices"][-1] == one

    usable = await get(quota, f"/orgs/{org_id}/notices", usable="true")
    assert [n["notice_no"] for n in usable["notices"]] == ["冀编用〔2026〕5号", "冀编用〔2026〕1号"]
    admin_usable = await get(quota, f"/orgs/{org_id}/notices", usable="true", category="admin")
    assert [n["notice_no"] for n in admin_usable["notices"]] == ["冀编用〔2026〕1号"]
    assert admin_usable["total"] == 1
    support = await get(quota, f"/orgs/{org_id}/notices", category="support")
    assert [n["notice_no"] for n in support["notices"]] == ["冀编用〔2026〕5号"]

    page = await get(quota, f"/orgs/{org_id}/notices", limit=2, offset=2)
    assert (page["total"], [n["notice_no"] for n in page["notices"]]) == (
        5,
        ["冀编用〔2026〕2号", "冀编用〔2026〕5号"],
    )
    theirs = await get(quota, f"/orgs/{other}/notices")
    assert [n["notice_no"] for n in theirs["notices"]] == ["冀编用〔2026〕9号"]

    assert (await get(quota, f"/orgs/{uuid.uuid4()}/notices", 404))["error"] == "not_found"
    bad = await get(quota, f"/orgs/{org_id}/notices", 400, category="teachers")
    assert bad["error"] == "invalid_query"
    assert (await get(quota, f"/orgs/{org_id}/notices", 400, usable="maybe"))["error"] == (
        "invalid_query"
    )


async def test_the_ledger_lists_every_change_with_its_document(
    quota, projection, monkeypatch
) -> None:
    first = await org(projection, name="长安区财政局")
    other = await org(projection, division_code="130203", name="路北区财政局")
    on(monkeypatch, date(2026, 1, 1))
    await completed(quota, approve(first, 10, date(2026, 1, 1)))
    await completed(quota, approve(first, 12, date(2026, 3, 1)))
    await completed(quota, notice(first, "冀编用〔2026〕21号", 2, date(2026, 3, 2)))
    await completed(quota, approve(other, 5, date(2026, 2, 1)))
    body = await get(quota, f"/orgs/{first}/ledger")
    assert body["total"] == 3
    newest, middle, oldest = body["changes"]
    assert [c["event_type"].split(".")[2] for c in body["changes"]] == [
        "QuotaUseNoticeIssued",
        "QuotaApproved",
        "QuotaApproved",
    ]
    assert (middle["before"]["approved"], middle["after"]["approved"]) == (10, 12)
    assert (middle["document"]["date"], middle["effective_date"]) == ("2026-03-01", "2026-03-01")
    assert oldest["actor_id"] and newest["document"]["number"] == "冀编用〔2026〕21号"
    page = await get(quota, f"/orgs/{first}/ledger", limit=1, offset=1)
    assert [c["seq"] for c in page["changes"]] == [middle["seq"]]
    early = await get(quota, f"/orgs/{first}/ledger", until="2026-02-01")
    assert [c["seq"] for c in early["changes"]] == [oldest["seq"]]
    province = await get(quota, "/divisions/130000/ledger")
    city = await get(quota, "/divisions/130100/ledger")
    assert (province["total"], city["total"]) == (4, 3)
    assert {c["org_id"] for c in city["changes"]} == {str(first)}
    await get(quota, "/divisions/999999/ledger", 400)
    await get(quota, f"/orgs/{first}/ledger", 400, since="not a date")
