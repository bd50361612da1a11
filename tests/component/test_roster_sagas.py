"""The roster and quota services without Kafka, wired by hand: what the roster writes to its
outbox for quota is fed to quota's command consumer, quota's answers to the roster's answers
consumer, as the broker would carry them (SQLite and PostgreSQL).
"""

from __future__ import annotations

import base64
import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidTag
from prometheus_client import REGISTRY
from sqlalchemy import event as sa_event
from sqlalchemy import func, select

from contracts.base import Message
from contracts.codes import Category, EntryMethod, OrgKind, ReleaseReason
from contracts.common import Document
from contracts.envelope import CONTENT_TYPE, Envelope
from contracts.identifiers import compose_citizen_id, mask_citizen_id
from contracts.orgs import OrgAbolished, OrgRegistered
from contracts.quota import ApproveQuota, IssueQuotaUseNotice, SetLeaderPosts
from contracts.roster import EnrolPerson, ReleasePerson, TransferPerson, UpdatePerson
from contracts.topics import (
    COMMAND_RESULTS,
    ORGS_EVENTS,
    QUOTA_COMMANDS,
    ROSTER_ANSWERS,
    ROSTER_COMMANDS,
    ROSTER_EVENTS,
)
from services.quota.adapters.orm import establishment, notices
from services.quota.bootstrap import build as build_quota
from services.roster.adapters.orm import people, sagas
from services.roster.bootstrap import build as build_roster
from services.roster.domain.model import Status
from services.roster.domain.personal_data import PersonalDataCipher
from services.roster.service_layer import handlers
from services.roster.service_layer import saga as saga_layer
from services.runtime.app import ServiceRuntime
from services.runtime.events import EventConsumer
from services.runtime.messaging import RawMessage, event_routes
from tests.component.test_orgs_handlers import DeadLetters
from tests.conftest import service_settings
from tests.support.databases import database
from tests.support.sql import commits

APPROVER = {"actorid": "li.na", "actorregion": "130000", "actorroles": "approver"}
CLERK = {"actorid": "wang.fang", "actorregion": "130100", "actorroles": "clerk"}
DOC = Document(title="关于核定编制的批复", number="冀编〔2026〕7号", date=date(2026, 2, 1))
FAR = date(2099, 12, 31)
COMPLETED = "bianzhi.CommandCompleted.v1"
REJECTED = "bianzhi.CommandRejected.v1"

_offsets = itertools.count()
_people = itertools.count(1)


def citizen(area: str = "130102") -> str:
    n = next(_people)
    return compose_citizen_id(area, date(1980, 1, 1) + timedelta(days=37 * n), n % 1000)


def raw(topic: str, env: Envelope) -> RawMessage:
    return RawMessage(
        topic=topic,
        partition=0,
        offset=next(_offsets),
        key=(env.subject or env.id).encode(),
        value=env.to_bytes(),
        headers=(("content-type", CONTENT_TYPE.encode()),),
    )


def unreadable_record(topic: str, value: bytes) -> RawMessage:
    return RawMessage(
        topic=topic, partition=0, offset=next(_offsets), key=None, value=value, headers=()
    )


def consumer(rt: ServiceRuntime, topic: str) -> EventConsumer:
    (sub,) = [s for s in rt.definition.event_subscriptions if s.topic == topic]
    return EventConsumer(
        routes=event_routes(sub.routes),
        prepare=sub.prepare,
        service=rt.name,
        consumer=f"{rt.name}<-{topic}",
        uow_factory=rt.uow,
        dead_letter=DeadLetters(),
    )


class Platform:
    """Quota and roster, and the hand that carries messages between them."""

    def __init__(self, quota: ServiceRuntime, roster: ServiceRuntime) -> None:
        self.quota = quota
        self.roster = roster
        self.quota_orgs = consumer(quota, ORGS_EVENTS)
        self.roster_orgs = consumer(roster, ORGS_EVENTS)
        self.roster_answers = consumer(roster, ROSTER_ANSWERS)
        self.carried: dict[str, set[int]] = {"quota": set(), "roster": set()}

    async def org(
        self, kind: OrgKind = OrgKind.ORGAN, division_code: str = "130102", *, approved: int = 5
    ) -> uuid.UUID:
        org_id = uuid.uuid4()
        event = OrgRegistered(
            org_id=org_id,
            name="石家庄市长安区财政局",
            kind=kind,
            division_code=division_code,
            document=DOC,
            effective_date=DOC.date,
        )
        env = event.envelope(source="/orgs", **APPROVER)
        await self.quota_orgs.process(raw(ORGS_EVENTS, env))
        await self.roster_orgs.process(raw(ORGS_EVENTS, env))
        category = Category.ADMIN if kind is OrgKind.ORGAN else Category.INSTITUTIONAL
        if approved:
            await self.quota_command(
                ApproveQuota(
                    org_id=org_id,
                    category=category,
                    approved=approved,
                    document=DOC,
                    effective_date=DOC.date,
                )
            )
        return org_id

    async def notice(self, org_id: uuid.UUID, count: int, category: str = "admin") -> str:
        cmd = IssueQuotaUseNotice(
            notice_no=f"冀编用〔2026〕{uuid.uuid4().hex[:8]}号",
            org_id=org_id,
            category=Category(category),
            count=count,
            valid_until=FAR,
            document=DOC,
        )
        await self.quota_command(cmd)
        return cmd.notice_no

    async def quota_command(self, payload: Message) -> None:
        env = payload.envelope(source="/tests", **APPROVER)
        await self.quota.command_consumer.process(raw(QUOTA_COMMANDS, env))
        res = await self.result(self.quota, env.id)
        assert res.type == COMPLETED, res.data
        # A front end's command is answered on the results topic only, not on the roster's answers.
        assert not await self._uncarried(self.quota, ROSTER_ANSWERS)

    async def send(self, payload: Message, *, pump: bool = True, **actor: Any) -> Envelope:
        env = payload.envelope(source="/tests", **{**CLERK, **actor})
        await self.roster.command_consumer.process(raw(ROSTER_COMMANDS, env))
        if pump:
            await self.pump()
        return env

    async def pump(self) -> int:
        """Carry roster → quota commands and quota → roster results until nothing moves."""
        moved = 0
        while True:
            step = 0
            for row in await self._uncarried(self.roster, QUOTA_COMMANDS):
                await self.quota.command_consumer.process(
                    raw(QUOTA_COMMANDS, Envelope.from_bytes(row.value))
                )
                step += 1
            for row in await self._uncarried(self.quota, ROSTER_ANSWERS):
                await self.roster_answers.process(
                    raw(ROSTER_ANSWERS, Envelope.from_bytes(row.value))
                )
                step += 1
            if not step:
                return moved
            moved += step

    async def answered(self) -> list[RawMessage]:
        """The roster's steps carried to quota and handled there: quota's answers to them, not
        yet carried back."""
        for row in await self._uncarried(self.roster, QUOTA_COMMANDS):
            await self.quota.command_consumer.process(
                raw(QUOTA_COMMANDS, Envelope.from_bytes(row.value))
            )
        return [
            raw(ROSTER_ANSWERS, Envelope.from_bytes(row.value))
            for row in await self._uncarried(self.quota, ROSTER_ANSWERS)
        ]

    async def _uncarried(self, rt: ServiceRuntime, topic: str) -> list[Any]:
        table = rt.definition.tables.outbox
        async with rt.sessions() as session:
            rows = (
                await session.execute(
                    select(table).where(table.c.topic == topic).order_by(table.c.seq)
                )
            ).all()
        done = self.carried[rt.name]
        fresh = [r for r in rows if r.seq not in done]
        done.update(r.seq for r in fresh)
        return fresh

    async def _rows(self, rt: ServiceRuntime, topic: str | None = None) -> list[Any]:
        table = rt.definition.tables.outbox
        query = select(table).order_by(table.c.seq)
        if topic is not None:
            query = query.where(table.c.topic == topic)
        async with rt.sessions() as session:
            return list((await session.execute(query)).all())

    async def result(self, rt: ServiceRuntime, command_id: str) -> Envelope:
        found = await self.outbox(rt, COMMAND_RESULTS, key=command_id)
        assert len(found) == 1, found
        return found[0]

    async def results(self, rt: ServiceRuntime, command_id: str) -> list[Envelope]:
        return await self.outbox(rt, COMMAND_RESULTS, key=command_id)

    async def outbox(self, rt: ServiceRuntime, topic: str, **where: str) -> list[Envelope]:
        table = rt.definition.tables.outbox
        query = select(table).where(table.c.topic == topic).order_by(table.c.seq)
        for column, value in where.items():
            query = query.where(table.c[column] == value)
        async with rt.sessions() as session:
            return [Envelope.from_bytes(r.value) for r in (await session.execute(query)).all()]

    async def events(self, type_: str) -> list[Envelope]:
        found = await self.outbox(self.roster, ROSTER_EVENTS)
        return [e for e in found if e.type == f"bianzhi.roster.{type_}.v1"]

    async def counts(self, org_id: uuid.UUID, category: str = "admin") -> tuple[int, int, int]:
        async with self.quota.sessions() as session:
            row = (
                await session.execute(
                    select(
                        establishment.c.approved,
                        establishment.c.occupied,
                        establishment.c.reserved,
                    ).where(
                        establishment.c.org_id == str(org_id), establishment.c.category == category
                    )
                )
            ).one()
        return int(row.approved), int(row.occupied), int(row.reserved)

    async def person(self, person_id: str) -> Any:
        async with self.roster.sessions() as session:
            return (
                await session.execute(select(people).where(people.c.person_id == person_id))
            ).one()

    async def get(self, path: str, status: int = 200) -> Any:
        transport = httpx.ASGITransport(app=self.roster.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://roster") as client:
            response = await client.get(path)
        assert response.status_code == status, response.text
        return response.json()


@pytest.fixture
async def platform(
    db_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Platform]:
    async with (
        database(db_backend, tmp_path, "quota") as quota_url,
        database(db_backend, tmp_path, "roster") as roster_url,
    ):
        monkeypatch.setenv("BIANZHI_QUOTA_DATABASE_URL", quota_url)
        monkeypatch.setenv("BIANZHI_ROSTER_DATABASE_URL", roster_url)
        monkeypatch.setenv(
            "BIANZHI_ROSTER_PERSONAL_DATA_KEY", "ZJf0X1H4l8b3z0uJ6Q8p0Q2n4d6f8h0j2l4n6p8r0t0="
        )
        settings = service_settings(tmp_path, "localhost:1")
        quota = build_quota(settings)
        roster = build_roster(settings)
        for rt in (quota, roster):
            rt.command_consumer.dead_letter = DeadLetters()
            await rt.migrate()
        try:
            yield Platform(quota, roster)
        finally:
            for rt in (quota, roster):
                await rt.engine.dispose()
                await rt.read_engine.dispose()


def enrol(
    citizen_id: str, org_id: uuid.UUID, notice_no: str, *, category: str = "admin", **kw: Any
) -> EnrolPerson:
    fields: dict[str, Any] = {
        "citizen_id": citizen_id,
        "name": "张伟",
        "org_id": org_id,
        "category": Category(category),
        "notice_no": notice_no,
        "entry_method": EntryMethod.EXAM,
        "effective_date": date(2026, 3, 1),
        "phone": "13800138000",
    }
    fields.update(kw)
    return EnrolPerson.model_validate(fields)


# --- enrolment ----------------------------------------------------------------------------


async def test_enrolment_occupies_a_notice_place_and_completes_when_quota_agrees(
    platform: Platform,
) -> None:
    org_id = await platform.org()
    notice_no = await platform.notice(org_id, 2)
    number = citizen()
    cmd = await platform.send(enrol(number, org_id, notice_no), pump=False)
    # Before quota has answered, the command has no result yet and the person is enrolling.
    assert await platform.results(platform.roster, cmd.id) == []
    assert await platform.pump() == 2
    res = await platform.result(platform.roster, cmd.id)
    assert res.type == COMPLETED, res.data
    (event,) = await platform.events("PersonEnrolled")
    assert res.data["events"] == [event.id]
    person_id = event.data["person_id"]
    assert res.data["subject"] == person_id
    assert event.data["citizen_id_masked"] == mask_citizen_id(number)
    assert event.correlationid == cmd.id and event.actorid == CLERK["actorid"]
    assert await platform.counts(org_id) == (5, 1, 1)
    row = await platform.person(person_id)
    assert (row.status, row.enrolled_on) == ("active", date(2026, 3, 1))
    # The number is stored only encrypted and as a keyed hash.
    assert number.encode() not in row.citizen_enc and number not in row.citizen_index
    assert b"13800138000" not in row.phone_enc
    body = await platform.get(f"/orgs/{org_id}/people")
    assert [(p["person_id"], p["citizen_id_masked"]) for p in body["people"]] == [
        (person_id, mask_citizen_id(number))
    ]
    detail = await platform.get(f"/people/{person_id}")
    assert [h["event_type"] for h in detail["history"]] == [event.type]
    assert number not in str(detail) and number not in str(body)


async def test_a_person_holds_one_slot_even_while_the_first_enrolment_is_pending(
    platform: Platform,
) -> None:
    org_id = await platform.org()
    other = await platform.org()
    notice_no = await platform.notice(org_id, 2)
    other_notice = await platform.notice(other, 1)
    number = citizen()
    first = await platform.send(enrol(number, org_id, notice_no), pump=False)
    second = await platform.send(enrol(number, other, other_notice), pump=False)
    rej = await platform.result(platform.roster, second.id)
    assert (rej.type, rej.data["code"]) == (REJECTED, "already_enrolled")
    await platform.pump()
    assert (await platform.result(platform.roster, first.id)).type == COMPLETED
    third = await platform.send(enrol(number, other, other_notice))
    assert (await platform.result(platform.roster, third.id)).data["code"] == "already_enrolled"
    assert await platform.counts(other) == (5, 0, 1)


async def test_quota_refusals_reach_the_front_end_and_leave_no_one_enrolled(
    platform: Platform,
) -> None:
    org_id = await platform.org(approved=1)
    notice_no = await platform.notice(org_id, 1)
    ok = await platform.send(enrol(citizen(), org_id, notice_no))
    assert (await platform.result(platform.roster, ok.id)).type == COMPLETED
    number = citizen()
    exhausted = await platform.send(enrol(number, org_id, notice_no))
    res = await platform.result(platform.roster, exhausted.id)
    assert (res.type, res.data["code"]) == (REJECTED, "notice_exhausted")
    assert res.data["command_type"] == EnrolPerson.TYPE
    wrong = await platform.send(enrol(number, org_id, "no-such-notice"))
    assert (await platform.result(platform.roster, wrong.id)).data["code"] == "notice_invalid"
    assert await platform.counts(org_id) == (1, 1, 0)
    assert await platform.events("PersonEnrolled") != []
    assert len(await platform.events("PersonEnrolled")) == 1
    # The refused person may be enrolled later, keeping their person id.
    more = await platform.org()
    later = await platform.send(enrol(number, more, await platform.notice(more, 1)))
    assert (await platform.result(platform.roster, later.id)).type == COMPLETED


async def test_early_refusals_need_no_quota_round_trip(platform: Platform) -> None:
    institution = await platform.org(OrgKind.PUBLIC_INSTITUTION, approved=0)
    notice_no = "冀编用〔2026〕1号"
    cmd = await platform.send(enrol(citizen(), institution, notice_no), pump=False)
    res = await platform.result(platform.roster, cmd.id)
    assert res.data["code"] == "category_not_allowed"
    outside = await platform.org(division_code="130203")  # 唐山, outside the clerk's 130100
    cmd = await platform.send(enrol(citizen(), outside, notice_no), pump=False)
    assert (await platform.result(platform.roster, cmd.id)).data["code"] == "forbidden"
    closed = await platform.org()
    env = OrgAbolished(org_id=closed, document=DOC, effective_date=DOC.date).envelope(
        source="/orgs", **APPROVER
    )
    await platform.roster_orgs.process(raw(ORGS_EVENTS, env))
    refused = citizen()
    cmd = await platform.send(enrol(refused, closed, notice_no), pump=False)
    assert (await platform.result(platform.roster, cmd.id)).data["code"] == "org_not_active"
    assert await platform.outbox(platform.roster, QUOTA_COMMANDS) == []
    # A refused person's row, written before the org was checked, went with the refusal.
    async with platform.roster.sessions() as session:
        assert (await session.execute(select(func.count()).select_from(people))).scalar() == 0
    # A person already on the roster meets the same checks first.
    open_org = await platform.org()
    first = await platform.send(enrol(refused, open_org, await platform.notice(open_org, 1)))
    assert (await platform.result(platform.roster, first.id)).type == COMPLETED
    cmd = await platform.send(enrol(refused, outside, notice_no), pump=False)
    assert (await platform.result(platform.roster, cmd.id)).data["code"] == "forbidden"
    cmd = await platform.send(enrol(refused, open_org, notice_no), pump=False)
    assert (await platform.result(platform.roster, cmd.id)).data["code"] == "already_enrolled"


async def test_a_fetch_of_commands_and_of_answers_is_applied_together_and_only_once(
    platform: Platform,
) -> None:
    org_id = await platform.org()
    other = await platform.org()
    notice_no = await platform.notice(org_id, 3)
    numbers = [citizen(), citizen()]
    cmds = [
        enrol(numbers[0], org_id, notice_no).envelope(source="/tests", **CLERK),
        # the same person again in the same fetch: refused, and the fetch is handled one by one
        enrol(numbers[0], other, await platform.notice(other, 1)).envelope(
            source="/tests", **CLERK
        ),
        enrol(numbers[1], org_id, notice_no).envelope(source="/tests", **CLERK),
    ]
    await platform.roster.command_consumer.process_batch(
        [raw(ROSTER_COMMANDS, env) for env in cmds]
    )
    refused = await platform.result(platform.roster, cmds[1].id)
    assert (refused.type, refused.data["code"]) == (REJECTED, "already_enrolled")
    async with platform.roster.sessions() as session:
        started = (await session.execute(select(sagas.c.command_id))).scalars().all()
    assert sorted(started) == sorted([cmds[0].id, cmds[2].id])  # the refused one left none
    steps = await platform._uncarried(platform.roster, QUOTA_COMMANDS)
    assert len(steps) == 2
    for row in steps:
        await platform.quota.command_consumer.process(
            raw(QUOTA_COMMANDS, Envelope.from_bytes(row.value))
        )
    answers = [
        raw(ROSTER_ANSWERS, Envelope.from_bytes(row.value))
        for row in await platform._uncarried(platform.quota, ROSTER_ANSWERS)
    ]
    # Quota's answers in one fetch, then again (redelivered): each saga ends once.
    await platform.roster_answers.process_batch(answers)
    await platform.roster_answers.process_batch(answers)
    for cmd in (cmds[0], cmds[2]):
        res = await platform.result(platform.roster, cmd.id)
        assert res.type == COMPLETED, res.data
        row = await platform.person(res.data["subject"])
        assert (row.status, row.enrolled_on) == ("active", date(2026, 3, 1))
        assert [
            h["event_type"] for h in (await platform.get(f"/people/{row.person_id}"))["history"]
        ] == ["bianzhi.roster.PersonEnrolled.v1"]
    assert len(await platform.events("PersonEnrolled")) == 2
    assert await platform.counts(org_id) == (5, 2, 1)
    async with platform.roster.sessions() as session:
        ended = (await session.execute(select(sagas.c.status))).scalars().all()
        audit = platform.roster.definition.tables.audit
        audited = (await session.execute(select(audit.c.message_id))).scalars().all()
    assert ended == ["completed", "completed"]
    assert sorted(audited) == sorted(c.id for c in cmds)  # each command audited once


async def _answered_steps(
    platform: Platform, org_id: uuid.UUID, notice_no: str, n: int
) -> tuple[list[Envelope], list[RawMessage]]:
    """``n`` enrolments sent, their steps carried to quota and answered there: the commands,
    and quota's answers not yet carried back."""
    cmds = [await platform.send(enrol(citizen(), org_id, notice_no), pump=False) for _ in range(n)]
    answers = await platform.answered()
    assert len(answers) == n
    return cmds, answers


def fetch_transactions(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "bianzhi_fetch_transactions_total", {"service": "roster", "outcome": outcome}
    )
    return value or 0.0


async def test_a_fetch_of_commands_and_answers_is_handled_in_one_transaction(
    platform: Platform,
) -> None:
    """The roster's commands and quota's answers come in the same fetches: one transaction,
    one commit, for both."""
    org_id = await platform.org()
    notice_no = await platform.notice(org_id, 5)
    first, answers = await _answered_steps(platform, org_id, notice_no, 2)
    later = enrol(citizen(), org_id, notice_no).envelope(source="/tests", **CLERK)
    fetch = [raw(ROSTER_COMMANDS, later), *answers]
    together = fetch_transactions("together")
    with commits(platform.roster.engine) as committed:
        await platform.roster._consume(fetch)
    assert len(committed) == 1
    assert fetch_transactions("together") == together + 1
    for cmd in first:  # the answers ended their sagas
        res = await platform.result(platform.roster, cmd.id)
        assert res.type == COMPLETED, res.data
        assert (await platform.person(res.data["subject"])).status == "active"
    async with platform.roster.sessions() as session:
        status = dict((await session.execute(select(sagas.c.command_id, sagas.c.status))).all())
    assert status == {first[0].id: "completed", first[1].id: "completed", later.id: "waiting"}
    # Delivered again, the same fetch changes nothing.
    before = await platform._rows(platform.roster)
    await platform.roster._consume(fetch)
    assert await platform._rows(platform.roster) == before
    assert await platform.pump() == 2  # later's step and answer
    assert (await platform.result(platform.roster, later.id)).type == COMPLETED
    assert await platform.counts(org_id) == (5, 3, 2)
    assert len(await platform.events("PersonEnrolled")) == 3


async def test_a_fetch_that_cannot_be_one_transaction_is_handled_topic_by_topic(
    platform: Platform,
) -> None:
    """A command refused mid-batch fails the fetch's transaction: nothing of it stays, and
    each topic's records are handled as without it; a record that cannot be read is
    dead-lettered once."""
    dead = DeadLetters()
    platform.roster.command_consumer.dead_letter = dead
    org_id = await platform.org()
    notice_no = await platform.notice(org_id, 5)
    first, answers = await _answered_steps(platform, org_id, notice_no, 2)
    holder = citizen()
    await platform.send(enrol(holder, org_id, notice_no))
    again = enrol(holder, org_id, notice_no).envelope(source="/tests", **CLERK)
    fresh = enrol(citizen(), org_id, notice_no).envelope(source="/tests", **CLERK)
    unreadable = unreadable_record(ROSTER_COMMANDS, b"{not json")
    apart = fetch_transactions("apart")
    await platform.roster._consume(
        [raw(ROSTER_COMMANDS, again), unreadable, raw(ROSTER_COMMANDS, fresh), *answers]
    )
    assert fetch_transactions("apart") == apart + 1
    assert [topic for topic, *_ in dead.sent] == [f"{ROSTER_COMMANDS}.dlq"]
    refused = await platform.result(platform.roster, again.id)
    assert (refused.type, refused.data["code"]) == (REJECTED, "already_enrolled")
    for cmd in first:
        assert len(await platform.results(platform.roster, cmd.id)) == 1
        assert (await platform.result(platform.roster, cmd.id)).type == COMPLETED
    assert await platform.pump() == 2  # fresh's step and answer
    assert (await platform.result(platform.roster, fresh.id)).type == COMPLETED
    assert await platform.counts(org_id) == (5, 4, 1)
    async with platform.roster.sessions() as session:
        audit = platform.roster.definition.tables.audit
        audited = (await session.execute(select(audit.c.message_id))).scalars().all()
    assert sorted(
        a for a in audited if a in {again.id, fresh.id, *(c.id for c in first)}
    ) == sorted([again.id, fresh.id, *(c.id for c in first)])  # each command audited once
    assert len(await platform.events("PersonEnrolled")) == 4


async def test_a_fetch_of_enrolments_adds_its_new_people_in_one_statement(
    platform: Platform,
) -> None:
    org_id = await platform.org()
    first = await platform.notice(org_id, 1)
    assert (
        await platform.result(
            platform.roster, (await platform.send(enrol(citizen(), org_id, first))).id
        )
    ).type == COMPLETED
    number = citizen()
    refused = await platform.send(enrol(number, org_id, first))
    res = await platform.result(platform.roster, refused.id)
    assert res.data["code"] == "notice_exhausted"
    async with platform.roster.sessions() as session:
        before = (await session.execute(select(people.c.person_id, people.c.status))).all()
    (refused_person,) = [p for p, status in before if status == "failed"]
    notice_no = await platform.notice(org_id, 4)
    # Three new people and one enrolled again (their number is on the roster already).
    cmds = [
        enrol(n, org_id, notice_no).envelope(source="/tests", **CLERK)
        for n in (citizen(), citizen(), number, citizen())
    ]
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()[:3]))

    engine = platform.roster.engine.sync_engine
    sa_event.listen(engine, "before_cursor_execute", count)
    try:
        await platform.roster.command_consumer.process_batch(
            [raw(ROSTER_COMMANDS, env) for env in cmds]
        )
    finally:
        sa_event.remove(engine, "before_cursor_execute", count)
    assert statements.count("INSERT INTO people") == 1
    await platform.pump()
    subjects = []
    for cmd in cmds:
        res = await platform.result(platform.roster, cmd.id)
        assert res.type == COMPLETED, res.data
        subjects.append(res.data["subject"])
        assert (await platform.person(res.data["subject"])).status == "active"
    assert subjects[2] == refused_person  # enrolled again under the person id they had
    assert len(set(subjects)) == 4
    assert await platform.counts(org_id) == (5, 5, 0)


async def test_a_fetch_of_answers_ends_its_sagas_in_a_few_statements_as_one_by_one_would(
    platform: Platform,
) -> None:
    org_id = await platform.org()
    notice_no = await platform.notice(org_id, 4)
    # One enrolment times out before quota sees it: its answer comes late, with the answer to
    # its compensation, in the same fetch as the others.
    late = await platform.send(enrol(citizen(), org_id, notice_no), pump=False)
    assert (
        await saga_layer.sweep_once(platform.roster.uow, at=datetime.now(UTC) + timedelta(1)) == 1
    )
    march, april = date(2026, 3, 1), date(2026, 4, 1)
    on = [march, april, march, april, march]  # the fifth finds the notice used up
    cmds = [
        await platform.send(enrol(citizen(), org_id, notice_no, effective_date=d), pump=False)
        for d in on
    ]
    answers = await platform.answered()
    assert len(answers) == 7  # the late occupation, its release, five answers
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()[:2]))

    engine = platform.roster.engine.sync_engine
    sa_event.listen(engine, "before_cursor_execute", count)
    try:
        await platform.roster_answers.process_batch(answers)
    finally:
        sa_event.remove(engine, "before_cursor_execute", count)
    # Two statements end the waiting sagas (completed, rejected), one per effective date
    # activates the people; the compensation and the refusal take one each, as alone.
    assert statements.count("UPDATE sagas") == 3
    assert statements.count("UPDATE people") == 3
    for cmd, d in zip(cmds[:4], on, strict=False):
        res = await platform.result(platform.roster, cmd.id)
        assert res.type == COMPLETED, res.data
        row = await platform.person(res.data["subject"])
        assert (row.status, row.enrolled_on) == ("active", d)
    refused = await platform.result(platform.roster, cmds[4].id)
    assert (refused.type, refused.data["code"]) == (REJECTED, "notice_exhausted")
    async with platform.roster.sessions() as session:
        refused_person = (
            await session.execute(select(sagas.c.person_id).where(sagas.c.command_id == cmds[4].id))
        ).scalar_one()
    assert (await platform.person(refused_person)).status == "failed"
    assert (await platform.result(platform.roster, late.id)).data["code"] == "timeout"
    assert len(await platform.events("PersonEnrolled")) == 4
    assert await platform.counts(org_id) == (5, 4, 0)
    async with platform.roster.sessions() as session:
        ended = (await session.execute(select(sagas.c.command_id, sagas.c.status))).all()
    assert dict(ended) == {
        late.id: "compensated",
        **{c.id: "completed" for c in cmds[:4]},
        cmds[4].id: "rejected",
    }


# --- transfer, release, update --------------------------------------------------------------


async def test_transfer_moves_the_slot_and_release_frees_it(platform: Platform) -> None:
    source = await platform.org()
    target = await platform.org()
    number = citizen()
    await platform.send(enrol(number, source, await platform.notice(source, 1)))
    (enrolled,) = await platform.events("PersonEnrolled")
    person_id = enrolled.data["person_id"]
    move = TransferPerson(
        citizen_id=number,
        to_org_id=target,
        category=Category.ADMIN,
        notice_no=await platform.notice(target, 1),
        effective_date=date(2026, 6, 1),
        document=DOC,
        position="科员",
    )
    cmd = await platform.send(move)
    res = await platform.result(platform.roster, cmd.id)
    assert res.type == COMPLETED, res.data
    (moved,) = await platform.events("PersonTransferred")
    assert (moved.data["from_org_id"], moved.data["to_org_id"]) == (str(source), str(target))
    assert await platform.counts(source) == (5, 0, 0)
    assert await platform.counts(target) == (5, 1, 0)
    row = await platform.person(person_id)
    assert (row.org_id, row.status, row.position) == (str(target), "active", "科员")
    again = await platform.send(move)
    assert (await platform.result(platform.roster, again.id)).data["code"] == "conflict"

    release = ReleasePerson(
        citizen_id=number, reason=ReleaseReason.RETIRED, effective_date=date(2026, 12, 31)
    )
    cmd = await platform.send(release)
    assert (await platform.result(platform.roster, cmd.id)).type == COMPLETED
    (released,) = await platform.events("PersonReleased")
    assert released.data["reason"] == "retired" and released.data["org_id"] == str(target)
    assert await platform.counts(target) == (5, 0, 0)
    assert (await platform.person(person_id)).status == "released"
    twice = await platform.send(release)
    assert (await platform.result(platform.roster, twice.id)).data["code"] == "not_enrolled"
    body = await platform.get(f"/people/{person_id}")
    assert [h["event_type"].split(".")[2] for h in body["history"]] == [
        "PersonEnrolled",
        "PersonTransferred",
        "PersonReleased",
    ]
    # Released people may come back, under the same person id.
    back = await platform.send(enrol(number, source, await platform.notice(source, 1)))
    assert (await platform.result(platform.roster, back.id)).data["subject"] == person_id


async def test_a_refused_transfer_leaves_the_person_where_they_were(platform: Platform) -> None:
    source = await platform.org()
    target = await platform.org(approved=1)
    number = citizen()
    await platform.send(enrol(number, source, await platform.notice(source, 1)))
    move = TransferPerson(
        citizen_id=number,
        to_org_id=target,
        category=Category.ADMIN,
        notice_no="没有这个通知单",
        effective_date=date(2026, 6, 1),
        document=DOC,
    )
    cmd = await platform.send(move)
    assert (await platform.result(platform.roster, cmd.id)).data["code"] == "notice_invalid"
    (enrolled,) = await platform.events("PersonEnrolled")
    row = await platform.person(enrolled.data["person_id"])
    assert (row.status, row.org_id) == ("active", str(source))
    assert await platform.counts(source) == (5, 1, 0)


async def test_update_changes_editable_fields_and_never_publishes_the_phone(
    platform: Platform,
) -> None:
    org_id = await platform.org()
    number = citizen()
    await platform.send(enrol(number, org_id, await platform.notice(org_id, 1)))
    cmd = await platform.send(
        UpdatePerson(citizen_id=number, education="研究生", phone="13900139000")
    )
    res = await platform.result(platform.roster, cmd.id)
    assert res.type == COMPLETED
    (event,) = await platform.events("PersonUpdated")
    assert sorted(event.data["changed"]) == ["education", "phone"]
    assert "13900139000" not in event.to_bytes().decode()
    assert res.data["subject"] == event.data["person_id"]
    same = await platform.send(UpdatePerson(citizen_id=number, education="研究生"))
    assert (await platform.result(platform.roster, same.id)).data["code"] == "conflict"
    nobody = await platform.send(UpdatePerson(citizen_id=citizen(), education="大学本科"))
    assert (await platform.result(platform.roster, nobody.id)).data["code"] == "not_enrolled"


# --- redelivery, timeouts, personal data ---------------------------------------------------


async def test_redelivered_commands_and_answers_count_once(platform: Platform) -> None:
    org_id = await platform.org()
    notice_no = await platform.notice(org_id, 3)
    env = enrol(citizen(), org_id, notice_no).envelope(source="/tests", **CLERK)
    await platform.roster.command_consumer.process(raw(ROSTER_COMMANDS, env))
    await platform.roster.command_consumer.process(raw(ROSTER_COMMANDS, env))  # before quota
    await platform.pump()
    # Quota's answers delivered again change nothing either.
    for answer in await platform.outbox(platform.quota, ROSTER_ANSWERS):
        await platform.roster_answers.process(raw(ROSTER_ANSWERS, answer))
    await platform.roster.command_consumer.process(raw(ROSTER_COMMANDS, env))  # after the end
    await platform.pump()
    results = await platform.results(platform.roster, env.id)
    assert [r.type for r in results] == [COMPLETED, COMPLETED]  # the stored result, re-sent
    assert results[0].id == results[1].id
    assert len(await platform.events("PersonEnrolled")) == 1
    assert await platform.counts(org_id) == (5, 1, 2)


async def test_quota_answers_the_roster_steps_on_its_answers_topic_as_well_as_the_results(
    platform: Platform,
) -> None:
    org_id = await platform.org(approved=1)
    notice_no = await platform.notice(org_id, 1)
    first = await platform.send(enrol(citizen(), org_id, notice_no), pump=False)
    second = await platform.send(enrol(citizen(), org_id, notice_no), pump=False)
    steps = await platform._uncarried(platform.roster, QUOTA_COMMANDS)
    assert [Envelope.from_bytes(r.value).replyto for r in steps] == [
        ROSTER_ANSWERS,
        ROSTER_ANSWERS,
    ]
    for row in steps:
        await platform.quota.command_consumer.process(
            raw(QUOTA_COMMANDS, Envelope.from_bytes(row.value))
        )
    # The first takes the only place, the second is refused: each answer is on both topics,
    # the same envelope keyed by the step's id.
    answers = await platform.outbox(platform.quota, ROSTER_ANSWERS)
    results = [
        r
        for r in await platform.outbox(platform.quota, COMMAND_RESULTS)
        if r.data["command_type"] == "bianzhi.quota.OccupySlot.v1"
    ]
    assert [a.to_bytes() for a in answers] == [r.to_bytes() for r in results]
    assert [a.type for a in answers] == [COMPLETED, REJECTED]
    assert answers[1].data["code"] in {"no_vacancy", "notice_exhausted"}
    step_ids = [Envelope.from_bytes(r.value).id for r in steps]
    assert [a.data["command_id"] for a in answers] == step_ids
    keys = [r.key for r in await platform._rows(platform.quota, ROSTER_ANSWERS)]
    assert keys == step_ids
    # A step delivered again gets its stored answer again, on both topics.
    await platform.quota.command_consumer.process(
        raw(QUOTA_COMMANDS, Envelope.from_bytes(steps[0].value))
    )
    again = await platform.outbox(platform.quota, ROSTER_ANSWERS)
    assert [a.id for a in again] == [answers[0].id, answers[1].id, answers[0].id]
    assert len(await platform.results(platform.quota, step_ids[0])) == 2
    await platform.pump()
    assert (await platform.result(platform.roster, first.id)).type == COMPLETED
    assert (await platform.result(platform.roster, second.id)).type == REJECTED


async def test_a_step_from_a_roster_without_replyto_is_answered_on_the_roster_answers_topic(
    platform: Platform,
) -> None:
    """A step sent by a roster from before ``replyto`` (an upgrade under way): quota answers it
    on the answers topic of the service its ``source`` names too, where the new roster reads."""
    org_id = await platform.org()
    notice_no = await platform.notice(org_id, 1)
    cmd = await platform.send(enrol(citizen(), org_id, notice_no), pump=False)
    (row,) = await platform._uncarried(platform.roster, QUOTA_COMMANDS)
    step = Envelope.from_bytes(row.value)
    assert step.source.endswith("/roster")
    old = step.model_copy(update={"replyto": None})
    await platform.quota.command_consumer.process(raw(QUOTA_COMMANDS, old))
    (answer,) = await platform.outbox(platform.quota, ROSTER_ANSWERS)
    assert answer.data["command_id"] == step.id
    await platform.pump()
    assert (await platform.result(platform.roster, cmd.id)).type == COMPLETED


async def test_a_replyto_naming_anything_but_an_answers_topic_is_not_followed(
    platform: Platform,
) -> None:
    org_id = await platform.org(approved=0)
    approve = ApproveQuota(
        org_id=org_id, category=Category.ADMIN, approved=3, document=DOC, effective_date=DOC.date
    )
    env = approve.envelope(source="/tests", **APPROVER).model_copy(
        update={"replyto": ROSTER_EVENTS}
    )
    await platform.quota.command_consumer.process(raw(QUOTA_COMMANDS, env))
    assert (await platform.result(platform.quota, env.id)).type == COMPLETED
    topics = {r.topic for r in await platform._rows(platform.quota)}
    assert ROSTER_EVENTS not in topics and ROSTER_ANSWERS not in topics
    # A front end's command naming the roster's answers topic is answered there too: the roster
    # passes over an answer that ends none of its sagas, as it always has.
    env = approve.envelope(source="/tests", **APPROVER).model_copy(
        update={"replyto": ROSTER_ANSWERS}
    )
    await platform.quota.command_consumer.process(raw(QUOTA_COMMANDS, env))
    (answer,) = await platform.outbox(platform.quota, ROSTER_ANSWERS)
    await platform.roster_answers.process(raw(ROSTER_ANSWERS, answer))
    async with platform.roster.sessions() as session:
        assert (await session.execute(select(func.count()).select_from(sagas))).scalar() == 0


async def test_an_unanswered_enrolment_times_out_and_a_late_occupation_is_undone(
    platform: Platform,
) -> None:
    org_id = await platform.org()
    notice_no = await platform.notice(org_id, 1)
    number = citizen()
    cmd = await platform.send(enrol(number, org_id, notice_no), pump=False)
    with commits(platform.roster.engine) as committed:
        assert await saga_layer.sweep_once(platform.roster.uow) == 0  # not overdue yet
    assert committed == []  # a sweep that finds nothing writes nothing
    later = datetime.now(UTC) + timedelta(hours=1)
    with commits(platform.roster.engine) as committed:
        assert await saga_layer.sweep_once(platform.roster.uow, at=later) == 1
    assert len(committed) == 1
    res = await platform.result(platform.roster, cmd.id)
    assert (res.type, res.data["code"]) == (REJECTED, "timeout")
    # Until quota confirms the undoing, the place may still be counted there: the roster's
    # counts (what `bianzhi check` reads) show it as enrolling, not as nobody.
    counts = await platform.get(f"/counts?org_id={org_id}")
    (entry,) = counts["orgs"]
    assert entry["categories"]["admin"] == {"held": 0, "changing": 0, "enrolling": 1}
    assert [s["kind"] for s in (await platform.get("/sagas?status=timed_out"))["sagas"]] == [
        "enrol"
    ]
    # Quota now sees the occupation (late) and then the compensation: nothing stays taken,
    # and the place goes back to the notice.
    await platform.pump()
    assert await platform.counts(org_id) == (5, 0, 1)
    async with platform.quota.sessions() as session:
        used = (
            await session.execute(select(notices.c.used).where(notices.c.notice_no == notice_no))
        ).scalar_one()
    assert used == 0
    assert await platform.events("PersonEnrolled") == []
    assert len(await platform.results(platform.roster, cmd.id)) == 1
    async with platform.roster.sessions() as session:
        status = (await session.execute(select(sagas.c.status))).scalars().all()
    assert status == ["compensated"]
    assert (await platform.get(f"/counts?org_id={org_id}"))["orgs"] == []
    # The same person can be enrolled on the notice now.
    again = await platform.send(enrol(number, org_id, notice_no))
    assert (await platform.result(platform.roster, again.id)).type == COMPLETED
    assert await platform.counts(org_id) == (5, 1, 0)


async def test_a_timed_out_request_that_never_reached_quota_is_cancelled(
    platform: Platform,
) -> None:
    org_id = await platform.org()
    notice_no = await platform.notice(org_id, 1)
    cmd = await platform.send(enrol(citizen(), org_id, notice_no), pump=False)
    occupy = (await platform.outbox(platform.roster, QUOTA_COMMANDS))[0]
    await platform._uncarried(platform.roster, QUOTA_COMMANDS)  # held up on the way, for now
    later = datetime.now(UTC) + timedelta(hours=1)
    await saga_layer.sweep_once(platform.roster.uow, at=later)
    (compensation,) = [
        e for e in await platform.outbox(platform.roster, QUOTA_COMMANDS) if e.id != occupy.id
    ]
    # The compensation arrives first; the occupation arrives after it and is refused.
    for env in (compensation, occupy):
        await platform.quota.command_consumer.process(raw(QUOTA_COMMANDS, env))
    assert await platform.counts(org_id) == (5, 0, 1)
    occupied = await platform.result(platform.quota, occupy.id)
    assert (occupied.type, occupied.data["code"]) == (REJECTED, "conflict")
    assert (await platform.result(platform.roster, cmd.id)).data["code"] == "timeout"


async def test_leader_posts_are_checked_by_quota(platform: Platform) -> None:
    org_id = await platform.org()
    await platform.quota_command(SetLeaderPosts(org_id=org_id, principal=1, deputy=0, document=DOC))
    notice_no = await platform.notice(org_id, 3)
    first = await platform.send(enrol(citizen(), org_id, notice_no, leader_post="principal"))
    assert (await platform.result(platform.roster, first.id)).type == COMPLETED
    second = await platform.send(enrol(citizen(), org_id, notice_no, leader_post="principal"))
    res = await platform.result(platform.roster, second.id)
    assert res.data["code"] == "leader_posts_exceeded"
    assert await platform.counts(org_id) == (5, 1, 2)


async def test_no_message_or_query_carries_a_full_citizen_id(platform: Platform) -> None:
    source = await platform.org()
    target = await platform.org()
    numbers = [citizen() for _ in range(3)]
    notice_no = await platform.notice(source, 3)
    for number in numbers:
        await platform.send(enrol(number, source, notice_no))
    await platform.send(UpdatePerson(citizen_id=numbers[0], position="副科长"))
    await platform.send(
        TransferPerson(
            citizen_id=numbers[1],
            to_org_id=target,
            category=Category.ADMIN,
            notice_no=await platform.notice(target, 1),
            effective_date=date(2026, 6, 1),
            document=DOC,
        )
    )
    await platform.send(
        ReleasePerson(citizen_id=numbers[2], reason="resigned", effective_date=date(2026, 7, 1))
    )
    await platform.send(enrol(numbers[0], source, notice_no))  # refused: already enrolled
    written: list[str] = []
    for rt in (platform.roster, platform.quota):
        table = rt.definition.tables.outbox
        async with rt.sessions() as session:
            # Restricted events wait here sealed, like every other copy of the number.
            for row in (await session.execute(select(table))).all():
                written.append(f"{row.key} {row.value.decode(errors='replace')}")
    bodies = [
        await platform.get(f"/orgs/{source}/people"),
        await platform.get(f"/orgs/{target}/people"),
        await platform.get("/counts"),
        await platform.get("/sagas?status=completed"),
    ]
    text = "\n".join(written) + str(bodies)
    assert len(written) > 20
    for number in numbers:
        assert number not in text
        assert mask_citizen_id(number) in text


async def _transfer_set_up(platform: Platform) -> tuple[str, uuid.UUID, uuid.UUID, TransferPerson]:
    source = await platform.org()
    target = await platform.org()
    number = citizen()
    await platform.send(enrol(number, source, await platform.notice(source, 1)))
    move = TransferPerson(
        citizen_id=number,
        to_org_id=target,
        category=Category.ADMIN,
        notice_no=await platform.notice(target, 1),
        effective_date=date(2026, 6, 1),
        document=DOC,
    )
    return number, source, target, move


async def test_an_overdue_transfer_that_never_reached_quota_is_cancelled(
    platform: Platform,
) -> None:
    _, source, target, move = await _transfer_set_up(platform)
    cmd = await platform.send(move, pump=False)
    (step,) = await platform._uncarried(platform.roster, QUOTA_COMMANDS)  # held up on the way
    later = datetime.now(UTC) + timedelta(hours=1)
    assert await saga_layer.sweep_once(platform.roster.uow, at=later) == 1
    assert await platform.results(platform.roster, cmd.id) == []  # waits for the cancel's answer
    await platform.pump()  # the cancel reaches quota first and is answered
    res = await platform.result(platform.roster, cmd.id)
    assert (res.type, res.data["code"]) == (REJECTED, "timeout")
    (enrolled,) = await platform.events("PersonEnrolled")
    row = await platform.person(enrolled.data["person_id"])
    assert (row.status, row.org_id) == ("active", str(source))
    # The held-up step arrives at last and is refused; nothing moved.
    await platform.quota.command_consumer.process(
        raw(QUOTA_COMMANDS, Envelope.from_bytes(step.value))
    )
    await platform.pump()
    assert await platform.counts(source) == (5, 1, 0) and await platform.counts(target) == (5, 0, 1)
    assert len(await platform.results(platform.roster, cmd.id)) == 1
    assert await platform.events("PersonTransferred") == []
    # The saga has ended as cancelled, not as an enrolment still being compensated.
    async with platform.roster.sessions() as session:
        ended = (
            await session.execute(select(sagas.c.kind, sagas.c.status).order_by(sagas.c.kind))
        ).all()
    assert [tuple(r) for r in ended] == [("enrol", "completed"), ("transfer", "cancelled")]
    assert (await platform.get("/sagas?status=cancelled"))["sagas"][0]["kind"] == "transfer"
    assert (await platform.get("/sagas?status=timed_out"))["sagas"] == []


async def test_an_overdue_release_that_took_effect_completes_as_usual(platform: Platform) -> None:
    number, source, _, _ = await _transfer_set_up(platform)
    release = ReleasePerson(
        citizen_id=number, reason=ReleaseReason.RESIGNED, effective_date=date(2026, 7, 1)
    )
    cmd = await platform.send(release, pump=False)
    answer = await platform.answered()  # not delivered
    later = datetime.now(UTC) + timedelta(hours=1)
    assert await saga_layer.sweep_once(platform.roster.uow, at=later) == 1
    await platform.pump()
    res = await platform.result(platform.roster, cmd.id)
    assert res.type == COMPLETED, res.data
    assert len(await platform.events("PersonReleased")) == 1
    # The step's own answer, late, changes nothing.
    for record in answer:
        await platform.roster_answers.process(record)
    assert len(await platform.results(platform.roster, cmd.id)) == 1
    assert len(await platform.events("PersonReleased")) == 1
    assert await platform.counts(source) == (5, 0, 0)


async def test_a_dead_lettered_roster_command_is_sealed_with_the_personal_data_key(
    platform: Platform,
) -> None:
    # A command that cannot even be read as an envelope goes to the DLQ whole: here a truncated
    # one that still holds a citizen ID in full.
    cid = citizen()
    env = enrol(cid, uuid.uuid4(), "冀编通〔2026〕1号").envelope(source="/tests", **CLERK)
    truncated = env.to_bytes()[:-20]
    assert cid.encode() in truncated
    record = RawMessage(
        topic=ROSTER_COMMANDS,
        partition=0,
        offset=next(_offsets),
        key=cid.encode(),
        value=truncated,
        headers=(("content-type", CONTENT_TYPE.encode()),),
    )
    await platform.roster.command_consumer.process(record)

    dead = platform.roster.command_consumer.dead_letter
    assert isinstance(dead, DeadLetters)
    ((topic, value, key, headers),) = dead.sent
    assert topic == f"{ROSTER_COMMANDS}.dlq"
    assert cid.encode() not in value and cid not in str(headers)
    assert headers["x-dlq-sealed"].startswith("roster-personal-data:")
    # The key may be the number itself: it travels sealed in a header, the record has none.
    assert key is None and headers["x-dlq-topic"] == ROSTER_COMMANDS
    # Whoever holds the roster's key opens it, bound to the topic it came from.
    cipher = platform.roster.definition.sealer
    assert isinstance(cipher, PersonalDataCipher)
    assert cipher.unseal(value, ROSTER_COMMANDS) == truncated
    sealed_key = base64.b64decode(headers["x-dlq-sealed-key"])
    assert cipher.unseal(sealed_key, ROSTER_COMMANDS + "#key") == cid.encode()
    with pytest.raises(InvalidTag):
        cipher.unseal(value, QUOTA_COMMANDS)


async def test_other_services_dead_letters_stay_readable(platform: Platform) -> None:
    # Quota's commands carry no personal data: its DLQ keeps the original bytes for operators.
    record = unreadable_record(QUOTA_COMMANDS, b"\xff not an envelope")
    await platform.quota.command_consumer.process(record)
    dead = platform.quota.command_consumer.dead_letter
    assert isinstance(dead, DeadLetters)
    ((_, value, _, headers),) = dead.sent
    assert value == b"\xff not an envelope" and "x-dlq-sealed" not in headers


async def test_people_prepared_that_no_handler_asked_for_are_never_committed(
    platform: Platform,
) -> None:
    org_id = await platform.org()
    cmd = enrol(citizen(), org_id, "any")
    async with platform.roster.uow() as uow:
        cipher = uow.personal_data
        person_id = str(uuid.uuid4())
        index = cipher.blind_index(cmd.citizen_id)
        await uow.people.add_many(
            [
                {
                    **handlers.identity(cmd, cipher, person_id, index),
                    **handlers.person_values(
                        cmd, cipher, person_id, status=Status.ENROLLING, saga_id=None
                    ),
                }
            ]
        )
        with pytest.raises(RuntimeError, match="never asked for"):
            await uow.commit()
    async with platform.roster.sessions() as session:
        assert (await session.execute(select(func.count()).select_from(people))).scalar() == 0
