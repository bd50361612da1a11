"""`bianzhi import` as a real process: the template, the 导入校核 dry run, an import against the
real broker with no roster service running (rows end 未确认, the batch does not hang, a second
import re-sends exactly the same command ids), and an import into the real orgs, quota and roster
services (SQLite and PostgreSQL) that a second import leaves unchanged."""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import date, timedelta
from pathlib import Path

import httpx
import pytest
from openpyxl import load_workbook

from contracts import identifiers
from contracts.codes import Category
from contracts.common import Document, office_today
from contracts.quota import IssueQuotaUseNotice
from contracts.results import CommandCompleted
from contracts.roster import EnrolPerson
from contracts.topics import ROSTER_COMMANDS, all_topics
from services.cli import demo_data
from services.cli.batch import Outgoing, Status, send_batch
from services.cli.importer import COLUMNS
from services.quota.bootstrap import build as build_quota
from services.roster.bootstrap import build as build_roster
from services.runtime.app import ServiceRuntime
from services.runtime.embedded_broker import EmbeddedBroker, ensure_topics
from services.runtime.settings import Settings
from tests.conftest import service_settings
from tests.support.databases import database
from tests.support.kafka import CommandClient, read_topic
from tests.support.lifecycle import running, serve

REPO = Path(__file__).resolve().parents[2]
HEADERS = [c.header for c in COLUMNS]
ORG = "3f6f5a3e-8c1e-4a43-9d6b-1b8f2f0c1a01"
ACTOR = ["--actor", "li.na", "--region", "130100", "--roles", "clerk"]
NOT_CHECKED = "用编通知单未核对：没有找到运行中的平台（--quota-url 指定 quota 的查询接口）"


def bianzhi(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def row(name: str, citizen_id: str, **extra: str) -> dict[str, str]:
    return {
        "姓名": name,
        "公民身份号码": citizen_id,
        "单位ID": ORG,
        "编制类型": "行政编制",
        "用编通知单号": "石编用〔2026〕12号",
        "进入方式": "考录",
        "入编日期": "2026-03-01",
        **extra,
    }


GOOD = [row("张伟", "130102199001011237"), row("李娜", "11010519491231002X", 性别="女")]
BAD = [
    row("王强", "130102199001011238"),  # wrong check digit
    row("赵敏", "130102198001011259", 编制类型="行政编织", 入编日期="2026-13-01"),
]


def fill_template(path: Path, rows: list[dict[str, str]]) -> None:
    made = bianzhi("import", "template", "--out", str(path))
    assert made.returncode == 0, made.stderr
    if path.suffix == ".xlsx":
        book = load_workbook(path)
        sheet = book["人员名单"]
        for values in rows:
            sheet.append([values.get(h) for h in HEADERS])
        book.save(path)
    else:
        with path.open("a", encoding="utf-8", newline="") as out:
            csv.writer(out).writerows([[values.get(h, "") for h in HEADERS] for values in rows])


def test_dry_run_reports_every_problem_by_row_and_column(tmp_path: Path) -> None:
    path = tmp_path / "people.xlsx"
    fill_template(path, [*GOOD, *BAD])
    result = bianzhi("import", "people", str(path), "--dry-run")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "导入校核 people.xlsx: 4 行，2 行通过，2 行有问题"
    problems = [tuple(line.split("\t")[:2]) for line in lines[2:-1]]
    assert problems == [("4", "公民身份号码"), ("5", "编制类型"), ("5", "入编日期")]
    assert lines[-1] == NOT_CHECKED  # no platform runs from the data directory
    assert not (tmp_path / "people.result.xlsx").exists()  # a dry run writes nothing


def test_dry_run_of_a_clean_csv_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    fill_template(path, GOOD)
    result = bianzhi("import", "people", str(path), "--dry-run")
    assert result.returncode == 0, result.stderr
    summary = "导入校核 people.csv: 2 行，2 行通过，0 行有问题"
    assert result.stdout.splitlines() == [summary, NOT_CHECKED]


def test_import_needs_an_actor_and_refuses_other_formats(tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    fill_template(path, GOOD)
    result = bianzhi("import", "people", str(path), "--broker", "127.0.0.1:9")
    assert result.returncode == 2
    assert "--actor, --region, --roles" in result.stderr
    other = bianzhi("import", "template", "--out", str(tmp_path / "t.ods"))
    assert other.returncode == 2 and ".xlsx or .csv" in other.stderr


@pytest.mark.broker
async def test_import_without_roster_reports_no_result_and_resends_the_same_ids(
    topics: str, tmp_path: Path
) -> None:
    path = tmp_path / "people.csv"
    fill_template(path, [*GOOD, *BAD])
    argv = ["import", "people", str(path), *ACTOR, "--broker", topics, "--timeout", "2"]
    first = await asyncio.to_thread(bianzhi, *argv)
    assert first.returncode == 3, first.stderr
    assert "without result 2" in first.stderr
    out = tmp_path / "people.result.csv"
    with out.open(encoding="utf-8-sig", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["姓名"], r["结果"], r["原因代码"]) for r in table] == [
        ("张伟", "未确认", "no_result"),
        ("李娜", "未确认", "no_result"),
        ("王强", "失败", "invalid_citizen_id"),
        ("赵敏", "失败", "invalid_message"),
    ]

    second = await asyncio.to_thread(bianzhi, *argv)
    assert second.returncode == 3, second.stderr
    sent = [json.loads(record.value) for record in await read_topic(topics, ROSTER_COMMANDS)]
    sends = Counter(e["id"] for e in sent)
    assert len(sends) == 2 and set(sends.values()) == {2}  # each id twice, no new ones
    assert {e["data"]["citizen_id"] for e in sent} == {"130102199001011237", "11010519491231002X"}
    assert {e["type"] for e in sent} == {"bianzhi.roster.EnrolPerson.v1"}
    assert {e["actorid"] for e in sent} == {"li.na"}


@pytest.mark.broker
async def test_a_batch_ends_with_a_report_when_the_broker_goes_away(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log")
    await broker.start()
    stopped = False
    try:
        await ensure_topics(broker.bootstrap, all_topics(), partitions=1)
        items = [
            Outgoing(
                EnrolPerson.model_validate(
                    {
                        "citizen_id": r["公民身份号码"],
                        "name": r["姓名"],
                        "org_id": ORG,
                        "category": "admin",
                        "notice_no": "N-1",
                        "entry_method": "exam",
                        "effective_date": "2026-03-01",
                    }
                ).envelope(source="/tests", actorid="a", actorregion="130100", actorroles="clerk"),
                ROSTER_COMMANDS,
            )
            for r in GOOD
        ]
        settings = Settings(data_dir=tmp_path, kafka_bootstrap=broker.bootstrap)
        batch = asyncio.create_task(
            send_batch(items, settings, label="t", stall_timeout_s=3, progress=False)
        )
        await asyncio.sleep(1)
        await broker.stop()
        stopped = True
        report = await batch
    finally:
        if not stopped:
            await broker.stop()
    assert report.count(Status.NO_RESULT) == 2
    assert not report.complete


KEY = "q3mC3Zl0bdkq0mW9V6sZf1tq8yQk7oJX0mZB2xqg1XU="  # a test personal-data key (32 bytes)


@pytest.fixture
async def quota_and_roster(
    orgs_service: ServiceRuntime,
    topics: str,
    db_backend: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[ServiceRuntime]:
    async with (
        database(db_backend, tmp_path, "quota") as quota_url,
        database(db_backend, tmp_path, "roster") as roster_url,
    ):
        monkeypatch.setenv("BIANZHI_QUOTA_DATABASE_URL", quota_url)
        monkeypatch.setenv("BIANZHI_ROSTER_DATABASE_URL", roster_url)
        monkeypatch.setenv("BIANZHI_ROSTER_PERSONAL_DATA_KEY", KEY)
        settings = service_settings(tmp_path, topics)
        quota, roster = build_quota(settings), build_roster(settings)
        async with running(quota.app), running(roster.app):
            yield quota


@pytest.mark.broker
async def test_import_enrols_the_valid_rows_and_a_second_import_changes_nothing(
    quota_and_roster: ServiceRuntime, client: CommandClient, tmp_path: Path
) -> None:
    # The demo's orgs and quota of one county, without people; then a notice of two places.
    as_of = office_today()
    demo = await asyncio.to_thread(
        bianzhi,
        *("demo", "--broker", client.bootstrap, "--within", "130127", "--people", "0"),
        *("--as-of", as_of.isoformat(), "--no-progress", "--data-dir", str(tmp_path / "d")),
    )
    assert demo.returncode == 0, demo.stderr
    plan = demo_data.build_plan(0, seed=1, within="130127", as_of=as_of)
    org = next(o.command for o in plan.orgs if o.spec.key == "finance")
    notice = IssueQuotaUseNotice(
        notice_no="石编用〔2026〕9001号",
        org_id=org.org_id,
        category=Category.ADMIN,
        count=2,
        valid_until=as_of + timedelta(days=30),
        document=Document(title="用编通知单", number="石编用字〔2026〕9001号", date=as_of),
    )
    issued = await client.result(await client.send(notice))
    assert issued.type == CommandCompleted.TYPE, issued.data

    path = tmp_path / "people.csv"
    rows = [
        {**r, "单位ID": str(org.org_id), "用编通知单号": notice.notice_no, "入编日期": str(as_of)}
        for r in [*GOOD, BAD[0]]
    ]
    fill_template(path, rows)
    argv = ["import", "people", str(path), "--region", "130127", "--actor", "li.na"]
    argv += ["--roles", "clerk", "--broker", client.bootstrap, "--timeout", "60"]
    async with serve(quota_and_roster.app) as quota_url:
        # The notice is checked against quota's books over its query API: two places, two rows.
        first = await asyncio.to_thread(bianzhi, *argv, "--quota-url", quota_url)
        assert "用编通知单核对：1 张，名额够用" in first.stdout
        # Once they are enrolled, the notice has no place left, and the check says so.
        dry = await asyncio.to_thread(bianzhi, *argv, "--quota-url", quota_url, "--dry-run")
    assert f"2、3\t{notice.notice_no}\t用编通知单剩余 0 个名额，本文件有 2 行使用" in dry.stdout
    # And it names the org's notices with places left today: not this one any more.
    said = dry.stdout.splitlines()
    header = said.index("可用的用编通知单（quota 当前账目，供修改以上各行）：")
    instead = said[header + 1]
    assert f"（{org.org_id}）的行政编制：" in instead and notice.notice_no not in instead
    assert first.returncode == 1, first.stderr  # one row failed the check
    out = tmp_path / "people.result.csv"
    with out.open(encoding="utf-8-sig", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["姓名"], r["结果"], r["原因代码"]) for r in table] == [
        ("张伟", "成功", ""),
        ("李娜", "成功", ""),
        ("王强", "失败", "invalid_citizen_id"),
    ]
    person_ids = [r["person_id"] for r in table[:2]]
    assert all(uuid.UUID(p) for p in person_ids) and len(set(person_ids)) == 2
    first_text = out.read_text(encoding="utf-8-sig")

    again = await asyncio.to_thread(bianzhi, *argv)
    assert again.returncode == 1, again.stderr
    # With --broker and no --quota-url, which platform's quota to ask is not known.
    assert "用编通知单未核对：没有找到运行中的平台" in again.stdout
    assert out.read_text(encoding="utf-8-sig") == first_text  # same results, same person_ids
    transport = httpx.ASGITransport(app=quota_and_roster.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://quota") as api:
        body = (await api.get(f"/orgs/{org.org_id}/establishment")).json()
    (admin,) = [row for row in body["categories"] if row["category"] == "admin"]
    assert (admin["occupied"], admin["reserved"]) == (2, 0)  # two people, enrolled once

    # A notice of one place, and a file of three new people on it: the place goes to the first
    # row of the file, the rows after it being sent only once it has its answer.
    one = notice.model_copy(update={"notice_no": "石编用〔2026〕9002号", "count": 1})
    issued = await client.result(await client.send(one))
    assert issued.type == CommandCompleted.TYPE, issued.data
    crowded = tmp_path / "crowded.csv"
    newcomers = [
        row(name, identifiers.compose_citizen_id("130127", date(1985 + i, 1, 1), 1))
        for i, name in enumerate(["周一", "吴二", "郑三"])
    ]
    fill_template(
        crowded,
        [
            {**r, "单位ID": str(org.org_id), "用编通知单号": one.notice_no, "入编日期": str(as_of)}
            for r in newcomers
        ],
    )
    argv[2] = str(crowded)
    async with serve(quota_and_roster.app) as quota_url:
        done = await asyncio.to_thread(bianzhi, *argv, "--quota-url", quota_url)
    assert done.returncode == 1, done.stderr  # two rows refused
    assert "名额按文件顺序分配，第 3、4 行等其余各行有了答复再发送" in done.stdout
    assert f"{one.notice_no}（剩余 1 个名额，有效期至 {one.valid_until}）" in done.stdout
    with (tmp_path / "crowded.result.csv").open(encoding="utf-8-sig", newline="") as handle:
        outcomes = [(r["姓名"], r["结果"], r["原因代码"]) for r in csv.DictReader(handle)]
    assert outcomes == [
        ("周一", "成功", ""),
        ("吴二", "失败", "notice_exhausted"),
        ("郑三", "失败", "notice_exhausted"),
    ]
