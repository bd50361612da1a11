"""The checker itself: each bad outcome it exists to catch is counted (no broker needed)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.chaos import checker
from tests.chaos.checker import Report, check_ledger, check_state
from tests.chaos.ledger import (
    COMPLETED,
    REJECTED,
    DeadLetter,
    EventSeen,
    Ledger,
    Poison,
    ResultSeen,
    Sent,
)
from tests.chaos.load import County, NoticeModel, OrgModel, PersonModel, World

ENROL = "bianzhi.roster.EnrolPerson.v1"
ENROLLED = "bianzhi.roster.PersonEnrolled.v1"
RELEASED = "bianzhi.roster.PersonReleased.v1"
ROSTER_EVENTS = "bianzhi.roster.events.v1"


def sent(ledger: Ledger, kind: str = "valid", expect: str = "completed") -> str:
    cid = str(uuid.uuid4())
    s = Sent(
        id=cid,
        topic="bianzhi.roster.commands.v1",
        type=ENROL,
        kind=kind,
        op="enrol",
        expect=expect,
        key="k",
        service="roster",
    )
    ledger.record_send(s, s.topic, b"k", b"{}")
    return cid


def result(
    ledger: Ledger,
    cid: str,
    *,
    ok: bool = True,
    events: list[str] | None = None,
    result_id: str | None = None,
    code: str | None = None,
) -> None:
    ledger.add_result(
        ResultSeen(
            result_id=result_id or str(uuid.uuid4()),
            command_id=cid,
            command_type=ENROL,
            type=COMPLETED if ok else REJECTED,
            code=None if ok else code or "conflict",
            events=events or [],
            partition=0,
            offset=0,
            broker=0,
        )
    )


def event(
    ledger: Ledger,
    cid: str,
    type_: str = ENROLLED,
    *,
    key: str = "p1",
    time: str = "2026-11-25T10:00:00+00:00",
    offset: int = 0,
    id: str | None = None,
) -> str:
    eid = id or str(uuid.uuid4())
    ledger.add_event(
        EventSeen(
            topic=ROSTER_EVENTS,
            partition=0,
            offset=offset,
            key=key,
            id=eid,
            type=type_,
            correlationid=cid,
            time=time,
            data={},
            broker=0,
        )
    )
    return eid


def checked(ledger: Ledger) -> Report:
    report = Report()
    check_ledger(ledger, report)
    return report


def test_a_clean_ledger_passes() -> None:
    ledger = Ledger()
    cid = sent(ledger)
    eid = event(ledger, cid)
    rid = str(uuid.uuid4())
    result(ledger, cid, events=[eid], result_id=rid)
    result(ledger, cid, events=[eid], result_id=rid)  # a redelivered copy is no second result
    event(ledger, cid, id=eid, offset=1)  # nor is a re-published copy of the event
    report = checked(ledger)
    assert report.passed, report.render()
    assert report.counts["results_seen"] == 2 and report.counts["results_distinct"] == 1


def test_each_bad_outcome_is_counted() -> None:
    ledger = Ledger()
    sent(ledger)  # never answered
    twice = sent(ledger)
    result(ledger, twice)
    result(ledger, twice)  # a second, different result
    doubled = sent(ledger)
    first, second = event(ledger, doubled, offset=1), event(ledger, doubled, offset=2)
    result(ledger, doubled, events=[first, second])
    lost = sent(ledger)
    result(ledger, lost, events=[str(uuid.uuid4())])  # its event is nowhere
    refused = sent(ledger)
    result(ledger, refused, ok=False)
    event(ledger, refused, key="p9")  # yet it changed something
    malformed = sent(ledger, kind="malformed", expect="invalid_message")
    result(ledger, malformed)
    rule = sent(ledger, kind="rule", expect="notice_exhausted")
    result(ledger, rule)
    ledger.record_poison(
        Poison(token="chaos-poison-x", topic="bianzhi.quota.commands.v1", sent_at=0.0)
    )
    ledger.add_dead(
        DeadLetter(
            topic="bianzhi.orgs.commands.v1.dlq",
            original_topic=None,
            error="boom",
            value=b"?",
            key=b"",
            sealed=False,
            broker=0,
        )
    )
    report = checked(ledger)
    assert not report.passed
    assert report.bad["commands_without_result"] == 1
    assert report.bad["commands_with_more_than_one_result"] == 1
    assert report.bad["commands_with_more_than_one_effect"] == 1
    assert report.bad["effects_missing"] == 1
    assert report.bad["effects_of_refused_commands"] == 1
    assert report.bad["valid_commands_refused"] == 1
    assert report.bad["malformed_commands_accepted"] == 1
    assert report.bad["rule_breaking_commands_accepted"] == 1
    assert report.bad["poison_not_dead_lettered"] == 1
    assert report.bad["unexpected_dead_letters"] == 1


def test_events_out_of_order_per_key() -> None:
    ledger = Ledger()
    enrol, release = sent(ledger), sent(ledger)
    # On the topic the release comes first, with an earlier time than the enrolment after it.
    r = event(ledger, release, RELEASED, key="p1", time="2026-11-25T10:00:00+00:00", offset=0)
    e = event(ledger, enrol, ENROLLED, key="p1", time="2026-11-25T09:00:00+00:00", offset=1)
    result(ledger, enrol, events=[e])
    result(ledger, release, events=[r])
    report = checked(ledger)
    # A release before any enrolment, and time going back.
    assert report.bad["events_out_of_order"] == 2, report.render()


def test_a_sealed_dead_letter_is_found_by_the_position_of_the_poison() -> None:
    ledger = Ledger()
    topic = "bianzhi.roster.commands.v1"
    ledger.record_poison(
        Poison(token="chaos-poison-y", topic=topic, sent_at=0.0, partition=2, offset=7)
    )

    def dead(partition: int, offset: int) -> DeadLetter:
        return DeadLetter(
            topic=f"{topic}.dlq",
            original_topic=topic,
            error="not JSON",
            value=b"v1:k1:sealed",
            key=b"",
            sealed=True,
            broker=0,
            original_partition=partition,
            original_offset=offset,
        )

    ledger.add_dead(dead(2, 7))
    assert checked(ledger).passed
    ledger.add_dead(dead(2, 8))  # a dead letter of something else
    assert checked(ledger).bad["unexpected_dead_letters"] == 1


class CannedApi:
    """The query APIs' answers for one org with two people, as ``get_json`` would give them."""

    def __init__(self) -> None:
        self.org = str(uuid.uuid4())
        self.people = [str(uuid.uuid4()), str(uuid.uuid4())]
        cats = {"admin": {"approved": 10, "occupied": 2, "reserved": 3}}
        self.answers: dict[str, Any] = {
            "quota/occupancy": {
                "orgs": [{"org_id": self.org, "division_code": "130102", "categories": cats}]
            },
            "roster/counts": {
                "orgs": [
                    {
                        "org_id": self.org,
                        "division_code": "130102",
                        "categories": {"admin": {"held": 2, "changing": 0, "enrolling": 0}},
                    }
                ],
                "totals": {"admin": {"held": 2, "changing": 0, "enrolling": 0}},
            },
            "quota/over-quota": {"establishment": [], "leader_posts": []},
            "quota/divisions/130102/establishment": {
                "categories": [{"category": "admin", "approved": 10, "limit": 30}]
            },
            f"quota/orgs/{self.org}/establishment": {
                "leader_posts": [
                    {
                        "unit_id": None,
                        "principal": 1,
                        "deputy": 3,
                        "principal_held": 1,
                        "deputy_held": 0,
                    }
                ]
            },
            "roster/sagas": {"sagas": []},
            f"orgs/orgs/{self.org}": {"org_id": self.org},
            **{f"roster/people/{p}": {"status": "active", "org_id": self.org} for p in self.people},
        }

    async def get_json(self, url: str, timeout: float = 30.0) -> tuple[int, Any]:
        path, _, query = url.split("://", 1)[1].partition("?")
        body = self.answers.get(path)
        if path == "roster/sagas":
            status = dict(p.split("=") for p in query.split("&"))["status"]
            body = {"sagas": [s for s in body["sagas"] if s["status"] == status]}
        return (200, body) if body is not None else (404, None)

    def world(self) -> World:
        world = World()
        world.counties["130102"] = County(code="130102", limit=30, approved=10)
        world.orgs[self.org] = OrgModel(
            org_id=self.org,
            county="130102",
            approved=10,
            principal=1,
            deputy=3,
            principal_held=1,
        )
        world.notices["n1"] = NoticeModel(no="n1", org_id=self.org, count=5, used=2)
        world.orgs[self.org].notices.append("n1")
        for i, p in enumerate(self.people):
            world.people[p] = PersonModel(person_id=p, citizen_id=f"c{i}", name=f"p{i}")
            world.move(world.people[p], self.org)
        return world


URLS = {"quota": "http://quota", "roster": "http://roster", "orgs": "http://orgs"}


async def state_report(api: CannedApi, world: World, monkeypatch: pytest.MonkeyPatch) -> Report:
    monkeypatch.setattr(checker, "get_json", api.get_json)
    report = Report()
    await check_state(world, URLS, report, registered_orgs=list(world.orgs))
    return report


async def test_state_that_agrees_with_the_model_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    api = CannedApi()
    report = await state_report(api, api.world(), monkeypatch)
    assert report.passed, report.render()


async def test_state_that_disagrees_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    api = CannedApi()
    world = api.world()
    # Quota counts a third occupant the model never enrolled, over the approved places; the
    # roster still holds someone the model released; the region is over its limit; a leader
    # post is held twice; an enrolment's compensation has not ended; an org is missing.
    api.answers["quota/occupancy"]["orgs"][0]["categories"]["admin"] = {
        "approved": 10,
        "occupied": 8,
        "reserved": 3,
    }
    api.answers["quota/divisions/130102/establishment"]["categories"][0]["approved"] = 31
    api.answers[f"quota/orgs/{api.org}/establishment"]["leader_posts"][0]["principal_held"] = 2
    api.answers["roster/sagas"] = {
        "sagas": [
            # an enrolment being compensated is still open; a transfer whose step was
            # cancelled has ended
            {"kind": "enrol", "status": "timed_out", "command_id": "c"},
            {"kind": "transfer", "status": "cancelled", "command_id": "d"},
        ]
    }
    world.move(world.people[api.people[1]], None)
    missing = str(uuid.uuid4())
    report = Report()
    monkeypatch.setattr(checker, "get_json", api.get_json)
    await check_state(world, URLS, report, registered_orgs=[*world.orgs, missing])
    assert report.bad["quota_state_mismatches"] == 2, report.render()
    assert report.bad["invariant_occupied_reserved_over_approved"] == 1
    assert report.bad["invariant_region_over_limit"] == 1
    assert report.bad["invariant_leader_posts_over_approved"] == 1
    assert report.bad["leader_post_mismatches"] == 1
    assert report.bad["roster_state_mismatches"] == 1
    assert report.bad["invariant_more_than_one_slot"] == 1
    assert report.bad["check_mismatches"] == 1
    assert report.bad["sagas_open"] == 1
    assert checker.saga_open({"kind": "enrol", "status": "timed_out"})
    assert not checker.saga_open({"kind": "transfer", "status": "cancelled"})
    assert report.bad["orgs_state_mismatches"] == 1
