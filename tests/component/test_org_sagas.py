"""Merging and abolishing orgs across orgs, quota and roster, wired by hand (SQLite and
PostgreSQL): the people, places, notices and leader posts move together or not at all."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import date, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from contracts.codes import Category, EntryMethod, LeaderPost, OrgKind
from contracts.common import Document
from contracts.envelope import Envelope, now
from contracts.identifiers import compose_citizen_id
from contracts.orgs import AbolishOrg, MergeOrgs, RegisterOrg
from contracts.quota import (
    ApproveQuota,
    CancelQuotaUseNotice,
    IssueQuotaUseNotice,
    SetLeaderPosts,
)
from contracts.roster import EnrolPerson, ReleasePerson
from contracts.topics import (
    COMMAND_RESULTS,
    ORGS_ANSWERS,
    ORGS_COMMANDS,
    ORGS_EVENTS,
    QUOTA_COMMANDS,
    QUOTA_EVENTS,
    ROSTER_EVENTS,
)
from services.orgs.bootstrap import build as build_orgs
from services.orgs.service_layer.sagas import resend_overdue_steps
from services.quota.adapters.orm import establishment, leader_posts, notices, slots
from services.quota.bootstrap import build as build_quota
from services.quota.service_layer.rebuild import compare, live_counts, outbox_events, rebuild
from services.roster.adapters.orm import people
from services.roster.bootstrap import build as build_roster
from services.runtime.app import ServiceRuntime
from tests.conftest import service_settings
from tests.support.databases import database
from tests.support.sql import commits
from tests.support.wiring import Wiring, published, raw

APPROVER = {"actorid": "li.na", "actorregion": "130100", "actorroles": "approver"}
DOC = Document(title="关于机构改革的通知", number="石编〔2026〕9号", date=date(2026, 4, 1))
COMPLETED = "bianzhi.CommandCompleted.v1"
_numbers = count(1)


@pytest.fixture
async def wiring(
    db_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Wiring]:
    async with (
        database(db_backend, tmp_path, "orgs") as orgs_url,
        database(db_backend, tmp_path, "quota") as quota_url,
        database(db_backend, tmp_path, "roster") as roster_url,
    ):
        monkeypatch.setenv("BIANZHI_ORGS_DATABASE_URL", orgs_url)
        monkeypatch.setenv("BIANZHI_QUOTA_DATABASE_URL", quota_url)
        monkeypatch.setenv("BIANZHI_ROSTER_DATABASE_URL", roster_url)
        monkeypatch.setenv(
            "BIANZHI_ROSTER_PERSONAL_DATA_KEY", "q3mC3Zl0bdkq0mW9V6sZf1tq8yQk7oJX0mZB2xqg1XU="
        )
        settings = service_settings(tmp_path, "localhost:1")
        runtimes: list[ServiceRuntime] = [
            build_orgs(settings),
            build_quota(settings),
            build_roster(settings),
        ]
        for rt in runtimes:
            await rt.migrate()
        try:
            yield Wiring(*runtimes)
        finally:
            for rt in runtimes:
                await rt.engine.dispose()
                await rt.read_engine.dispose()


async def ok(w: Wiring, service: str, payload: Any, **actor: str) -> dict[str, Any]:
    env = await w.send(service, payload, **{**APPROVER, **actor})
    res = await w.result(service, env.id)
    assert res.type == COMPLETED, res.data
    return res.data


async def refused(w: Wiring, service: str, payload: Any, code: str) -> dict[str, Any]:
    env = await w.send(service, payload, **APPROVER)
    res = await w.result(service, env.id)
    assert (res.type, res.data["code"]) == ("bianzhi.CommandRejected.v1", code), res.data
    return res.data


async def org(
    w: Wiring,
    name: str,
    *,
    kind: OrgKind = OrgKind.ORGAN,
    approved: int = 5,
    parent: uuid.UUID | None = None,
) -> uuid.UUID:
    org_id = uuid.uuid4()
    await ok(
        w,
        "orgs",
        RegisterOrg(
            org_id=org_id,
            name=name,
            kind=kind,
            division_code="130102",
            parent_org_id=parent,
            document=DOC,
        ),
    )
    category = Category.ADMIN if kind is OrgKind.ORGAN else Category.INSTITUTIONAL
    if approved:
        await ok(
            w,
            "quota",
            ApproveQuota(
                org_id=org_id,
                category=category,
                approved=approved,
                document=DOC,
                effective_date=DOC.date,
            ),
        )
    return org_id


async def notice(w: Wiring, org_id: uuid.UUID, places: int, category: str = "admin") -> str:
    number = f"石编用〔2026〕{uuid.uuid4().hex[:6]}号"
    await ok(
        w,
        "quota",
        IssueQuotaUseNotice(
            notice_no=number,
            org_id=org_id,
            category=Category(category),
            count=places,
            valid_until=date(2099, 1, 1),
            document=DOC,
        ),
    )
    return number


async def enrol(
    w: Wiring, org_id: uuid.UUID, notice_no: str, leader_post: LeaderPost | None = None
) -> tuple[str, str]:
    n = next(_numbers)
    number = compose_citizen_id("130102", date(1975, 1, 1) + timedelta(days=101 * n), n)
    data = await ok(
        w,
        "roster",
        EnrolPerson(
            citizen_id=number,
            name=f"测试{n}",
            org_id=org_id,
            category=Category.ADMIN,
            notice_no=notice_no,
            leader_post=leader_post,
            entry_method=EntryMethod.EXAM,
            effective_date=date(2026, 3, 1),
        ),
        actorroles="clerk",
    )
    return str(data["subject"]), number


async def rows(w: Wiring, service: str, table: Any, *where: Any) -> list[Any]:
    async with w.runtimes[service].sessions() as session:
        return list((await session.execute(select(table).where(*where))).all())


async def counts(w: Wiring, org_id: uuid.UUID) -> tuple[int, int, int]:
    (row,) = await rows(w, "quota", establishment, establishment.c.org_id == str(org_id))
    return row.approved, row.occupied, row.reserved


def types(envs: list[Any], name: str) -> list[Any]:
    return [e for e in envs if e.type.split(".")[2] == name]


async def test_a_merge_moves_places_people_notices_and_leader_posts_together(
    wiring: Wiring,
) -> None:
    w = wiring
    source = await org(w, "长安区机关事务管理局")
    target = await org(w, "长安区政府办公室", approved=3)
    for org_id, principal in ((source, 1), (target, 1)):
        await ok(
            w, "quota", SetLeaderPosts(org_id=org_id, principal=principal, deputy=0, document=DOC)
        )
    source_notice = await notice(w, source, 4)
    moved_people = [
        await enrol(w, source, source_notice, LeaderPost.PRINCIPAL),
        await enrol(w, source, source_notice),
    ]
    await enrol(w, target, await notice(w, target, 1), LeaderPost.PRINCIPAL)

    data = await ok(
        w, "orgs", MergeOrgs(source_org_ids=[source], target_org_id=target, document=DOC)
    )
    (merged,) = types(await w.outbox("orgs", ORGS_EVENTS), "OrgsMerged")
    assert data["events"] == [merged.id] and data["subject"] == str(target)
    # Quota: everything of the source now belongs to the target, in one step.
    assert await counts(w, source) == (0, 0, 0)
    assert await counts(w, target) == (8, 3, 2)
    assert {r.org_id for r in await rows(w, "quota", slots)} == {str(target)}
    (moved_notice,) = await rows(w, "quota", notices, notices.c.notice_no == source_notice)
    assert moved_notice.org_id == str(target)
    quota_events = await w.outbox("quota", QUOTA_EVENTS)
    (est,) = types(quota_events, "EstablishmentsMerged")
    assert est.data["slots_moved"] == 2 and est.data["notices_moved"] == [source_notice]
    # Two principals now share the target's one approved principal post: reported, not hidden.
    (over,) = types(quota_events, "OverQuotaDetected")
    assert (over.data["leader_post"], over.data["approved"], over.data["occupied"]) == (
        "principal",
        1,
        2,
    )
    (posts,) = await rows(
        w, "quota", leader_posts, leader_posts.c.org_id == str(target), leader_posts.c.unit_id == ""
    )
    assert (posts.principal, posts.principal_held) == (1, 2)
    # Roster: the source's people now work for the target.
    transfers = types(await w.outbox("roster", ROSTER_EVENTS), "PersonTransferred")
    assert sorted(t.data["person_id"] for t in transfers) == sorted(p for p, _ in moved_people)
    assert all(t.data["by_merge"] and t.data["notice_no"] == DOC.number for t in transfers)
    assert {r.org_id for r in await rows(w, "roster", people)} == {str(target)}
    # The merged org is closed everywhere; the moved notice still serves the target.
    await refused(
        w,
        "quota",
        ApproveQuota(
            org_id=source,
            category=Category.ADMIN,
            approved=1,
            document=DOC,
            effective_date=DOC.date,
        ),
        "org_not_active",
    )
    await refused(
        w,
        "orgs",
        MergeOrgs(source_org_ids=[source], target_org_id=target, document=DOC),
        "org_not_active",
    )
    await enrol(w, target, source_notice)
    assert await counts(w, target) == (8, 4, 1)
    # Replaying quota's events from the start, the merge included, rebuilds every count.
    async with w.runtimes["quota"].sessions() as session:
        rebuilt = rebuild(await outbox_events(session))
        assert compare(rebuilt, await live_counts(session)) == []


async def test_a_merge_quota_refuses_changes_nothing_and_frees_the_orgs(wiring: Wiring) -> None:
    w = wiring
    institution = await org(w, "长安区图书馆", kind=OrgKind.PUBLIC_INSTITUTION)
    organ = await org(w, "长安区文化局")
    details = await refused(
        w,
        "orgs",
        MergeOrgs(source_org_ids=[institution], target_org_id=organ, document=DOC),
        "category_not_allowed",
    )
    assert details["details"]["category"] == "institutional"
    assert await counts(w, institution) == (5, 0, 0) and await counts(w, organ) == (5, 0, 0)
    assert types(await w.outbox("orgs", ORGS_EVENTS), "OrgsMerged") == []
    # The refusal ended the saga: both orgs can take part in another change.
    other = await org(w, "长安区体育局", approved=0)
    await ok(w, "orgs", MergeOrgs(source_org_ids=[other], target_org_id=organ, document=DOC))


async def test_an_org_is_abolished_only_when_empty(wiring: Wiring) -> None:
    w = wiring
    org_id = await org(w, "长安区信访局", approved=2)
    notice_no = await notice(w, org_id, 1)
    _, number = await enrol(w, org_id, notice_no)
    data = await refused(w, "orgs", AbolishOrg(org_id=org_id, document=DOC), "org_not_empty")
    assert data["details"]["people"] == 1
    assert data["details"]["establishment"][0]["approved"] == 2
    await ok(
        w,
        "roster",
        ReleasePerson(citizen_id=number, reason="transferred_out", effective_date=date(2026, 5, 1)),
        actorroles="clerk",
    )
    # A notice with a place still unused keeps it open; a used-up notice does not.
    spare = await notice(w, org_id, 1)
    data = await refused(w, "orgs", AbolishOrg(org_id=org_id, document=DOC), "org_not_empty")
    assert data["details"]["open_notices"] == [spare] and "people" not in data["details"]
    await ok(w, "quota", CancelQuotaUseNotice(notice_no=spare))
    await ok(
        w,
        "quota",
        ApproveQuota(
            org_id=org_id,
            category=Category.ADMIN,
            approved=0,
            document=DOC,
            effective_date=DOC.date,
        ),
    )
    data = await ok(w, "orgs", AbolishOrg(org_id=org_id, document=DOC))
    (abolished,) = types(await w.outbox("orgs", ORGS_EVENTS), "OrgAbolished")
    assert data["events"] == [abolished.id]
    await refused(
        w,
        "quota",
        ApproveQuota(
            org_id=org_id,
            category=Category.ADMIN,
            approved=1,
            document=DOC,
            effective_date=DOC.date,
        ),
        "org_not_active",
    )


async def test_sub_orgs_are_not_left_behind(wiring: Wiring) -> None:
    w = wiring
    parent = await org(w, "长安区发展和改革局", approved=0)
    await org(w, "长安区价格认证中心", kind=OrgKind.PUBLIC_INSTITUTION, approved=0, parent=parent)
    data = await refused(w, "orgs", AbolishOrg(org_id=parent, document=DOC), "conflict")
    assert len(data["details"]["children"]) == 1


# --- steps quota does not answer ------------------------------------------------------------


async def started_merge(w: Wiring) -> tuple[Envelope, uuid.UUID, Any]:
    """A merge of a source with 3 places into a target with 2, its step to quota not yet
    carried: (the command, the target, the step's outbox row)."""
    source = await org(w, "长安区档案局", approved=3)
    target = await org(w, "长安区史志办", approved=2)
    env = MergeOrgs(source_org_ids=[source], target_org_id=target, document=DOC).envelope(
        source="/tests", **APPROVER
    )
    orgs_rt = w.runtimes["orgs"]
    await orgs_rt.command_consumer.process(raw(ORGS_COMMANDS, env))
    (step,) = await w._fresh("orgs", orgs_rt)
    assert step.topic == QUOTA_COMMANDS
    return env, target, step


async def test_a_merge_step_lost_on_its_way_to_quota_is_sent_again(wiring: Wiring) -> None:
    w = wiring
    orgs_rt = w.runtimes["orgs"]
    env, target, _lost = await started_merge(w)
    with commits(orgs_rt.engine) as committed:
        assert await resend_overdue_steps(orgs_rt.uow) == 0  # not due yet
    assert committed == []  # a sweep that finds nothing writes nothing
    later = now() + timedelta(seconds=orgs_rt.definition.uow_class.saga_step_resend_after_s + 1)
    assert await resend_overdue_steps(orgs_rt.uow, at=later) == 1
    assert await resend_overdue_steps(orgs_rt.uow, at=later) == 0  # due again a while later
    await w.pump()
    assert (await w.result("orgs", env.id)).type == COMPLETED
    assert await counts(w, target) == (5, 0, 0)
    assert len(types(await w.outbox("orgs", ORGS_EVENTS), "OrgsMerged")) == 1


async def test_a_merge_whose_answer_is_lost_is_asked_again_and_done_once(wiring: Wiring) -> None:
    w = wiring
    orgs_rt, quota_rt = w.runtimes["orgs"], w.runtimes["quota"]
    env, target, step = await started_merge(w)
    await quota_rt.command_consumer.process(
        raw(QUOTA_COMMANDS, Envelope.from_bytes(published(orgs_rt, step)))
    )
    # Quota merged; its events go out, its answer is lost.
    answers = 0
    for row in await w._fresh("quota", quota_rt):
        if row.topic in (ORGS_ANSWERS, COMMAND_RESULTS):
            answers += 1
        else:
            await w._deliver(row.topic, Envelope.from_bytes(published(quota_rt, row)))
    assert answers == 2 and await counts(w, target) == (5, 0, 0)
    later = now() + timedelta(seconds=orgs_rt.definition.uow_class.saga_step_resend_after_s + 1)
    assert await resend_overdue_steps(orgs_rt.uow, at=later) == 1
    await w.pump()
    # Quota answered the step sent again with its stored result: merged once, not twice.
    assert (await w.result("orgs", env.id)).type == COMPLETED
    assert await counts(w, target) == (5, 0, 0)
    assert len(types(await w.outbox("quota", QUOTA_EVENTS), "EstablishmentsMerged")) == 1
    assert len(types(await w.outbox("orgs", ORGS_EVENTS), "OrgsMerged")) == 1
    assert await resend_overdue_steps(orgs_rt.uow, at=later + timedelta(hours=1)) == 0
