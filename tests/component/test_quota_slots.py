"""Slot requests of the roster sagas (OccupySlot, ReleaseSlot, MoveSlot), without Kafka, on
SQLite and PostgreSQL — including 200 concurrent requests for 50 places from two processes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from contracts.codes import Category, LeaderPost, OrgKind
from contracts.envelope import Envelope
from contracts.orgs import OrgAbolished, OrgRegistered
from contracts.quota import (
    CancelQuotaUseNotice,
    MoveSlot,
    OccupySlot,
    ReleaseSlot,
    SetLeaderPosts,
)
from contracts.topics import COMMAND_RESULTS, QUOTA_COMMANDS
from services.quota.adapters.orm import quota_ledger, slot_requests, slots
from services.quota.bootstrap import build
from services.quota.service_layer import handlers
from services.runtime.app import ServiceRuntime
from tests.component import test_quota_handlers
from tests.component.test_orgs_handlers import count, outbox, results
from tests.component.test_quota_handlers import (
    DOC,
    ORG_DOC,
    DeadLetters,
    approve,
    completed,
    envelope,
    events,
    org,
    org_event,
    raw,
    rejected,
)
from tests.component.test_quota_notices import counts, issue
from tests.conftest import service_settings

# The service and its org projection, as the handler tests build them.
quota = test_quota_handlers.quota
projection = test_quota_handlers.projection

CLERK = {"actorroles": "clerk"}


def occupy(
    org_id: uuid.UUID,
    notice_no: str,
    *,
    person_id: uuid.UUID | None = None,
    request_id: uuid.UUID | None = None,
    category: str = "admin",
    leader_post: LeaderPost | None = None,
) -> OccupySlot:
    return OccupySlot(
        request_id=request_id or uuid.uuid4(),
        person_id=person_id or uuid.uuid4(),
        org_id=org_id,
        category=Category(category),
        notice_no=notice_no,
        leader_post=leader_post,
    )


def release(org_id: uuid.UUID, person_id: uuid.UUID, category: str = "admin") -> ReleaseSlot:
    return ReleaseSlot(
        request_id=uuid.uuid4(), person_id=person_id, org_id=org_id, category=Category(category)
    )


async def setup(quota: ServiceRuntime, projection: Any, places: int, notice: int) -> Any:
    org_id = await org(projection)
    await completed(quota, approve(org_id, places))
    cmd = issue(org_id, notice)
    await completed(quota, cmd)
    return org_id, cmd.notice_no


async def test_occupy_and_release_convert_reserved_and_occupied(quota, projection) -> None:
    org_id, notice_no = await setup(quota, projection, 5, 2)
    person = uuid.uuid4()
    await completed(quota, occupy(org_id, notice_no, person_id=person), **CLERK)
    assert tuple(await counts(quota, org_id)) == (5, 1, 1)
    (event,) = await events(quota, "SlotOccupied")
    assert (event.data["occupied"], event.data["person_id"]) == (1, str(person))
    await rejected(quota, occupy(org_id, notice_no, person_id=person), "already_enrolled", **CLERK)
    await completed(quota, release(org_id, person), **CLERK)
    assert tuple(await counts(quota, org_id)) == (5, 0, 1)
    (freed,) = await events(quota, "SlotReleased")
    assert freed.data["occupied"] == 0
    await rejected(quota, release(org_id, person), "not_enrolled", **CLERK)
    await rejected(quota, occupy(org_id, notice_no), "forbidden", actorroles="", actorid="x")
    await rejected(quota, occupy(org_id, notice_no), "forbidden", actorregion="130200", **CLERK)
    assert await count(quota, quota_ledger, quota_ledger.c.event_type == event.type) == 1


async def test_the_notice_must_be_valid_unexpired_and_not_used_up(
    quota, projection, monkeypatch: pytest.MonkeyPatch
) -> None:
    org_id, notice_no = await setup(quota, projection, 10, 1)
    other = await org(projection)
    await completed(quota, approve(other, 3))
    await rejected(quota, occupy(org_id, "no-such-notice"), "notice_invalid", **CLERK)
    await rejected(quota, occupy(other, notice_no), "notice_invalid", **CLERK)
    await completed(quota, occupy(org_id, notice_no), **CLERK)
    await rejected(quota, occupy(org_id, notice_no), "notice_exhausted", **CLERK)
    cancelled = issue(org_id, 2)
    await completed(quota, cancelled)
    await completed(quota, CancelQuotaUseNotice(notice_no=cancelled.notice_no))
    await rejected(quota, occupy(org_id, cancelled.notice_no), "notice_invalid", **CLERK)
    lapsing = issue(org_id, 2, valid_until=date(2030, 1, 31))
    await completed(quota, lapsing)
    monkeypatch.setattr(handlers, "today", lambda: date(2030, 2, 1))
    details = await rejected(quota, occupy(org_id, lapsing.notice_no), "notice_expired", **CLERK)
    assert details["valid_until"] == "2030-01-31"


async def test_an_over_quota_org_has_no_vacancy(quota, projection) -> None:
    from sqlalchemy import update

    from services.quota.adapters.orm import establishment

    org_id, notice_no = await setup(quota, projection, 3, 2)
    async with quota.sessions() as session:  # a merge left it holding more than approved
        await session.execute(
            update(establishment).where(establishment.c.org_id == str(org_id)).values(occupied=2)
        )
        await session.commit()
    details = await rejected(quota, occupy(org_id, notice_no), "no_vacancy", **CLERK)
    assert (details["approved"], details["occupied"], details["reserved"]) == (3, 2, 2)


async def test_leader_posts_are_held_within_the_approved_count(quota, projection) -> None:
    org_id, notice_no = await setup(quota, projection, 5, 3)
    await completed(quota, SetLeaderPosts(org_id=org_id, principal=1, deputy=0, document=DOC))
    head = uuid.uuid4()
    await completed(
        quota, occupy(org_id, notice_no, person_id=head, leader_post=LeaderPost.PRINCIPAL), **CLERK
    )
    for post in (LeaderPost.PRINCIPAL, LeaderPost.DEPUTY):
        await rejected(
            quota, occupy(org_id, notice_no, leader_post=post), "leader_posts_exceeded", **CLERK
        )
    assert tuple(await counts(quota, org_id)) == (5, 1, 2)
    await rejected(
        quota,
        SetLeaderPosts(org_id=org_id, principal=0, deputy=0, document=DOC),
        "conflict",
    )
    await completed(quota, release(org_id, head), **CLERK)
    await completed(quota, occupy(org_id, notice_no, leader_post=LeaderPost.PRINCIPAL), **CLERK)


async def test_a_request_id_takes_effect_once(quota, projection) -> None:
    org_id, notice_no = await setup(quota, projection, 5, 3)
    cmd = occupy(org_id, notice_no)
    first = await completed(quota, cmd, **CLERK)
    again = envelope(cmd, id=first.data["command_id"], **CLERK)  # the same message id
    await quota.command_consumer.process(raw(QUOTA_COMMANDS, again))
    assert [r.type for r in await results(quota, again.id)] == [first.type, first.type]
    details = await rejected(quota, cmd, "conflict", **CLERK)  # a new message id
    assert details["first_command_id"] == first.data["command_id"]
    assert details["event_type"] == "bianzhi.quota.SlotOccupied.v1"
    assert tuple(await counts(quota, org_id)) == (5, 1, 2)


async def test_a_request_meets_the_org_as_quota_knows_it_when_claimed(quota, projection) -> None:
    """The claim of a request reads its org along: an org quota has not heard of yet is
    refused and leaves no claim behind (the same request takes effect once the org is known),
    an org abolished since is refused as no longer active."""
    later, request_id = uuid.uuid4(), uuid.uuid4()
    await rejected(
        quota, occupy(later, "冀编用〔2026〕9号", request_id=request_id), "not_found", **CLERK
    )
    assert await count(quota, slot_requests) == 0
    await org_event(
        projection,
        OrgRegistered(
            org_id=later,
            name="石家庄市长安区审计局",
            kind=OrgKind.ORGAN,
            division_code="130102",
            document=ORG_DOC,
            effective_date=ORG_DOC.date,
        ),
    )
    await completed(quota, approve(later, 3))
    notice = issue(later, 2)
    await completed(quota, notice)
    await completed(quota, occupy(later, notice.notice_no, request_id=request_id), **CLERK)
    assert tuple(await counts(quota, later)) == (3, 1, 1)
    await org_event(
        projection, OrgAbolished(org_id=later, document=ORG_DOC, effective_date=ORG_DOC.date)
    )
    await rejected(quota, occupy(later, notice.notice_no), "org_not_active", **CLERK)
    assert tuple(await counts(quota, later)) == (3, 1, 1)
    assert await count(quota, slot_requests) == 1


async def test_a_batch_of_occupations_ends_as_if_one_by_one(quota, projection) -> None:
    """One fetch, one refused mid-way: every completed request names its event and left one
    history row; the refused one left neither."""
    org_id, notice_no = await setup(quota, projection, 10, 4)
    taken = uuid.uuid4()
    await completed(quota, occupy(org_id, notice_no, person_id=taken), **CLERK)
    history = await count(quota, quota_ledger)
    cmds = [occupy(org_id, notice_no) for _ in range(2)]
    cmds.insert(1, occupy(org_id, notice_no, person_id=taken))  # already holds a slot
    envs = [envelope(c, **CLERK) for c in cmds]
    await quota.command_consumer.process_batch([raw(QUOTA_COMMANDS, e) for e in envs])
    outcomes = [(await results(quota, e.id))[0] for e in envs]
    assert [r.type for r in outcomes] == [
        "bianzhi.CommandCompleted.v1",
        "bianzhi.CommandRejected.v1",
        "bianzhi.CommandCompleted.v1",
    ]
    assert outcomes[1].data["code"] == "already_enrolled"
    assert tuple(await counts(quota, org_id)) == (10, 3, 1)
    occupied = {e.data["request_id"]: e for e in await events(quota, "SlotOccupied")}
    async with quota.sessions() as session:
        requests = {r.request_id: r for r in await session.execute(select(slot_requests))}
    for cmd, res in zip(cmds, outcomes, strict=True):
        if res.type.endswith("Rejected.v1"):
            assert str(cmd.request_id) not in requests
            continue
        event = occupied[str(cmd.request_id)]
        assert res.data["events"] == [event.id]
        row = requests[str(cmd.request_id)]
        assert (row.event_id, row.event_type) == (event.id, event.type)
    assert await count(quota, quota_ledger) == history + 2
    assert (
        await count(
            quota,
            quota_ledger,
            quota_ledger.c.event_id.in_(
                [occupied[str(c.request_id)].id for c in (cmds[0], cmds[2])]
            ),
        )
        == 2
    )


async def test_move_slot_releases_and_occupies_atomically(quota, projection) -> None:
    source, notice_a = await setup(quota, projection, 3, 1)
    target, notice_b = await setup(quota, projection, 3, 1)
    person = uuid.uuid4()
    await completed(quota, occupy(source, notice_a, person_id=person), **CLERK)

    def move(notice_no: str, to: uuid.UUID = target, who: uuid.UUID = person) -> MoveSlot:
        return MoveSlot(
            request_id=uuid.uuid4(),
            person_id=who,
            from_org_id=source,
            to_org_id=to,
            category=Category.ADMIN,
            notice_no=notice_no,
        )

    await rejected(quota, move(notice_a), "notice_invalid", **CLERK)
    await rejected(quota, move(notice_b, who=uuid.uuid4()), "not_enrolled", **CLERK)
    institution = await org(projection, kind=OrgKind.PUBLIC_INSTITUTION)
    await rejected(quota, move(notice_b, to=institution), "category_not_allowed", **CLERK)
    assert tuple(await counts(quota, source)) == (3, 1, 0)
    await completed(quota, move(notice_b), **CLERK)
    assert tuple(await counts(quota, source)) == (3, 0, 0)
    assert tuple(await counts(quota, target)) == (3, 1, 0)
    (moved,) = await events(quota, "SlotMoved")
    assert (moved.data["from_org_id"], moved.subject) == (str(source), str(target))
    assert await count(quota, slots, slots.c.org_id == str(target)) == 1


# --- the hard guarantee -------------------------------------------------------------------


@pytest.fixture
async def second(quota: ServiceRuntime, tmp_path: Path) -> Any:
    """Another quota process on the same database."""
    rt = build(service_settings(tmp_path, "localhost:1"))
    rt.command_consumer.dead_letter = DeadLetters()
    try:
        yield rt
    finally:
        await rt.engine.dispose()
        await rt.read_engine.dispose()


async def test_200_concurrent_requests_for_50_places_from_two_processes(
    quota, second, projection
) -> None:
    assert second.database_url == quota.database_url
    org_id, notice_no = await setup(quota, projection, 50, 50)
    envs = [envelope(occupy(org_id, notice_no), **CLERK) for _ in range(200)]
    started = time.perf_counter()
    await asyncio.gather(
        *(
            (quota if i % 2 else second).command_consumer.process(raw(QUOTA_COMMANDS, env))
            for i, env in enumerate(envs)
        )
    )
    elapsed = time.perf_counter() - started
    ids = {env.id for env in envs}
    outcomes = Counter()
    for row in await outbox(quota, topic=COMMAND_RESULTS):
        res = Envelope.from_bytes(row.value)
        if res.data["command_id"] in ids:
            outcomes[res.data.get("code") or "completed"] += 1
    print(f"\n200 occupy requests, 50 places, two processes: {dict(outcomes)} in {elapsed:.2f}s")
    assert outcomes["completed"] == 50
    assert outcomes["notice_exhausted"] + outcomes["no_vacancy"] == 150
    assert sum(outcomes.values()) == 200
    assert tuple(await counts(quota, org_id)) == (50, 50, 0)
    occupied = await events(quota, "SlotOccupied")
    assert len(occupied) == 50
    assert sorted(e.data["occupied"] for e in occupied) == list(range(1, 51))
    assert await count(quota, slots, slots.c.org_id == str(org_id)) == 50
    ledger = await count(
        quota, quota_ledger, quota_ledger.c.event_type == "bianzhi.quota.SlotOccupied.v1"
    )
    assert ledger == 50
