"""The quota service without Kafka: org events go into its projection consumer, commands into
its command consumer, as if they came off their topics (SQLite and PostgreSQL).

The relay does not run, so what the service would publish stays in the outbox, where it is
checked. The queries are called on the service's router.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from contracts.base import Event, Message
from contracts.codes import Category, OrgKind
from contracts.common import Document
from contracts.envelope import CONTENT_TYPE, Envelope
from contracts.orgs import (
    OrgAbolished,
    OrgFunctionsUpdated,
    OrgMoved,
    OrgRegistered,
    OrgRenamed,
    OrgsMerged,
)
from contracts.quota import (
    ApproveQuota,
    MergeEstablishments,
    SetLeaderPosts,
    SetRegionLimit,
    TransferQuota,
)
from contracts.topics import COMMAND_RESULTS, ORGS_EVENTS, QUOTA_COMMANDS, QUOTA_EVENTS
from services.quota.adapters.orm import (
    establishment,
    leader_posts,
    org_projection,
    quota_ledger,
    region_limits,
)
from services.quota.bootstrap import build
from services.runtime.app import ServiceRuntime
from services.runtime.events import EventConsumer
from services.runtime.messaging import RawMessage, event_routes
from tests.component.test_orgs_handlers import (
    COMPLETED,
    REJECTED,
    DeadLetters,
    count,
    envelope,
    outbox,
    result,
    stored_results,
)
from tests.conftest import service_settings
from tests.support.sql import recorded

DOC = Document(title="关于核定编制的批复", number="冀编〔2026〕7号", date=date(2026, 2, 1))
DAY = date(2026, 2, 1)
ORG_DOC = Document(title="关于设立机构的批复", number="冀编〔2026〕1号", date=date(2026, 1, 5))

_offsets = itertools.count()


@pytest.fixture
async def quota(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    monkeypatch.setenv("BIANZHI_QUOTA_DATABASE_URL", db_url)
    rt = build(service_settings(tmp_path, "localhost:1"))
    rt.command_consumer.dead_letter = DeadLetters()
    await rt.migrate()
    try:
        yield rt
    finally:
        await rt.engine.dispose()
        await rt.read_engine.dispose()


@pytest.fixture
def projection(quota: ServiceRuntime) -> EventConsumer:
    """The consumer the runtime subscribes to bianzhi.orgs.events.v1."""
    (sub,) = quota.definition.event_subscriptions
    assert sub.topic == ORGS_EVENTS
    return EventConsumer(
        routes=event_routes(sub.routes),
        service="quota",
        consumer=f"quota<-{sub.topic}",
        uow_factory=quota.uow,
        dead_letter=DeadLetters(),
    )


# --- helpers ------------------------------------------------------------------------------


def raw(topic: str, env: Envelope) -> RawMessage:
    return RawMessage(
        topic=topic,
        partition=0,
        offset=next(_offsets),
        key=(env.subject or env.id).encode(),
        value=env.to_bytes(),
        headers=(("content-type", CONTENT_TYPE.encode()),),
    )


async def org_event(projection: EventConsumer, event: Event) -> Envelope:
    env = event.envelope(source="/orgs", actorid="li.na", actorregion="130000")
    await projection.process(raw(ORGS_EVENTS, env))
    return env


async def org(
    projection: EventConsumer,
    *,
    kind: OrgKind = OrgKind.ORGAN,
    division_code: str = "130102",
    name: str = "石家庄市长安区财政局",
) -> uuid.UUID:
    """An org registered with the orgs service, as quota learns of it."""
    org_id = uuid.uuid4()
    await org_event(
        projection,
        OrgRegistered(
            org_id=org_id,
            name=name,
            kind=kind,
            division_code=division_code,
            document=ORG_DOC,
            effective_date=ORG_DOC.date,
        ),
    )
    return org_id


async def send(rt: ServiceRuntime, payload: Message, **actor: Any) -> Envelope:
    env = envelope(payload, **actor)
    await rt.command_consumer.process(raw(QUOTA_COMMANDS, env))
    return await result(rt, env.id)


async def completed(rt: ServiceRuntime, payload: Message, **actor: Any) -> Envelope:
    res = await send(rt, payload, **actor)
    assert res.type == COMPLETED, res.data
    return res


async def rejected(rt: ServiceRuntime, payload: Message, code: str, **actor: Any) -> dict:
    """Send ``payload``; assert it was refused with ``code`` and changed nothing."""
    before = await ledger_size(rt)
    res = await send(rt, payload, **actor)
    assert res.type == REJECTED, res.data
    assert res.data["code"] == code, res.data
    assert [(r.result_type, r.code) for r in await stored_results(rt, res.data["command_id"])] == [
        (REJECTED, code)
    ]
    assert await ledger_size(rt) == before
    return res.data["details"]


async def ledger_size(rt: ServiceRuntime) -> int:
    return await count(rt, quota_ledger)


def approve(org_id: uuid.UUID, approved: int, category: str = "admin", **kw: Any) -> ApproveQuota:
    return ApproveQuota(
        org_id=org_id,
        category=Category(category),
        approved=approved,
        document=DOC,
        effective_date=DAY,
        **kw,
    )


def limit(division_code: str, value: int, category: str = "admin") -> SetRegionLimit:
    return SetRegionLimit(
        division_code=division_code, category=Category(category), limit=value, document=DOC
    )


def transfer(
    source: uuid.UUID, target: uuid.UUID, amount: int, category: str = "admin"
) -> TransferQuota:
    return TransferQuota(
        from_org_id=source,
        to_org_id=target,
        category=Category(category),
        amount=amount,
        document=DOC,
    )


async def events(rt: ServiceRuntime, type_: str | None = None) -> list[Envelope]:
    rows = await outbox(rt, topic=QUOTA_EVENTS)
    found = [Envelope.from_bytes(r.value) for r in rows]
    return [e for e in found if type_ is None or e.type == f"bianzhi.quota.{type_}.v1"]


async def approved(rt: ServiceRuntime, org_id: uuid.UUID, category: str = "admin") -> int | None:
    async with rt.sessions() as session:
        return (
            await session.execute(
                select(establishment.c.approved).where(
                    establishment.c.org_id == str(org_id), establishment.c.category == category
                )
            )
        ).scalar_one_or_none()


async def hold(rt: ServiceRuntime, table: Any, org_id: uuid.UUID, **values: int) -> None:
    """Stand in for slot occupation (a later step of the service): set held counts directly."""
    async with rt.sessions() as session:
        await session.execute(update(table).where(table.c.org_id == str(org_id)).values(**values))
        await session.commit()


async def projected(rt: ServiceRuntime, org_id: uuid.UUID) -> Any:
    async with rt.sessions() as session:
        query = select(org_projection).where(org_projection.c.org_id == str(org_id))
        return (await session.execute(query)).one_or_none()


def api(rt: ServiceRuntime) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.router), base_url="http://t")


async def get(rt: ServiceRuntime, path: str, expect: int = 200, /, **params: Any) -> Any:
    async with api(rt) as client:
        response = await client.get(path, params=params)
    assert response.status_code == expect, (path, response.text)
    return response.json()


# --- the org projection -------------------------------------------------------------------


async def test_the_projection_follows_the_org_events(quota, projection) -> None:
    org_id = await org(projection)
    parent = uuid.uuid4()
    await org_event(
        projection,
        OrgMoved(
            org_id=org_id,
            parent_org_id=parent,
            division_code="130102",
            document=ORG_DOC,
            effective_date=DAY,
        ),
    )
    await org_event(
        projection,
        OrgRenamed(
            org_id=org_id, name="新名称", previous_name="旧", document=ORG_DOC, effective_date=DAY
        ),
    )
    row = await projected(quota, org_id)
    assert (row.name, row.kind, row.division_code, row.parent_org_id, row.status) == (
        "新名称",
        "organ",
        "130102",
        str(parent),
        "active",
    )
    await org_event(projection, OrgAbolished(org_id=org_id, document=ORG_DOC, effective_date=DAY))
    assert (await projected(quota, org_id)).status == "abolished"


async def test_a_repeated_event_is_applied_once_and_unknown_types_are_ignored(
    quota, projection
) -> None:
    org_id = uuid.uuid4()
    env = OrgRegistered(
        org_id=org_id,
        name="甲",
        kind=OrgKind.ORGAN,
        division_code="130102",
        document=ORG_DOC,
        effective_date=DAY,
    ).envelope(source="/orgs")
    await projection.process(raw(ORGS_EVENTS, env))
    await org_event(
        projection,
        OrgRenamed(
            org_id=org_id, name="乙", previous_name="甲", document=ORG_DOC, effective_date=DAY
        ),
    )
    await projection.process(raw(ORGS_EVENTS, env))  # the registration again, after the rename
    assert (await projected(quota, org_id)).name == "乙"
    await org_event(
        projection,
        OrgFunctionsUpdated(org_id=org_id, functions=["x"], document=ORG_DOC, effective_date=DAY),
    )
    assert await count(quota, org_projection) == 1


async def test_a_merge_seen_before_the_registration_keeps_the_source_merged(
    quota, projection
) -> None:
    target = await org(projection)
    early = uuid.uuid4()
    await org_event(
        projection,
        OrgsMerged(
            source_org_ids=[early], target_org_id=target, document=ORG_DOC, effective_date=DAY
        ),
    )
    await rejected(quota, approve(early, 1), "not_found")
    await org_event(
        projection,
        OrgRegistered(
            org_id=early,
            name="被合并单位",
            kind=OrgKind.ORGAN,
            division_code="130102",
            document=ORG_DOC,
            effective_date=DAY,
        ),
    )
    assert (await projected(quota, early)).status == "merged"
    await rejected(quota, approve(early, 1), "org_not_active")
    assert (await projected(quota, target)).status == "active"


# --- ApproveQuota -------------------------------------------------------------------------


async def test_approve_writes_the_ledger_history_and_the_event(quota, projection) -> None:
    org_id = await org(projection)
    first = await completed(quota, approve(org_id, 5))
    second = await completed(quota, approve(org_id, 8))
    assert await approved(quota, org_id) == 8
    found = await events(quota, "QuotaApproved")
    assert [(e.data["approved"], e.data["previous_approved"]) for e in found] == [(5, 0), (8, 5)]
    assert found[1].subject == str(org_id)
    assert second.data["events"] == [found[1].id]
    assert first.data["events"] == [found[0].id]
    async with quota.sessions() as session:
        rows = (await session.execute(select(quota_ledger).order_by(quota_ledger.c.seq))).all()
    assert [(r.before, r.after) for r in rows] == [
        ({"approved": 0}, {"approved": 5}),
        ({"approved": 5}, {"approved": 8}),
    ]
    assert rows[1].document == DOC.model_dump(mode="json")
    assert rows[1].command_id == second.data["command_id"]
    assert (rows[1].actor_id, rows[1].effective_date, rows[1].division_code) == (
        "li.na",
        DAY,
        "130102",
    )


async def test_approving_an_unknown_org_is_not_found(quota, projection) -> None:
    details = await rejected(quota, approve(uuid.uuid4(), 5), "not_found")
    assert "org_id" in details


async def test_approving_outside_the_actors_region_is_forbidden(quota, projection) -> None:
    org_id = await org(projection)
    details = await rejected(quota, approve(org_id, 5), "forbidden", actorregion="130200")
    assert details == {"division_code": "130102", "actor_region": "130200"}
    await completed(quota, approve(org_id, 5), actorregion="130100")


async def test_a_clerk_may_not_approve_quota(quota, projection) -> None:
    org_id = await org(projection)
    details = await rejected(quota, approve(org_id, 5), "forbidden", actorroles="clerk")
    assert details["required_role"] == "approver"


async def test_approving_for_an_abolished_org_is_refused(quota, projection) -> None:
    org_id = await org(projection)
    await org_event(projection, OrgAbolished(org_id=org_id, document=ORG_DOC, effective_date=DAY))
    details = await rejected(quota, approve(org_id, 5), "org_not_active")
    assert details["status"] == "abolished"


async def test_a_category_the_org_kind_may_not_hold_is_refused(quota, projection) -> None:
    organ = await org(projection)
    institution = await org(projection, kind=OrgKind.PUBLIC_INSTITUTION, name="长安区医院")
    details = await rejected(quota, approve(organ, 5, "institutional"), "category_not_allowed")
    assert details["kind"] == "organ"
    await rejected(quota, approve(institution, 5, "admin"), "category_not_allowed")
    await completed(quota, approve(institution, 5, "institutional", funding="full"))


async def test_approved_may_not_fall_below_occupied_and_reserved(quota, projection) -> None:
    org_id = await org(projection)
    await completed(quota, approve(org_id, 10))
    await hold(quota, establishment, org_id, occupied=6, reserved=2)
    details = await rejected(quota, approve(org_id, 7), "below_occupied")
    assert details == {
        "org_id": str(org_id),
        "category": "admin",
        "approved": 7,
        "occupied": 6,
        "reserved": 2,
    }
    await completed(quota, approve(org_id, 8))


async def test_the_database_refuses_a_total_below_what_is_held(quota, projection) -> None:
    """The conditional update holds even when the rule's read saw an older row."""
    org_id = await org(projection)
    await completed(quota, approve(org_id, 10))
    await hold(quota, establishment, org_id, occupied=9)
    async with quota.uow() as uow:
        assert not await uow.ledger.set_approved(org_id, Category.ADMIN, 8, None)
        assert await uow.ledger.set_approved(org_id, Category.ADMIN, 9, None)


async def test_approvals_in_a_region_may_not_exceed_its_limit(quota, projection) -> None:
    a = await org(projection)
    b = await org(projection, division_code="130104", name="桥西区财政局")
    elsewhere = await org(projection, division_code="130202", name="路南区财政局")
    await completed(quota, limit("130100", 10))
    await completed(quota, approve(a, 8))
    details = await rejected(quota, approve(b, 3), "region_limit_exceeded")
    assert details == {
        "division_code": "130100",
        "category": "admin",
        "limit": 10,
        "used": 8,
        "asked": 3,
    }
    await completed(quota, approve(b, 2))
    await completed(quota, approve(elsewhere, 50))  # another city: not inside the limit
    await completed(quota, approve(a, 7))  # a reduction is always allowed
    await rejected(quota, approve(a, 9), "region_limit_exceeded")
    await completed(quota, approve(a, 5, "support"))  # another category


async def test_an_enclosing_region_limit_also_applies(quota, projection) -> None:
    a = await org(projection)
    b = await org(projection, division_code="130202", name="路南区财政局")
    await completed(quota, limit("130000", 10))
    await completed(quota, limit("130100", 8))
    await completed(quota, approve(a, 8))
    details = await rejected(quota, approve(b, 3), "region_limit_exceeded")
    assert (details["division_code"], details["used"], details["asked"]) == ("130000", 8, 3)
    details = await rejected(quota, approve(a, 11), "region_limit_exceeded")
    assert details["division_code"] == "130100"  # the nearest region over its limit


async def test_every_limited_enclosing_region_is_checked_with_one_read_of_the_totals(
    quota, projection
) -> None:
    a = await org(projection)  # 130102, in the city 130100, in the province 130000
    b = await org(projection, division_code="130104", name="桥西区财政局")
    c = await org(projection, division_code="130202", name="路南区财政局")
    for code, value in (("130000", 100), ("130100", 50), ("130102", 20)):
        await completed(quota, limit(code, value))
    await completed(quota, approve(c, 40))
    await completed(quota, approve(b, 30))

    with recorded(quota.engine) as seen:
        await completed(quota, approve(a, 15))
    assert len([e for e in seen if e.reads("division_totals")]) == 1
    # Each region is still judged by its own total: the county (15 of 20), the city (45 of
    # 50) and the province (85 of 100).
    details = await rejected(quota, approve(a, 21), "region_limit_exceeded")
    assert (details["division_code"], details["used"], details["asked"]) == ("130102", 15, 6)
    details = await rejected(quota, approve(b, 36), "region_limit_exceeded")
    assert (details["division_code"], details["used"], details["asked"]) == ("130100", 45, 6)
    details = await rejected(quota, approve(c, 56), "region_limit_exceeded")
    assert (details["division_code"], details["used"], details["asked"]) == ("130000", 85, 16)
    reached = await events(quota, "RegionLimitReached")
    assert [(e.data["division_code"], e.data["threshold_percent"]) for e in reached] == [
        ("130100", 90)
    ]


async def test_region_limit_reached_is_emitted_when_crossing_90_and_100_percent(
    quota, projection
) -> None:
    a = await org(projection)
    await completed(quota, limit("130100", 10))
    await completed(quota, approve(a, 8))
    assert await events(quota, "RegionLimitReached") == []
    await completed(quota, approve(a, 9))
    await completed(quota, approve(a, 9, "support"))
    await completed(quota, approve(a, 10))
    reached = await events(quota, "RegionLimitReached")
    assert [
        (e.data["division_code"], e.data["threshold_percent"], e.data["used"], e.data["limit"])
        for e in reached
    ] == [("130100", 90, 9, 10), ("130100", 100, 10, 10)]
    assert reached[0].subject == "130100"


# --- SetRegionLimit -----------------------------------------------------------------------


async def test_set_region_limit_records_the_previous_limit(quota, projection) -> None:
    await completed(quota, limit("130100", 10))
    await completed(quota, limit("130100", 12))
    found = await events(quota, "RegionLimitSet")
    assert [(e.data["limit"], e.data.get("previous_limit")) for e in found] == [
        (10, None),
        (12, 10),
    ]
    assert found[0].subject == "130100"
    assert await count(quota, region_limits) == 1
    assert await ledger_size(quota) == 2


async def test_a_limit_below_what_is_approved_is_refused(quota, projection) -> None:
    a = await org(projection)
    await completed(quota, approve(a, 8))
    details = await rejected(quota, limit("130100", 7), "region_limit_exceeded")
    assert details == {"division_code": "130100", "category": "admin", "limit": 7, "used": 8}
    await completed(quota, limit("130100", 8))
    reached = await events(quota, "RegionLimitReached")
    assert [e.data["threshold_percent"] for e in reached] == [90, 100]


async def test_a_child_limit_may_not_exceed_its_parents(quota, projection) -> None:
    await completed(quota, limit("130000", 100))
    details = await rejected(quota, limit("130100", 101), "region_limit_exceeded")
    assert (details["parent_division_code"], details["parent_limit"]) == ("130000", 100)
    await completed(quota, limit("130100", 60))
    details = await rejected(quota, limit("130000", 59), "region_limit_exceeded")
    assert (details["child_division_code"], details["child_limit"]) == ("130100", 60)


async def test_setting_a_limit_outside_the_actors_region_is_forbidden(quota, projection) -> None:
    await rejected(quota, limit("130000", 100), "forbidden", actorregion="130100")
    await rejected(quota, limit("130200", 100), "forbidden", actorregion="130100")
    await completed(quota, limit("130102", 100), actorregion="130100")


# --- TransferQuota ------------------------------------------------------------------------


async def test_transfer_moves_quota_between_both_orgs_at_once(quota, projection) -> None:
    a = await org(projection)
    b = await org(projection, division_code="130104", name="桥西区财政局")
    await completed(quota, approve(a, 10))
    await completed(quota, transfer(a, b, 4))
    assert (await approved(quota, a), await approved(quota, b)) == (6, 4)
    (moved,) = await events(quota, "QuotaTransferred")
    assert (moved.data["from_approved"], moved.data["to_approved"], moved.subject) == (6, 4, str(a))
    async with quota.sessions() as session:
        rows = (
            await session.execute(select(quota_ledger).where(quota_ledger.c.event_id == moved.id))
        ).all()
    assert sorted((r.org_id, r.before["approved"], r.after["approved"]) for r in rows) == sorted(
        [(str(a), 10, 6), (str(b), 0, 4)]
    )


async def test_transfer_may_not_take_what_is_held(quota, projection) -> None:
    a = await org(projection)
    b = await org(projection, name="另一单位")
    await completed(quota, approve(a, 10))
    await hold(quota, establishment, a, occupied=5, reserved=2)
    details = await rejected(quota, transfer(a, b, 4), "below_occupied")
    assert details == {
        "org_id": str(a),
        "category": "admin",
        "approved": 6,
        "occupied": 5,
        "reserved": 2,
    }
    await rejected(quota, transfer(b, a, 1), "below_occupied")  # b holds nothing
    await completed(quota, transfer(a, b, 3))
    assert (await approved(quota, a), await approved(quota, b)) == (7, 3)


async def test_transfer_into_a_full_region_is_refused_but_within_it_is_not(
    quota, projection
) -> None:
    a = await org(projection)
    b = await org(projection, division_code="130104", name="桥西区财政局")
    far = await org(projection, division_code="130202", name="路南区财政局")
    await completed(quota, approve(far, 10))
    await completed(quota, approve(a, 10))
    await completed(quota, limit("130100", 10))
    await completed(quota, transfer(a, b, 5))  # inside 130100: its total does not change
    details = await rejected(quota, transfer(far, b, 1), "region_limit_exceeded")
    assert (details["division_code"], details["used"], details["asked"]) == ("130100", 10, 1)
    await completed(quota, transfer(b, far, 1))  # out of the region is fine


async def test_transfer_checks_both_orgs(quota, projection) -> None:
    a = await org(projection)
    institution = await org(projection, kind=OrgKind.PUBLIC_INSTITUTION, name="医院")
    gone = await org(projection, name="已撤销单位")
    outside = await org(projection, division_code="130202", name="路南区财政局")
    await org_event(projection, OrgAbolished(org_id=gone, document=ORG_DOC, effective_date=DAY))
    await completed(quota, approve(a, 10))
    await rejected(quota, transfer(a, uuid.uuid4(), 1), "not_found")
    await rejected(quota, transfer(a, gone, 1), "org_not_active")
    await rejected(quota, transfer(a, institution, 1), "category_not_allowed")
    await rejected(quota, transfer(a, outside, 1), "forbidden", actorregion="130100")
    assert await approved(quota, a) == 10


# --- SetLeaderPosts -----------------------------------------------------------------------


def posts(org_id: uuid.UUID, principal: int, deputy: int, **kw: Any) -> SetLeaderPosts:
    return SetLeaderPosts(org_id=org_id, principal=principal, deputy=deputy, document=DOC, **kw)


async def test_leader_posts_of_an_org_and_of_a_unit(quota, projection) -> None:
    org_id = await org(projection)
    unit = uuid.uuid4()
    await completed(quota, posts(org_id, 1, 3))
    await completed(quota, posts(org_id, 1, 2, unit_id=unit))
    await completed(quota, posts(org_id, 1, 4))
    found = await events(quota, "LeaderPostsSet")
    assert [
        (e.data.get("unit_id"), e.data["deputy"], e.data.get("previous_deputy")) for e in found
    ] == [
        (None, 3, None),
        (str(unit), 2, None),
        (None, 4, 3),
    ]
    assert await count(quota, leader_posts) == 2


async def test_a_first_approval_or_leader_post_setting_writes_its_row_in_one_statement(
    quota, projection
) -> None:
    a = await org(projection)
    for times in ("first", "again"):
        with recorded(quota.engine) as seen:
            await completed(quota, approve(a, 5 if times == "first" else 7))
        assert [w for e in seen if (w := e.writes("establishment"))] == ["INSERT"], times
        with recorded(quota.engine) as seen:
            await completed(quota, posts(a, 1, 2 if times == "first" else 3))
        assert [w for e in seen if (w := e.writes("leader_posts"))] == ["INSERT"], times
    assert await approved(quota, a) == 7
    body = await get(quota, f"/orgs/{a}/establishment")
    assert body["leader_posts"] == [
        {"unit_id": None, "principal": 1, "deputy": 3, "principal_held": 0, "deputy_held": 0}
    ]
    found = await events(quota, "QuotaApproved")
    assert [(e.data["approved"], e.data["previous_approved"]) for e in found] == [(5, 0), (7, 5)]


async def test_leader_posts_below_the_posts_held_are_a_conflict(quota, projection) -> None:
    org_id = await org(projection)
    await completed(quota, posts(org_id, 1, 3))
    await hold(quota, leader_posts, org_id, principal_held=1, deputy_held=3)
    details = await rejected(quota, posts(org_id, 1, 2), "conflict")
    assert (details["deputy"], details["deputy_held"]) == (2, 3)
    await rejected(quota, posts(org_id, 0, 3), "conflict")
    await rejected(quota, posts(uuid.uuid4(), 1, 1), "not_found")
    await completed(quota, posts(org_id, 2, 3))


# --- a rejection changes nothing ----------------------------------------------------------


async def test_a_rejected_command_writes_only_its_result(quota, projection) -> None:
    a = await org(projection)
    await completed(quota, limit("130100", 5))
    before = len(await outbox(quota))
    await rejected(quota, approve(a, 6), "region_limit_exceeded")
    rows = await outbox(quota)
    assert len(rows) == before + 1 and rows[-1].topic == COMMAND_RESULTS
    assert await approved(quota, a) is None


# --- concurrency --------------------------------------------------------------------------


async def test_concurrent_approvals_cannot_both_pass_a_region_limit(quota, projection) -> None:
    orgs = [
        await org(projection, division_code=code, name=f"单位{i}")
        for i, code in enumerate(["130102", "130104", "130102", "130104", "130102", "130104"])
    ]
    await completed(quota, limit("130100", 10))
    envs = [envelope(approve(o, 4)) for o in orgs]
    await asyncio.gather(*(quota.command_consumer.process(raw(QUOTA_COMMANDS, e)) for e in envs))
    outcomes = [(await result(quota, e.id)).type for e in envs]
    assert outcomes.count(COMPLETED) == 2
    assert outcomes.count(REJECTED) == 4
    assert sum([await approved(quota, o) or 0 for o in orgs]) == 8


async def test_concurrent_transfers_and_approvals_keep_the_region_limit(quota, projection) -> None:
    receivers = [await org(projection, division_code="130104", name=f"桥西{i}") for i in range(4)]
    approvees = [await org(projection, division_code="130102", name=f"长安{i}") for i in range(4)]
    givers = [await org(projection, division_code="130202", name=f"路南{i}") for i in range(4)]
    await completed(quota, limit("130100", 6))
    for o in givers:
        await completed(quota, approve(o, 5))
    moves = [envelope(transfer(src, dst, 3)) for src, dst in zip(givers, receivers, strict=True)]
    approvals = [envelope(approve(o, 3)) for o in approvees]
    everything = [m for pair in zip(moves, approvals, strict=True) for m in pair]
    await asyncio.gather(
        *(quota.command_consumer.process(raw(QUOTA_COMMANDS, e)) for e in everything)
    )
    outcomes = {e.id: (await result(quota, e.id)).type for e in everything}
    assert list(outcomes.values()).count(COMPLETED) == 2  # 3 + 3 fill the limit of 6
    inside = [await approved(quota, o) or 0 for o in receivers + approvees]
    assert sum(inside) == 6
    accepted = sum(outcomes[e.id] == COMPLETED for e in approvals)
    total = sum(inside) + sum([await approved(quota, o) or 0 for o in givers])
    assert total == 20 + 3 * accepted  # a transfer creates nothing and loses nothing


# --- queries ------------------------------------------------------------------------------


async def test_org_establishment_query(quota, projection) -> None:
    org_id = await org(projection)
    await completed(quota, approve(org_id, 10))
    await completed(quota, approve(org_id, 2, "support"))
    await hold(quota, establishment, org_id, occupied=3, reserved=1)
    await completed(quota, posts(org_id, 1, 2))
    body = await get(quota, f"/orgs/{org_id}/establishment")
    assert body["division_code"] == "130102" and body["status"] == "active"
    assert body["categories"] == [
        {"category": "admin", "funding": None, "approved": 10, "occupied": 3, "reserved": 1,
         "vacant": 6},
        {"category": "support", "funding": None, "approved": 2, "occupied": 3, "reserved": 1,
         "vacant": 0},
    ]  # fmt: skip
    assert body["leader_posts"] == [
        {"unit_id": None, "principal": 1, "deputy": 2, "principal_held": 0, "deputy_held": 0}
    ]
    assert (await get(quota, f"/orgs/{uuid.uuid4()}/establishment", 404))["error"] == "not_found"
    assert (await get(quota, "/orgs/nope/establishment", 400))["error"] == "invalid_path"


async def test_division_establishment_rolls_up_the_subtree_with_limits(quota, projection) -> None:
    a = await org(projection)
    b = await org(projection, division_code="130104", name="桥西区财政局")
    far = await org(projection, division_code="130202", name="路南区财政局")
    await completed(quota, limit("130100", 20))
    await completed(quota, limit("130102", 12))
    for o, n in ((a, 5), (b, 7), (far, 9)):
        await completed(quota, approve(o, n))
    body = await get(quota, "/divisions/130100/establishment")
    assert body["division_name"] == "石家庄市"
    assert body["categories"] == [
        {"category": "admin", "approved": 12, "occupied": 0, "reserved": 0, "vacant": 12,
         "orgs": 2, "limit": 20, "headroom": 8},
    ]  # fmt: skip
    assert body["limits_inside"] == [{"division_code": "130102", "category": "admin", "limit": 12}]
    province = await get(quota, "/divisions/130000/establishment")
    assert province["categories"][0]["approved"] == 21
    assert province["categories"][0]["limit"] is None
    assert (await get(quota, "/divisions/999999/establishment", 400))["error"] == (
        "unknown_division"
    )


async def test_over_quota_lists_orgs_holding_more_than_approved(quota, projection) -> None:
    a = await org(projection)
    far = await org(projection, division_code="130202", name="路南区财政局")
    for o in (a, far):
        await completed(quota, approve(o, 5))
        await completed(quota, posts(o, 1, 1))
    await hold(quota, establishment, a, occupied=6)
    await hold(quota, leader_posts, far, deputy_held=2)
    body = await get(quota, "/over-quota")
    assert [(r["org_id"], r["approved"], r["occupied"]) for r in body["establishment"]] == [
        (str(a), 5, 6)
    ]
    assert [(r["org_id"], r["deputy_held"]) for r in body["leader_posts"]] == [(str(far), 2)]
    inside = await get(quota, "/over-quota", division_code="130100")
    assert len(inside["establishment"]) == 1 and inside["leader_posts"] == []
    await get(quota, "/over-quota", 400, division_code="12")


async def test_a_batch_of_approvals_against_one_limit_ends_as_if_one_by_one(
    quota, projection
) -> None:
    orgs = [await org(projection, name=f"单位{i}") for i in range(3)]
    await completed(quota, limit("130100", 10))
    envs = [envelope(approve(o, 4)) for o in orgs]
    await quota.command_consumer.process_batch([raw(QUOTA_COMMANDS, e) for e in envs])
    outcomes = [(await result(quota, e.id)).type for e in envs]
    assert outcomes == [COMPLETED, COMPLETED, REJECTED]
    assert [await approved(quota, o) for o in orgs] == [4, 4, None]


async def test_an_org_merged_earlier_in_a_batch_is_seen_merged_later_in_it(
    quota, projection
) -> None:
    """The org read by the first command of a fetch is closed by the second: the third sees it
    closed (the org kept for the transaction is forgotten when the projection changes)."""
    source, target = await org(projection), await org(projection, name="长安区人社局")
    await completed(quota, approve(target, 3))
    merge = MergeEstablishments(
        request_id=uuid.uuid4(), source_org_ids=[source], target_org_id=target, document=DOC
    )
    envs = [envelope(approve(source, 4)), envelope(merge), envelope(approve(source, 6))]
    await quota.command_consumer.process_batch([raw(QUOTA_COMMANDS, e) for e in envs])
    outcomes = [await result(quota, e.id) for e in envs]
    assert [r.type for r in outcomes] == [COMPLETED, COMPLETED, REJECTED]
    assert outcomes[2].data["code"] == "org_not_active"
    assert await approved(quota, target) == 7
