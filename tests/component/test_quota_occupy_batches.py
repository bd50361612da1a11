"""A fetch of OccupySlot commands prepared at once (``prepare_occupations``): a few statements
serve the whole fetch, and everything it leaves — counts, events, results, history, inbox — is
what the same commands handled one by one leave (SQLite and PostgreSQL).

Each test builds two like worlds (orgs, approvals, notices) in one database, sends the same
commands to one as a fetch and to the other one at a time, and compares the two with their ids
replaced by names.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import select

from contracts.codes import Category, LeaderPost
from contracts.envelope import Envelope, new_id
from contracts.quota import OccupySlot, ReleaseSlot, SetLeaderPosts
from contracts.topics import QUOTA_COMMANDS, QUOTA_EVENTS
from services.quota.adapters.orm import establishment, notices, quota_ledger, slots
from services.runtime.app import ServiceRuntime
from tests.component import test_quota_handlers
from tests.component.test_orgs_handlers import outbox, results
from tests.component.test_quota_handlers import DOC, approve, completed, envelope, org, raw
from tests.component.test_quota_notices import issue
from tests.component.test_quota_slots import CLERK, occupy

# The service and its org projection, as the handler tests build them.
quota = test_quota_handlers.quota
projection = test_quota_handlers.projection

COMPLETED = "bianzhi.CommandCompleted.v1"
REJECTED = "bianzhi.CommandRejected.v1"


@dataclass(frozen=True)
class Occupy:
    """An OccupySlot of org ``org`` (its notice), by names for the person and the request; the
    message id is the request id (as the roster sends it) unless ``message`` names another."""

    org: int
    person: str
    request: str
    message: str | None = None
    leader_post: LeaderPost | None = None


@dataclass(frozen=True)
class Release:
    org: int
    person: str
    request: str


@dataclass
class World:
    """Orgs, each approved ``approved`` places with one notice of ``count`` places; the ids
    of everything in it by name (and names by id)."""

    orgs: list[uuid.UUID]
    notice_nos: list[str]
    ids: dict[str, uuid.UUID] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    def id(self, name: str) -> uuid.UUID:
        if name not in self.ids:
            self.ids[name] = uuid.uuid4()
            self.names[str(self.ids[name])] = name
        return self.ids[name]

    def envelopes(self, steps: list[Occupy | Release]) -> list[Envelope]:
        envs = []
        for i, step in enumerate(steps):
            org_id = self.orgs[step.org]
            person, request = self.id(step.person), self.id(step.request)
            cmd: OccupySlot | ReleaseSlot
            if isinstance(step, Release):
                cmd = ReleaseSlot(
                    request_id=request, person_id=person, org_id=org_id, category=Category.ADMIN
                )
            else:
                cmd = occupy(
                    org_id,
                    self.notice_nos[step.org],
                    person_id=person,
                    request_id=request,
                    leader_post=step.leader_post,
                )
            message = new_id() if isinstance(step, Occupy) and step.message else str(request)
            self.names.setdefault(message, f"message {i}")
            envs.append(envelope(cmd, id=message, **CLERK))
        return envs

    def named(self, value: Any) -> Any:
        """``value`` with every id of this world replaced by its name."""
        if isinstance(value, dict):
            return {k: self.named(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.named(v) for v in value]
        if isinstance(value, str):
            if value in self.names:
                return self.names[value]
            for id_, name in self.names.items():  # ids within a message
                value = value.replace(id_, name)
        return value


async def world(
    quota: ServiceRuntime,
    projection: Any,
    places: list[tuple[int, int]],
    *,
    deputies: int = 0,
) -> World:
    """Orgs approved ``approved`` places with a notice of ``count`` each (``places``), the
    first with ``deputies`` deputy leader posts."""
    w = World([], [])
    for i, (approved, count_) in enumerate(places):
        org_id = await org(projection, name=f"单位{i}")
        await completed(quota, approve(org_id, approved))
        notice = issue(org_id, count_)
        await completed(quota, notice)
        w.orgs.append(org_id)
        w.notice_nos.append(notice.notice_no)
        w.names |= {str(org_id): f"org {i}", notice.notice_no: f"notice {i}"}
    if deputies:
        posts = SetLeaderPosts(org_id=w.orgs[0], principal=0, deputy=deputies, document=DOC)
        await completed(quota, posts)
    return w


async def state(quota: ServiceRuntime, w: World, envs: list[Envelope]) -> dict[str, Any]:
    """What the commands ``envs`` left in ``w``, by names: their results (every one written,
    as type and data), their events, the establishment, notices, slots and history of its
    orgs, and the inbox."""
    sent = {
        e.id: e
        for e in (Envelope.from_bytes(r.value) for r in await outbox(quota, topic=QUOTA_EVENTS))
    }
    found: dict[str, Any] = {"results": [], "events": []}
    for i, env in enumerate(envs):
        answers = await results(quota, env.id)
        for res in answers:
            for j, event_id in enumerate(res.data.get("events", [])):
                w.names.setdefault(event_id, f"event {i}.{j}")
        found["results"].append([(res.type, w.named(res.data)) for res in answers])
        completed_with = answers[0].data.get("events", []) if answers else []
        found["events"].append(
            [w.named([sent[e].type, sent[e].data, sent[e].subject]) for e in completed_with]
        )
    orgs = [str(o) for o in w.orgs]
    ledger = quota_ledger
    inbox = quota.definition.tables.inbox
    async with quota.sessions() as session:
        found["establishment"] = sorted(
            w.named([r.org_id, r.approved, r.occupied, r.reserved])
            for r in await session.execute(
                select(establishment).where(establishment.c.org_id.in_(orgs))
            )
        )
        found["notices"] = sorted(
            w.named([r.notice_no, r.used, r.status])
            for r in await session.execute(
                select(notices).where(notices.c.notice_no.in_(w.notice_nos))
            )
        )
        found["slots"] = sorted(
            w.named([r.person_id, r.org_id, r.notice_no, r.request_id, r.leader_post])
            for r in await session.execute(select(slots).where(slots.c.org_id.in_(orgs)))
        )
        found["history"] = [
            w.named([r.event_type, r.command_id, r.event_id, r.org_id, r.before, r.after])
            for r in await session.execute(
                select(ledger)
                .where(ledger.c.command_id.in_([e.id for e in envs]))
                .order_by(ledger.c.seq)
            )
        ]
        found["inbox"] = sorted(
            w.named(r.message_id)
            for r in await session.execute(
                select(inbox.c.message_id).where(inbox.c.message_id.in_([e.id for e in envs]))
            )
        )
    return found


async def batch_and_singles(
    quota: ServiceRuntime,
    projection: Any,
    places: list[tuple[int, int]],
    steps: list[Occupy | Release],
    *,
    before: tuple[Occupy, ...] = (),
    deputies: int = 0,
    times: int = 1,
) -> tuple[dict[str, Any], list[str]]:
    """``steps`` as one fetch (``times`` over) in one world and one by one in another, after
    ``before`` one by one in both; what the fetch left (asserted to be what one by one left)
    and the statements the fetches ran (their first three words)."""
    batched = await world(quota, projection, places, deputies=deputies)
    alone = await world(quota, projection, places, deputies=deputies)
    for w in (batched, alone):
        for env in w.envelopes(list(before)):
            await quota.command_consumer.process(raw(QUOTA_COMMANDS, env))
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()[:3]))

    fetch = batched.envelopes(steps)
    engine = quota.engine.sync_engine
    sa_event.listen(engine, "before_cursor_execute", count)
    try:
        for _ in range(times):
            await quota.command_consumer.process_batch([raw(QUOTA_COMMANDS, e) for e in fetch])
    finally:
        sa_event.remove(engine, "before_cursor_execute", count)
    one_by_one = alone.envelopes(steps)
    for _ in range(times):
        for env in one_by_one:
            await quota.command_consumer.process(raw(QUOTA_COMMANDS, env))
    found = await state(quota, batched, fetch)
    assert found == await state(quota, alone, one_by_one)
    return found, statements


def outcomes(found: dict[str, Any]) -> list[tuple[str, str | None]]:
    """The first result of each command: its type and code."""
    return [(res[0][0], res[0][1].get("code")) for res in found["results"]]


def occupied(found: dict[str, Any]) -> list[int | None]:
    """The ``occupied`` of each command's first event (``None`` when it has none)."""
    return [events[0][1].get("occupied") if events else None for events in found["events"]]


async def test_a_fetch_over_two_orgs_and_two_notices_takes_a_few_statements(
    quota, projection
) -> None:
    steps: list[Occupy | Release] = [
        Occupy(0, "p1", "r1"),
        Occupy(1, "p2", "r2"),
        Occupy(0, "p3", "r3"),
        Occupy(0, "p4", "r4", leader_post=LeaderPost.DEPUTY),
        Occupy(1, "p5", "r5"),
        Occupy(0, "p6", "r6"),
        Occupy(1, "p7", "r7"),
    ]
    found, statements = await batch_and_singles(
        quota,
        projection,
        [(10, 6), (8, 5)],
        steps,
        before=(Occupy(0, "p0", "r0"), Occupy(1, "q0", "s0")),
        deputies=1,
    )
    assert outcomes(found) == [(COMPLETED, None)] * 7
    assert occupied(found) == [2, 2, 3, 4, 3, 5, 4]
    assert found["establishment"] == [["org 0", 10, 5, 1], ["org 1", 8, 4, 1]]
    assert found["notices"] == [["notice 0", 5, "issued"], ["notice 1", 4, "issued"]]
    # One statement claims the requests, one takes the places of both notices, one records
    # the slots and one occupies the places of both orgs (one by one: one each per command).
    assert statements.count("INSERT INTO slot_requests") == 1
    assert statements.count("INSERT INTO slots") == 1
    assert statements.count("UPDATE notices SET") == 1
    assert statements.count("UPDATE establishment SET") == 1
    assert statements.count("UPDATE leader_posts SET") == 1


async def test_a_notice_running_out_midway_refuses_as_one_by_one(quota, projection) -> None:
    steps: list[Occupy | Release] = [
        Occupy(0, "p1", "r1"),
        Occupy(1, "p2", "r2"),
        Occupy(0, "p3", "r3"),
        Occupy(0, "p4", "r4"),
        Occupy(1, "p5", "r5"),
        Occupy(0, "p6", "r6"),
        Occupy(0, "p7", "r7"),
    ]
    found, _ = await batch_and_singles(
        quota, projection, [(10, 4), (10, 5)], steps, before=(Occupy(0, "p0", "r0"),)
    )
    assert outcomes(found) == [
        (COMPLETED, None),
        (COMPLETED, None),
        (COMPLETED, None),
        (COMPLETED, None),
        (COMPLETED, None),
        (REJECTED, "notice_exhausted"),
        (REJECTED, "notice_exhausted"),
    ]
    assert occupied(found) == [2, 1, 3, 4, 2, None, None]
    assert found["establishment"] == [["org 0", 10, 4, 0], ["org 1", 10, 2, 3]]


async def test_a_request_id_or_a_person_twice_in_a_fetch_is_refused_as_one_by_one(
    quota, projection
) -> None:
    steps: list[Occupy | Release] = [
        Occupy(0, "p1", "r1"),
        Occupy(1, "p2", "r2"),
        Occupy(0, "p3", "r1", message="again"),  # the same request under another message id
        Occupy(1, "p1", "r4"),  # the same person
        Occupy(0, "p5", "r5"),
    ]
    found, _ = await batch_and_singles(quota, projection, [(5, 5), (5, 5)], steps)
    assert outcomes(found) == [
        (COMPLETED, None),
        (COMPLETED, None),
        (REJECTED, "conflict"),
        (REJECTED, "already_enrolled"),
        (COMPLETED, None),
    ]
    conflict = found["results"][2][0][1]["details"]
    assert (conflict["first_command_id"], conflict["event_id"]) == ("r1", "event 0.0")
    assert occupied(found) == [1, 1, None, None, 2]
    assert found["slots"] == [
        ["p1", "org 0", "notice 0", "r1", None],
        ["p2", "org 1", "notice 1", "r2", None],
        ["p5", "org 0", "notice 0", "r5", None],
    ]


async def test_a_redelivered_fetch_counts_once(quota, projection) -> None:
    steps: list[Occupy | Release] = [
        Occupy(0, "p1", "r1"),
        Occupy(1, "p2", "r2"),
        Occupy(0, "p3", "r3"),
        Occupy(1, "p4", "r4"),
    ]
    found, statements = await batch_and_singles(quota, projection, [(5, 3), (5, 3)], steps, times=2)
    assert [len(res) for res in found["results"]] == [2, 2, 2, 2]
    assert all(first == again for first, again in found["results"])  # the stored result again
    assert outcomes(found) == [(COMPLETED, None)] * 4
    assert occupied(found) == [1, 1, 2, 2]
    assert found["establishment"] == [["org 0", 5, 2, 1], ["org 1", 5, 2, 1]]
    assert len(found["history"]) == 4 and found["inbox"] == ["r1", "r2", "r3", "r4"]
    assert statements.count("INSERT INTO slot_requests") == 1  # the second time, none


async def test_a_fetch_with_another_command_between_occupations_prepares_each_run(
    quota, projection
) -> None:
    """A release between occupations of the same org: the occupations before it and those
    after it are prepared apart, just before their handlers, so the counts the later ones
    report take the release into account."""
    steps: list[Occupy | Release] = [
        Occupy(0, "p1", "r1"),
        Occupy(0, "p2", "r2"),
        Release(0, "p1", "r3"),
        Occupy(0, "p4", "r4"),
        Occupy(1, "p5", "r5"),
        Occupy(0, "p6", "r6"),
    ]
    found, statements = await batch_and_singles(quota, projection, [(10, 6), (10, 6)], steps)
    assert outcomes(found) == [(COMPLETED, None)] * 6
    assert occupied(found) == [1, 2, 1, 2, 1, 3]
    assert found["establishment"] == [["org 0", 10, 3, 2], ["org 1", 10, 1, 5]]
    # A claim per run of occupations, and the release's own; the places of each run's
    # notices taken in one statement (the second run's two notices too).
    assert statements.count("INSERT INTO slot_requests") == 3
    assert statements.count("UPDATE notices SET") == 2


async def test_places_prepared_that_no_handler_asked_for_are_never_committed(
    quota: ServiceRuntime, projection: Any
) -> None:
    w = await world(quota, projection, [(10, 4)])
    async with quota.uow() as uow:
        assert await uow.notices.use_many(
            [(w.notice_nos[0], w.orgs[0], Category.ADMIN, 2)], date.today()
        ) == {w.notice_nos[0]}
        with pytest.raises(RuntimeError, match="never asked for"):
            await uow.commit()
    async with quota.sessions() as session:
        used = (
            await session.execute(
                select(notices.c.used).where(notices.c.notice_no == w.notice_nos[0])
            )
        ).scalar_one()
    assert used == 0
