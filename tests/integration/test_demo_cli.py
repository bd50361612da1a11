"""`bianzhi demo` as a real process against the real broker and the real services (SQLite and
PostgreSQL), at a small scale: one county. Without the roster service the people stage must end
with a clear "without result" report rather than hang; with it, every person is enrolled and
quota's occupied counts are the people of the plan."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.common import office_today
from services.cli import demo_data
from services.quota.bootstrap import build
from services.roster.bootstrap import build as build_roster
from services.runtime.app import ServiceRuntime
from tests.conftest import service_settings
from tests.support.databases import database
from tests.support.lifecycle import running

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[2]
COUNTY = "130127"  # 高邑县
PEOPLE = 24
SEED = 5
KEY = "q3mC3Zl0bdkq0mW9V6sZf1tq8yQk7oJX0mZB2xqg1XU="  # a test personal-data key (32 bytes)


@pytest.fixture
async def quota_service(
    topics: str, db_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    async with database(db_backend, tmp_path, "quota") as url:
        monkeypatch.setenv("BIANZHI_QUOTA_DATABASE_URL", url)
        runtime = build(service_settings(tmp_path, topics))
        async with running(runtime.app):
            yield runtime


@pytest.fixture
async def roster_service(
    quota_service: ServiceRuntime,
    topics: str,
    db_backend: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[ServiceRuntime]:
    async with database(db_backend, tmp_path, "roster") as url:
        monkeypatch.setenv("BIANZHI_ROSTER_DATABASE_URL", url)
        monkeypatch.setenv("BIANZHI_ROSTER_PERSONAL_DATA_KEY", KEY)
        runtime = build_roster(service_settings(tmp_path, topics))
        async with running(runtime.app):
            yield runtime


def demo_argv(topics: str, tmp_path: Path, as_of: date, *extra: str) -> list[str]:
    return [
        "demo",
        "--broker",
        topics,
        "--data-dir",
        str(tmp_path / "cli"),
        "--within",
        COUNTY,
        "--people",
        str(PEOPLE),
        "--seed",
        str(SEED),
        "--as-of",
        as_of.isoformat(),
        "--no-progress",
        *extra,
    ]


async def bianzhi(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )


def by_stage(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {stage["stage"]: stage for stage in summary["stages"]}


async def test_demo_loads_orgs_and_quota_and_reports_people_without_roster(
    orgs_service: ServiceRuntime,
    quota_service: ServiceRuntime,
    topics: str,
    tmp_path: Path,
) -> None:
    as_of = office_today()
    argv = demo_argv(topics, tmp_path, as_of, "--timeout", "4")
    plan = demo_data.build_plan(PEOPLE, seed=SEED, within=COUNTY, as_of=as_of)
    expected = {s.name: len(s.commands) for s in demo_data.stages(plan)}

    first = await bianzhi(*argv)
    assert first.returncode == 3, first.stderr  # incomplete: nobody answers for the people
    summary = json.loads(first.stdout)
    stages = by_stage(summary)
    for name in ("limits", "organs", "institutions", "quota", "notices"):
        assert stages[name]["commands"] == expected[name] > 0
        assert stages[name]["completed"] == expected[name], stages[name]
        assert stages[name]["rejected"] == {}
    people = stages["people"]
    assert people["commands"] == PEOPLE
    assert people["completed"] == 0
    assert people["without_result"] + people["not_sent"] == PEOPLE
    assert summary["complete"] is False
    assert "people did not finish" in summary["stopped"]
    assert "without result" in first.stderr

    # Quota now holds exactly what the plan approved and reserved.
    approved = {(str(q.org_id), q.category.value): q.approved for q in plan.quotas}
    reserved: Counter[tuple[str, str]] = Counter()
    for notice in plan.notices:
        reserved[(str(notice.org_id), notice.category.value)] += notice.count
    transport = httpx.ASGITransport(app=quota_service.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://quota") as api:
        for org in plan.orgs:
            body = (await api.get(f"/orgs/{org.command.org_id}/establishment")).json()
            assert body["name"] == org.command.name
            for row in body["categories"]:
                key = (str(org.command.org_id), row["category"])
                assert row["approved"] == approved[key]
                assert row["reserved"] == reserved[key]
                assert row["occupied"] == 0
            assert {r["category"] for r in body["categories"]} == {
                c for o, c in approved if o == str(org.command.org_id)
            }

    # The same demo again: the same ids get their stored results; nothing is done twice.
    again = await bianzhi(*argv)
    assert again.returncode == 3, again.stderr
    stages_again = by_stage(json.loads(again.stdout))
    for name in ("limits", "organs", "institutions", "quota", "notices"):
        assert stages_again[name]["completed"] == expected[name], stages_again[name]
        assert stages_again[name]["rejected"] == {}
    async with httpx.AsyncClient(transport=transport, base_url="http://quota") as api:
        org = plan.orgs[0].command
        body = (await api.get(f"/orgs/{org.org_id}/establishment")).json()
        for row in body["categories"]:
            key = (str(org.org_id), row["category"])
            assert (row["approved"], row["reserved"]) == (approved[key], reserved[key])


async def test_demo_refuses_an_unknown_scope_before_sending(tmp_path: Path) -> None:
    result = await bianzhi(
        "demo", "--broker", "127.0.0.1:9", "--within", "999999", "--data-dir", str(tmp_path)
    )
    assert result.returncode == 2
    assert "--within '999999'" in result.stderr


async def test_demo_with_the_roster_enrols_every_person_of_the_plan(
    orgs_service: ServiceRuntime,
    roster_service: ServiceRuntime,
    quota_service: ServiceRuntime,
    topics: str,
    tmp_path: Path,
) -> None:
    as_of = office_today()
    result = await bianzhi(*demo_argv(topics, tmp_path, as_of, "--timeout", "60"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["complete"] is True
    people = by_stage(summary)["people"]
    assert (people["completed"], people["rejected"]) == (PEOPLE, {})

    plan = demo_data.build_plan(PEOPLE, seed=SEED, within=COUNTY, as_of=as_of)
    held: Counter[tuple[str, str]] = Counter((str(p.org_id), p.category.value) for p in plan.people)
    transport = httpx.ASGITransport(app=quota_service.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://quota") as api:
        body = (await api.get(f"/divisions/{COUNTY}/establishment")).json()
        occupied = {row["category"]: row["occupied"] for row in body["categories"]}
        assert sum(occupied.values()) == PEOPLE
        for org in plan.orgs:
            body = (await api.get(f"/orgs/{org.command.org_id}/establishment")).json()
            for row in body["categories"]:
                key = (str(org.command.org_id), row["category"])
                assert row["occupied"] == held[key]
                assert row["reserved"] == 0  # every notice used up exactly
