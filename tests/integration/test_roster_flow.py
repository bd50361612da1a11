"""The roster sagas end to end: orgs, quota and roster services on the real broker, each with a
database of its own (SQLite and PostgreSQL), driven only by commands on the topics.

Also the personal-data boundary: after a full enrol / update / transfer / release scenario no
topic but the roster's own command topic and its restricted events topic, no dead letter and no
log line holds a full citizen ID number; the restricted topic holds each one in full, once per
public event.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from contracts.codes import Category, EntryMethod, ReleaseReason
from contracts.common import Document
from contracts.envelope import CONTENT_TYPE, Envelope
from contracts.identifiers import compose_citizen_id, mask_citizen_id
from contracts.orgs import AbolishOrg, MergeOrgs, RegisterOrg
from contracts.quota import ApproveQuota, IssueQuotaUseNotice
from contracts.roster import EnrolPerson, ReleasePerson, TransferPerson, UpdatePerson
from contracts.topics import (
    COMMAND_RESULTS,
    ORGS_ANSWERS,
    ROSTER_ANSWERS,
    ROSTER_COMMANDS,
    ROSTER_EVENTS,
    ROSTER_EVENTS_RESTRICTED,
    all_topics,
    dlq,
)
from services.cli.main import main
from services.cli.tail import record_json
from services.quota.bootstrap import build as build_quota
from services.roster.adapters.orm import people
from services.roster.bootstrap import build as build_roster
from services.runtime.app import ServiceRuntime
from tests.conftest import service_settings, wait_for
from tests.integration.test_report_cli import serve
from tests.support.builders import register_org
from tests.support.databases import database
from tests.support.kafka import CommandClient, read_topic
from tests.support.lifecycle import running

pytestmark = pytest.mark.broker

COMPLETED = "bianzhi.CommandCompleted.v1"
REJECTED = "bianzhi.CommandRejected.v1"
DOC = Document(title="关于核定编制的批复", number="冀编〔2026〕7号", date=date(2026, 2, 1))
CLERK = {"actorid": "wang.fang", "actorregion": "130100", "actorroles": "clerk"}
KEY = "q3mC3Zl0bdkq0mW9V6sZf1tq8yQk7oJX0mZB2xqg1XU="


@pytest.fixture
async def services(
    orgs_service: ServiceRuntime,
    topics: str,
    db_backend: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[ServiceRuntime, ServiceRuntime]]:
    async with (
        database(db_backend, tmp_path, "quota") as quota_url,
        database(db_backend, tmp_path, "roster") as roster_url,
    ):
        monkeypatch.setenv("BIANZHI_QUOTA_DATABASE_URL", quota_url)
        monkeypatch.setenv("BIANZHI_ROSTER_DATABASE_URL", roster_url)
        monkeypatch.setenv("BIANZHI_ROSTER_PERSONAL_DATA_KEY", KEY)
        settings = service_settings(tmp_path, topics, log_level="INFO")
        quota = build_quota(settings)
        roster = build_roster(settings)
        async with running(quota.app), running(roster.app):
            yield quota, roster


async def check(argv: list[str]) -> tuple[int, dict[str, object]]:
    """Run `bianzhi check` (it blocks on HTTP, so in a thread); its status and JSON report."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = await asyncio.to_thread(main, argv)
    return status, json.loads(out.getvalue())


def http(service: ServiceRuntime) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=service.app), base_url="http://t")


async def done(client: CommandClient, command_id: str) -> dict[str, object]:
    res = await client.result(command_id, timeout=30)
    assert res.type == COMPLETED, res.data
    return res.data


async def approved_orgs(
    client: CommandClient, quota_api: httpx.AsyncClient, orgs: list[RegisterOrg], approved: int
) -> list[str]:
    """Register ``orgs``, wait until quota knows them, approve ``approved`` admin places each;
    the approvals' command ids."""
    for org in orgs:
        await done(client, await client.send(org))

    async def projected() -> bool:
        for org in orgs:
            if (await quota_api.get(f"/orgs/{org.org_id}/establishment")).status_code != 200:
                return False
        return True

    await wait_for(projected, timeout=20)
    approvals = []
    for org in orgs:
        approval = ApproveQuota(
            org_id=org.org_id,
            category=Category.ADMIN,
            approved=approved,
            document=DOC,
            effective_date=DOC.date,
        )
        approvals.append(await client.send(approval))
        await done(client, approvals[-1])
    return approvals


async def issued_notice(client: CommandClient, org_id: uuid.UUID, count: int) -> str:
    """A quota-use notice for ``count`` admin places of ``org_id``; its number."""
    notice = IssueQuotaUseNotice(
        notice_no=f"长编用〔2026〕{uuid.uuid4().hex[:6]}号",
        org_id=org_id,
        category=Category.ADMIN,
        count=count,
        valid_until=date(2099, 1, 1),
        document=DOC,
    )
    await done(client, await client.send(notice))
    return notice.notice_no


@pytest.fixture
def service_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every log line of the services built after this fixture, in a file of the test's.

    The services bind ``sys.stderr`` when they configure logging, so it is replaced first;
    the file stays open after the test for loggers still draining.
    """
    path = tmp_path / "services.log"
    stream = path.open("a", encoding="utf-8", buffering=1)
    monkeypatch.setattr(sys, "stderr", stream)
    yield path
    stream.flush()


async def test_enrol_update_transfer_release_through_the_broker_leak_no_citizen_id(
    service_logs: Path,  # first: the services' loggers then write into it
    services: tuple[ServiceRuntime, ServiceRuntime],
    client: CommandClient,
) -> None:
    quota, roster = services
    first, second = register_org(), register_org(name="石家庄市长安区教育局")
    async with http(quota) as quota_api, http(roster) as roster_api:
        await approved_orgs(client, quota_api, [first, second], approved=5)
        notices = {
            org.org_id: await issued_notice(client, org.org_id, 3) for org in (first, second)
        }

        numbers = [compose_citizen_id("130102", date(1990, 5, 1 + i), 11 + i) for i in range(3)]
        enrolled: list[str] = []
        for i, number in enumerate(numbers):
            cmd = EnrolPerson(
                citizen_id=number,
                name=["张伟", "王芳", "李娜"][i],
                org_id=first.org_id,
                category=Category.ADMIN,
                notice_no=notices[first.org_id],
                entry_method=EntryMethod.EXAM,
                effective_date=date(2026, 3, 1),
                phone="13800138000",
            )
            data = await done(client, await client.send(cmd, **CLERK))
            enrolled.append(str(data["subject"]))
        refused = await client.result(
            await client.send(
                EnrolPerson(
                    citizen_id=numbers[0],
                    name="张伟",
                    org_id=second.org_id,
                    category=Category.ADMIN,
                    notice_no=notices[second.org_id],
                    entry_method=EntryMethod.TRANSFER_IN,
                    effective_date=date(2026, 3, 1),
                ),
                **CLERK,
            ),
            timeout=30,
        )
        assert (refused.type, refused.data["code"]) == (REJECTED, "already_enrolled")

        await done(
            client,
            await client.send(UpdatePerson(citizen_id=numbers[0], position="副科长"), **CLERK),
        )
        await done(
            client,
            await client.send(
                TransferPerson(
                    citizen_id=numbers[1],
                    to_org_id=second.org_id,
                    category=Category.ADMIN,
                    notice_no=notices[second.org_id],
                    effective_date=date(2026, 6, 1),
                    document=DOC,
                ),
                **CLERK,
            ),
        )
        await done(
            client,
            await client.send(
                ReleasePerson(
                    citizen_id=numbers[2],
                    reason=ReleaseReason.RETIRED,
                    effective_date=date(2026, 12, 31),
                ),
                **CLERK,
            ),
        )

        first_est = (await quota_api.get(f"/orgs/{first.org_id}/establishment")).json()
        second_est = (await quota_api.get(f"/orgs/{second.org_id}/establishment")).json()
        assert [(c["approved"], c["occupied"], c["reserved"]) for c in first_est["categories"]] == [
            (5, 1, 0)
        ]
        assert [
            (c["approved"], c["occupied"], c["reserved"]) for c in second_est["categories"]
        ] == [(5, 1, 2)]
        people_first = (await roster_api.get(f"/orgs/{first.org_id}/people")).json()
        people_second = (await roster_api.get(f"/orgs/{second.org_id}/people")).json()
        assert [p["person_id"] for p in people_first["people"]] == [enrolled[0]]
        assert [p["person_id"] for p in people_second["people"]] == [enrolled[1]]
        assert people_first["people"][0]["position"] == "副科长"
        person = (await roster_api.get(f"/people/{enrolled[2]}")).json()
        assert person["status"] == "released"
        counts = (await roster_api.get("/counts", params={"division_code": "130100"})).json()
        assert sorted(
            (o["org_id"], o["division_code"], o["categories"]) for o in counts["orgs"]
        ) == sorted(
            (str(org.org_id), "130102", {"admin": {"held": 1, "changing": 0, "enrolling": 0}})
            for org in (first, second)
        )
        assert counts["totals"] == {"admin": {"held": 2, "changing": 0, "enrolling": 0}}
        elsewhere = (await roster_api.get("/counts", params={"division_code": "130200"})).json()
        assert elsewhere == {"orgs": [], "totals": {}}

    # A roster command that cannot be read goes to the dead-letter topic whole: here a truncated
    # one that still holds a citizen ID in full, keyed by it as a front-end keys its commands.
    lost = compose_citizen_id("130102", date(1990, 6, 1), 21)
    garbage = client.envelope(
        EnrolPerson(
            citizen_id=lost,
            name="赵磊",
            org_id=first.org_id,
            category=Category.ADMIN,
            notice_no=notices[first.org_id],
            entry_method=EntryMethod.EXAM,
            effective_date=date(2026, 3, 1),
        ),
        **CLERK,
    ).to_bytes()[:-20]
    assert lost.encode() in garbage
    await client.send_raw(
        ROSTER_COMMANDS,
        garbage,
        key=lost.encode(),
        headers=[("content-type", CONTENT_TYPE.encode())],
    )

    async def all_events_out() -> bool:
        public = await read_topic(client.bootstrap, ROSTER_EVENTS)
        restricted = await read_topic(client.bootstrap, ROSTER_EVENTS_RESTRICTED)
        dead = await read_topic(client.bootstrap, dlq(ROSTER_COMMANDS))
        # 3 enrolled, 1 updated, 1 transferred, 1 released; each with its restricted counterpart
        return len(public) == len(restricted) == 6 and len(dead) == 1

    await wait_for(all_events_out, timeout=20)

    # The reconciliation (督查) agrees with what happened, and notices a roster gone wrong.
    async with serve(quota.app) as quota_url, serve(roster.app) as roster_url:
        argv = ["check", "--division", "130100", "--quota-url", quota_url]
        argv += ["--roster-url", roster_url, "--format", "json"]
        status, report = await check(argv)
        assert status == 0 and report["clean"], report
        assert (report["orgs_checked"], report["people"], report["occupied"]) == (2, 2, 2)
        async with roster.sessions() as session:
            await session.execute(
                update(people).where(people.c.person_id == enrolled[0]).values(status="released")
            )
            await session.commit()
        status, report = await check(argv)
        assert status == 1 and not report["clean"]
        assert [
            (m["org_id"], m["quota_occupied"], m["roster_held"]) for m in report["mismatches"]
        ] == [(str(first.org_id), 1, 0)]
    # The restricted topic carries every number in full, once per public event, keyed by person.
    public = [
        Envelope.from_bytes(r.value) for r in await read_topic(client.bootstrap, ROSTER_EVENTS)
    ]
    restricted_records = await read_topic(client.bootstrap, ROSTER_EVENTS_RESTRICTED)
    restricted = [Envelope.from_bytes(r.value) for r in restricted_records]
    assert sorted(e.data["event_id"] for e in restricted) == sorted(e.id for e in public)
    assert sorted(e.type for e in restricted) == sorted(
        e.type.replace(".v1", "Restricted.v1") for e in public
    )
    assert Counter(e.data["citizen_id"] for e in restricted) == {n: 2 for n in numbers}
    for record, env in zip(restricted_records, restricted, strict=True):
        assert record.key == env.data["person_id"].encode()
        assert env.data["person_id"] in enrolled
    # The dead letter is sealed: it keeps the command, but not readably.
    (dead,) = await read_topic(client.bootstrap, dlq(ROSTER_COMMANDS))
    assert dict(dead.headers)["x-dlq-sealed"].startswith(b"roster-personal-data:")
    assert lost.encode() not in dead.value
    # The operator holding the roster's key reads it (`bianzhi tail … --open-sealed roster`).
    shown = record_json(dead, roster.definition.sealer)
    assert shown["opened"] is True and shown["key"] == lost and lost in str(shown["value"])
    assert record_json(dead)["key"] is None and "opened" not in record_json(dead)

    # Where each record part or log line could hold a number: (place, text).
    seen: list[tuple[str, str]] = []
    for topic in all_topics():
        if topic in (ROSTER_COMMANDS, ROSTER_EVENTS_RESTRICTED):
            continue  # the front-ends' own commands, and the topic for those authorised
        for record in await read_topic(client.bootstrap, topic):
            where = f"{topic}@{record.offset}"
            seen.append((f"{where} key", (record.key or b"").decode(errors="replace")))
            # a sealed dead letter is binary: any digits in it still read as digits
            seen.append((f"{where} value", record.value.decode(errors="replace")))
            seen.append((f"{where} headers", repr(record.headers)))
    logs = await asyncio.to_thread(service_logs.read_text, encoding="utf-8")
    seen += [(f"log line {i}", line) for i, line in enumerate(logs.splitlines(), 1)]
    text = "\n".join(t for _, t in seen)
    assert len(seen) > 90 and "PersonTransferred" in text
    assert "saga completed" in logs  # the services' log lines were captured
    for number in [*numbers, lost]:
        found = [place for place, t in seen if number in t]
        assert not found, f"a full citizen ID appears in a topic or log: {number} in {found}"
    for number in numbers:
        assert mask_citizen_id(number) in text


async def test_merge_and_abolish_through_the_broker_answered_on_the_answers_topics(
    services: tuple[ServiceRuntime, ServiceRuntime], client: CommandClient
) -> None:
    """The sagas of orgs (merge, abolish) and of the roster (enrol) on the real broker: quota
    answers each saga step on its sender's answers topic as well as on the results, and each
    sender reads its answers there; a front end's command is answered on the results only."""
    quota, roster = services
    target, source, empty = (
        register_org(),
        register_org(name="石家庄市长安区审计局"),
        register_org(name="石家庄市长安区档案局"),
    )
    await done(client, await client.send(empty))
    async with http(quota) as quota_api, http(roster) as roster_api:
        fronts = await approved_orgs(client, quota_api, [target, source], approved=4)
        notice_no = await issued_notice(client, source.org_id, 2)
        enrolment = await client.send(
            EnrolPerson(
                citizen_id=compose_citizen_id("130102", date(1988, 8, 8), 31),
                name="刘洋",
                org_id=source.org_id,
                category=Category.ADMIN,
                notice_no=notice_no,
                entry_method=EntryMethod.EXAM,
                effective_date=date(2026, 3, 1),
            ),
            **CLERK,
        )
        person_id = str((await done(client, enrolment))["subject"])

        merge = await client.send(
            MergeOrgs(source_org_ids=[source.org_id], target_org_id=target.org_id, document=DOC)
        )
        await done(client, merge)
        abolished = await client.send(AbolishOrg(org_id=empty.org_id, document=DOC))
        await done(client, abolished)
        refused = await client.result(
            await client.send(AbolishOrg(org_id=target.org_id, document=DOC)), timeout=30
        )
        assert (refused.type, refused.data["code"]) == (REJECTED, "org_not_empty")

        est = (await quota_api.get(f"/orgs/{target.org_id}/establishment")).json()
        assert [(c["approved"], c["occupied"]) for c in est["categories"]] == [(8, 1)]

        async def moved() -> bool:
            listed = (await roster_api.get(f"/orgs/{target.org_id}/people")).json()
            return [p["person_id"] for p in listed["people"]] == [person_id]

        await wait_for(moved, timeout=20)

    def answered(records: list[Any]) -> list[tuple[str, str]]:
        envs = [Envelope.from_bytes(r.value) for r in records]
        return sorted((e.data["command_type"].split(".")[-2], e.type.split(".")[-2]) for e in envs)

    orgs_answers = await read_topic(client.bootstrap, ORGS_ANSWERS)
    assert answered(orgs_answers) == [
        ("CloseEstablishment", "CommandCompleted"),
        ("CloseEstablishment", "CommandRejected"),
        ("MergeEstablishments", "CommandCompleted"),
    ]
    roster_answers = await read_topic(client.bootstrap, ROSTER_ANSWERS)
    assert answered(roster_answers) == [("OccupySlot", "CommandCompleted")]
    # Each answer is the step's result as it is on the results topic, keyed by the step's id.
    results = {
        Envelope.from_bytes(r.value).id: r
        for r in await read_topic(client.bootstrap, COMMAND_RESULTS)
    }
    for record in [*orgs_answers, *roster_answers]:
        answer = Envelope.from_bytes(record.value)
        assert record.key == answer.data["command_id"].encode()
        assert results[answer.id].value == record.value
    # The front end's commands were answered on the results only.
    sent = {*fronts, enrolment, merge, abolished}
    assert sent <= {Envelope.from_bytes(r.value).data["command_id"] for r in results.values()}
    in_answers = {
        Envelope.from_bytes(r.value).data["command_id"] for r in [*orgs_answers, *roster_answers]
    }
    assert not sent & in_answers
