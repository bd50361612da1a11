"""`bianzhi report` against running orgs and quota services: real broker, real databases
(SQLite and PostgreSQL), the query APIs served over HTTP by uvicorn."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from openpyxl import load_workbook

from contracts.base import Message
from contracts.codes import Category, Funding, LeaderPost
from contracts.common import Document
from contracts.orgs import AddInternalUnit
from contracts.quota import (
    ApproveQuota,
    IssueQuotaUseNotice,
    OccupySlot,
    SetLeaderPosts,
    SetRegionLimit,
)
from services.cli.main import main
from services.quota.bootstrap import build
from services.runtime.app import ServiceRuntime
from tests.conftest import service_settings, wait_for
from tests.support.builders import register_org
from tests.support.databases import database
from tests.support.kafka import CommandClient
from tests.support.lifecycle import running, serve

pytestmark = pytest.mark.broker

COMPLETED = "bianzhi.CommandCompleted.v1"
DOC = Document(title="关于核定编制的批复", number="冀编〔2026〕7号", date=date(2026, 2, 1))
NOTICE_DOC = Document(title="用编核准", number="冀编用〔2026〕7/1号", date=date(2026, 3, 1))


@pytest.fixture
async def quota_service(
    topics: str, db_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    async with database(db_backend, tmp_path, "quota") as url:
        monkeypatch.setenv("BIANZHI_QUOTA_DATABASE_URL", url)
        runtime = build(service_settings(tmp_path, topics))
        async with running(runtime.app):
            yield runtime


async def ok(client: CommandClient, payload: Message, **actor: str) -> None:
    res = await client.result(await client.send(payload, **actor))
    assert res.type == COMPLETED, res.data


async def bianzhi(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the `bianzhi` command (it blocks on HTTP, so in a thread); its stdout."""
    capsys.readouterr()
    status = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    assert status == 0, err
    return out


async def office(client: CommandClient, quota: ServiceRuntime) -> dict[str, Any]:
    """Three orgs in two cities of Hebei, with quota, leader posts, a notice and one slot."""
    bureau = register_org(name="长安区财政局")
    centre = register_org(
        name="长安区会计服务中心", kind="public_institution", division_code="130104"
    )
    tangshan = register_org(name="路北区财政局", division_code="130203")
    for org in (bureau, centre, tangshan):
        await ok(client, org)
    office_unit, budget_unit = uuid.uuid4(), uuid.uuid4()
    await ok(client, AddInternalUnit(org_id=bureau.org_id, unit_id=office_unit, name="办公室"))
    await ok(client, AddInternalUnit(org_id=bureau.org_id, unit_id=budget_unit, name="预算科"))

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=quota.router), base_url="http://q"
    ) as api:

        async def projected() -> bool:
            for org in (bureau, centre, tangshan):
                if (await api.get(f"/orgs/{org.org_id}/establishment")).status_code != 200:
                    return False
            return True

        await wait_for(projected, timeout=20)

    def approve(org_id: uuid.UUID, category: Category, n: int, **kw: Any) -> ApproveQuota:
        return ApproveQuota(
            org_id=org_id,
            category=category,
            approved=n,
            document=DOC,
            effective_date=DOC.date,
            **kw,
        )

    await ok(
        client,
        SetRegionLimit(
            division_code="130100",
            category=Category.ADMIN,
            limit=50,
            document=DOC,
            effective_date=DOC.date,
        ),
    )
    await ok(client, approve(bureau.org_id, Category.ADMIN, 12))
    await ok(client, approve(centre.org_id, Category.INSTITUTIONAL, 30, funding=Funding.FULL))
    await ok(client, approve(tangshan.org_id, Category.ADMIN, 5))
    await ok(client, SetLeaderPosts(org_id=bureau.org_id, principal=1, deputy=2, document=DOC))
    await ok(
        client,
        SetLeaderPosts(
            org_id=bureau.org_id, unit_id=budget_unit, principal=1, deputy=1, document=DOC
        ),
    )
    await ok(
        client,
        IssueQuotaUseNotice(
            notice_no=NOTICE_DOC.number,
            org_id=bureau.org_id,
            category=Category.ADMIN,
            count=3,
            valid_until=date(2099, 12, 31),
            document=NOTICE_DOC,
        ),
    )
    await ok(
        client,
        OccupySlot(
            request_id=uuid.uuid4(),
            person_id=uuid.uuid4(),
            org_id=bureau.org_id,
            category=Category.ADMIN,
            notice_no=NOTICE_DOC.number,
            leader_post=LeaderPost.PRINCIPAL,
        ),
        actorroles="clerk",
    )
    return {"bureau": bureau, "centre": centre, "tangshan": tangshan}


def rows_of(out: str) -> dict[tuple[str, str | None], tuple[Any, ...]]:
    body = json.loads(out)
    return {
        (r["division_code"], r["category"]): (
            r["approved"],
            r["occupied"],
            r["reserved"],
            r["vacant"],
            r["limit"],
            r["left"],
        )
        for r in body["rows"]
    }


async def test_report_establishment_and_export(
    orgs_service: ServiceRuntime,
    quota_service: ServiceRuntime,
    client: CommandClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    orgs = await office(client, quota_service)
    async with serve(orgs_service.router) as orgs_url, serve(quota_service.router) as quota_url:
        base = ["report", "establishment", "--division", "130000", "--quota-url", quota_url]
        now = rows_of(await bianzhi(capsys, *base, "--format", "json"))
        assert now == {
            ("130000", "admin"): (17, 1, 2, 14, None, None),
            ("130000", "institutional"): (30, 0, 0, 30, None, None),
            ("130100", "admin"): (12, 1, 2, 9, 50, 38),
            ("130100", "institutional"): (30, 0, 0, 30, None, None),
            ("130200", "admin"): (5, 0, 0, 5, None, None),
        }
        before = rows_of(await bianzhi(capsys, *base, "--format", "json", "--as-of", "2026-01-31"))
        assert before == {("130000", None): (0, 0, 0, 0, None, None)}
        february = rows_of(
            await bianzhi(capsys, *base, "--format", "json", "--as-of", "2026-02-28")
        )
        assert february[("130100", "admin")] == (12, 0, 0, 12, 50, 38)

        table = (await bianzhi(capsys, *base)).splitlines()
        assert table[0].startswith("河北省（130000）机构编制情况")
        assert table[1].split() == [
            "区划代码",
            "区划名称",
            "编制类别",
            "核定数",
            "实有数",
            "预留数",
            "空编数",
            "控制数",
            "余量",
        ]
        assert [line.split()[-7:] for line in table if "石家庄市  行政编制" in line] == [
            ["行政编制", "12", "1", "2", "9", "50", "38"]
        ]
        deep = await bianzhi(capsys, *base, "--depth", "2", "--format", "json")
        assert rows_of(deep)[("130102", "admin")] == (12, 1, 2, 9, None, None)
        assert rows_of(deep)[("130104", "institutional")] == (30, 0, 0, 30, None, None)

        async with httpx.AsyncClient(base_url=quota_url) as http:
            notice = await http.get("/notices", params={"notice_no": NOTICE_DOC.number})
        assert (notice.status_code, notice.json()["remaining"]) == (200, 2)

        bureau, tangshan = str(orgs["bureau"].org_id), str(orgs["tangshan"].org_id)
        notices = ["report", "notices", "--quota-url", quota_url, "--org"]
        listing = (await bianzhi(capsys, *notices, bureau)).splitlines()
        assert listing[0] == f"长安区财政局（{bureau}）的用编通知单：1 张，剩余名额 2 个"
        assert listing[3].split() == [
            NOTICE_DOC.number,
            "行政编制",
            "3",
            "1",
            "2",
            "2099-12-31",
            "有效",
        ]
        usable = json.loads(await bianzhi(capsys, *notices, bureau, "--usable", "--format", "json"))
        assert [(n["notice_no"], n["remaining"]) for n in usable["notices"]] == [
            (NOTICE_DOC.number, 2)
        ]
        other = await bianzhi(capsys, *notices, bureau, "--category", "institutional")
        assert other.strip() == f"长安区财政局（{bureau}）的用编通知单：无"
        none = await bianzhi(capsys, *notices, tangshan)
        assert none.strip() == f"路北区财政局（{tangshan}）的用编通知单：无"

        out = tmp_path / "统计" / "hebei.xlsx"
        said = await bianzhi(
            capsys,
            *("report", "export", "--division", "130000", "--out", str(out)),
            *("--orgs-url", orgs_url, "--quota-url", quota_url),
        )
        assert said.startswith(f"wrote {out}")

    book = load_workbook(out)
    assert book.sheetnames == ["表1 机构基本情况", "表2 内设机构编制和领导职数", "表3 机构编制汇总"]
    sheet1 = list(book["表1 机构基本情况"].iter_rows(min_row=3, values_only=True))
    by_name = {r[1]: r for r in sheet1}
    assert set(by_name) == {"长安区财政局", "长安区会计服务中心", "路北区财政局"}
    assert by_name["长安区财政局"][2:5] == ("机关", "130102", "长安区")
    assert by_name["长安区财政局"][8] == 2  # internal units
    assert by_name["长安区会计服务中心"][2] == "事业单位"

    sheet2 = list(book["表2 内设机构编制和领导职数"].iter_rows(min_row=3, values_only=True))
    bureau = [r for r in sheet2 if r[0] == "长安区财政局"]
    assert bureau[0] == ("长安区财政局", "（本级）", "行政编制", 12, 1, 2, 9, 1, 1, 2, 0)
    assert ("长安区财政局", "预算科", None, None, None, None, None, 1, 0, 1, 0) in bureau
    assert ("长安区财政局", "办公室", None, None, None, None, None, 0, 0, 0, 0) in bureau
    centre = [r for r in sheet2 if r[0] == "长安区会计服务中心"]
    assert centre == [("长安区会计服务中心", "（本级）", "事业编制", 30, 0, 0, 30, 0, 0, 0, 0)]

    sheet3 = list(book["表3 机构编制汇总"].iter_rows(min_row=3, values_only=True))
    assert ("130000", "河北省", "行政编制", 2, 17, 1, 2, 14, None, None) in sheet3
    assert ("130100", "石家庄市", "行政编制", 1, 12, 1, 2, 9, 50, 38) in sheet3
    assert ("130200", "唐山市", "行政编制", 1, 5, 0, 0, 5, None, None) in sheet3
    assert len(orgs) == 3


async def test_report_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    status = await asyncio.to_thread(
        main,
        ["report", "establishment", "--division", "130000", "--quota-url", "http://127.0.0.1:9"],
    )
    assert status == 2
    assert "cannot reach the quota query API" in capsys.readouterr().err
    status = await asyncio.to_thread(main, ["report", "establishment", "--division", "999999"])
    assert status == 2
    status = await asyncio.to_thread(
        main, ["report", "export", "--division", "130000", "--out", "x.csv"]
    )
    assert status == 2
    assert ".xlsx" in capsys.readouterr().err
    status = await asyncio.to_thread(main, ["report", "notices", "--org", "长安区财政局"])
    assert status == 2
    assert "expected an org id" in capsys.readouterr().err
