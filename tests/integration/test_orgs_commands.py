"""The orgs service through the real broker and database: commands, events, and the query API."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any

import httpx
import pytest

from contracts.base import Message
from contracts.common import Document
from contracts.envelope import Envelope
from contracts.orgs import (
    AddInternalUnit,
    MoveOrg,
    RegisterOrg,
    RemoveInternalUnit,
    RenameOrg,
    UpdateFunctions,
)
from contracts.topics import ORGS_EVENTS
from services.runtime.app import ServiceRuntime
from tests.conftest import wait_for
from tests.support.kafka import ACTOR, CommandClient, read_topic

pytestmark = pytest.mark.broker

COMPLETED = "bianzhi.CommandCompleted.v1"
REJECTED = "bianzhi.CommandRejected.v1"
CLERK = {"actorid": "wang.fang", "actorregion": "130100", "actorroles": "clerk"}


def doc(number: int, day: date) -> Document:
    return Document(title="关于机构编制事项的批复", number=f"石编〔2026〕{number}号", date=day)


def register(name: str, division_code: str, **kw: Any) -> RegisterOrg:
    return RegisterOrg.model_validate(
        {
            "org_id": uuid.uuid4(),
            "name": name,
            "kind": "organ",
            "division_code": division_code,
            "document": doc(1, date(2026, 1, 5)),
            **kw,
        }
    )


async def complete(client: CommandClient, payload: Message, **actor: str) -> Envelope:
    command_id = await client.send(payload, **actor)
    res = await client.result(command_id)
    assert res.type == COMPLETED, res.data
    assert res.data["command_id"] == command_id
    assert res.data["command_type"] == payload.TYPE
    assert res.data["subject"] == payload.subject_value()
    assert len(res.data["events"]) == 1
    return res


async def reject(client: CommandClient, payload: Message, code: str, **actor: str) -> Envelope:
    command_id = await client.send(payload, **actor)
    res = await client.result(command_id)
    assert res.type == REJECTED, res.data
    assert res.data["code"] == code, res.data
    return res


async def events_of(client: CommandClient, org_id: uuid.UUID, count: int) -> list[Envelope]:
    """The events of one org on the events topic, once ``count`` of them have arrived."""
    found: list[Envelope] = []

    async def arrived() -> bool:
        records = await read_topic(client.bootstrap, ORGS_EVENTS)
        found[:] = [Envelope.from_bytes(r.value) for r in records if r.key == str(org_id).encode()]
        return len(found) >= count

    await wait_for(arrived, timeout=10)
    return found


def http(service: ServiceRuntime) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=service.app), base_url="http://t")


async def get(api: httpx.AsyncClient, path: str, expect: int = 200, /, **params: Any) -> Any:
    response = await api.get(path, params=params)
    assert response.status_code == expect, (path, params, response.text)
    assert response.headers["content-type"] == "application/json"
    return response.json()


async def names(api: httpx.AsyncClient, **params: Any) -> list[str]:
    body = await get(api, "/orgs", **params)
    assert body["total"] == len(body["items"])
    return [item["name"] for item in body["items"]]


async def test_the_life_of_an_org_on_the_wire_and_in_the_query_api(orgs_service, client) -> None:
    city = register("石家庄市人民政府", "130100", alt_names=["石家庄市政府", "SJZ Gov"])
    ndrc = register("石家庄市发展和改革委员会", "130100")
    child = register("石家庄市长安区财政局", "130102", parent_org_id=city.org_id, grade="正科级")
    await complete(client, city)
    await complete(client, ndrc)
    registered_res = await complete(client, child)

    unit_a, unit_b = uuid.uuid4(), uuid.uuid4()
    steps: list[tuple[Message, dict[str, str]]] = [
        (
            RenameOrg(
                org_id=child.org_id,
                name="石家庄市长安区财政局（国资办）",
                alt_names=["长安区国资办", "长安区财政局", "长安区国资办"],
                document=doc(2, date(2026, 2, 1)),
                effective_date=date(2026, 2, 10),
            ),
            {},
        ),
        (
            UpdateFunctions(
                org_id=child.org_id,
                functions=["编制区级预算", "管理国有资产"],
                document=doc(3, date(2026, 3, 1)),
            ),
            CLERK,
        ),
        (
            AddInternalUnit(
                org_id=child.org_id,
                unit_id=unit_a,
                name="预算股",
                effective_date=date(2026, 3, 5),
            ),
            CLERK,
        ),
        (
            AddInternalUnit(
                org_id=child.org_id,
                unit_id=unit_b,
                name="国库股",
                document=doc(4, date(2026, 3, 6)),
            ),
            CLERK,
        ),
        (
            RemoveInternalUnit(
                org_id=child.org_id, unit_id=unit_a, effective_date=date(2026, 4, 1)
            ),
            CLERK,
        ),
        (
            MoveOrg(
                org_id=child.org_id,
                parent_org_id=ndrc.org_id,
                document=doc(5, date(2026, 5, 1)),
            ),
            {},
        ),
    ]
    command_ids: list[str] = [registered_res.data["command_id"]]
    actors: list[dict[str, str]] = [ACTOR]
    results: list[Envelope] = [registered_res]
    for payload, actor in steps:
        res = await complete(client, payload, **actor)
        command_ids.append(res.data["command_id"])
        actors.append({**ACTOR, **actor})
        results.append(res)

    # --- the events topic: the org's events in order, each tied to its command ---------------
    events = await events_of(client, child.org_id, 7)
    assert [e.type.split(".")[2] for e in events] == [
        "OrgRegistered",
        "OrgRenamed",
        "OrgFunctionsUpdated",
        "InternalUnitAdded",
        "InternalUnitAdded",
        "InternalUnitRemoved",
        "OrgMoved",
    ]
    for event, command_id, actor, res in zip(events, command_ids, actors, results, strict=True):
        assert res.data["events"] == [event.id]
        assert event.subject == str(child.org_id)
        assert event.correlationid == command_id
        assert event.causationid == command_id
        assert (event.actorid, event.actorregion, event.actorroles) == (
            actor["actorid"],
            actor["actorregion"],
            actor["actorroles"],
        )
    registered, renamed, functions, _, _, removed, moved = events
    assert registered.data["parent_org_id"] == str(city.org_id)
    assert renamed.data["previous_name"] == "石家庄市长安区财政局"
    assert renamed.data["alt_names"] == ["长安区国资办", "长安区财政局"]
    assert functions.data["functions"] == ["编制区级预算", "管理国有资产"]
    assert removed.data["name"] == "预算股"  # the removed unit's name comes from the org
    assert moved.data["previous_parent_org_id"] == str(city.org_id)
    assert moved.data["parent_org_id"] == str(ndrc.org_id)

    async with http(orgs_service) as api:
        # --- one org ---------------------------------------------------------------------
        org = await get(api, f"/orgs/{child.org_id}")
        assert org["org_id"] == str(child.org_id)
        assert org["name"] == "石家庄市长安区财政局（国资办）"
        assert org["alt_names"] == ["长安区国资办", "长安区财政局"]
        assert org["functions"] == ["编制区级预算", "管理国有资产"]
        assert org["units"] == [{"unit_id": str(unit_b), "name": "国库股"}]
        assert org["parent"] == {
            "org_id": str(ndrc.org_id),
            "name": "石家庄市发展和改革委员会",
            "status": "active",
        }
        assert org["parent_org_id"] == str(ndrc.org_id)
        assert (org["status"], org["kind"], org["grade"]) == ("active", "organ", "正科级")
        assert (org["division_code"], org["division_name"]) == ("130102", "长安区")
        assert org["version"] == 7
        assert (await get(api, f"/orgs/{ndrc.org_id}"))["children"] == 1
        city_view = await get(api, f"/orgs/{city.org_id}")
        assert (city_view["children"], city_view["parent"]) == (0, None)

        # --- searching -------------------------------------------------------------------
        everything = [
            "石家庄市人民政府",
            "石家庄市发展和改革委员会",
            "石家庄市长安区财政局（国资办）",
        ]
        assert sorted(await names(api, division_code="130100", include_sub="true")) == sorted(
            everything
        )
        assert await names(api, division_code="130000", include_sub="1") != []
        assert await names(api, division_code="130102") == ["石家庄市长安区财政局（国资办）"]
        assert sorted(await names(api, division_code="130100")) == sorted(everything[:2])
        assert await names(api, division_code="130200", include_sub="true") == []
        assert await names(api, q="财政") == ["石家庄市长安区财政局（国资办）"]
        assert await names(api, q="长安区国资办") == ["石家庄市长安区财政局（国资办）"]  # alt name
        assert await names(api, q="石家庄市政府") == ["石家庄市人民政府"]  # alt name only
        assert await names(api, q="%") == []  # LIKE wildcards are matched literally
        assert await names(api, q="_") == []
        assert await names(api, q="sjz GOV") == ["石家庄市人民政府"]  # case-insensitive on both
        assert len(await names(api, kind="organ")) == 3
        assert await names(api, kind="public_institution") == []
        assert await names(api, parent_org_id=str(ndrc.org_id)) == [everything[2]]
        assert len(await names(api, status="active")) == 3

        full = await get(api, "/orgs", division_code="130100", include_sub="true")
        page = await get(
            api, "/orgs", division_code="130100", include_sub="true", limit=1, offset=1
        )
        assert (page["total"], page["limit"], page["offset"]) == (3, 1, 1)
        assert page["items"] == full["items"][1:2]
        past = await get(api, "/orgs", limit=2, offset=3)
        assert (past["total"], past["items"]) == (3, [])

        for bad in (
            {"limit": "0"},
            {"limit": "501"},
            {"limit": "ten"},
            {"offset": "-1"},
            {"division_code": "130100", "include_sub": "maybe"},
            {"include_sub": "maybe"},
            {"parent_org_id": "not-a-uuid"},
            {"kind": "ministry"},
            {"status": "sleeping"},
            {"division_code": "999999"},
        ):
            error = await get(api, "/orgs", 400, **bad)
            assert error["error"] in ("invalid_query", "unknown_division"), error

        # --- unknown and malformed ids -----------------------------------------------------
        missing = uuid.uuid4()
        assert (await get(api, f"/orgs/{missing}", 404))["error"] == "not_found"
        assert (await get(api, f"/orgs/{missing}/history", 404))["error"] == "not_found"
        assert (await get(api, "/orgs/not-a-uuid", 400))["error"] == "invalid_path"
        assert (await get(api, "/orgs/not-a-uuid/history", 400))["error"] == "invalid_path"

        # --- history ---------------------------------------------------------------------
        history = await get(api, f"/orgs/{child.org_id}/history")
        changes_seen = history["changes"]
        assert [c["event_id"] for c in changes_seen] == [e.id for e in events]
        assert [c["command_id"] for c in changes_seen] == command_ids
        assert [(c["document"] or {}).get("number") for c in changes_seen] == [
            "石编〔2026〕1号",
            "石编〔2026〕2号",
            "石编〔2026〕3号",
            None,
            "石编〔2026〕4号",
            None,
            "石编〔2026〕5号",
        ]
        assert [c["effective_date"] for c in changes_seen] == [
            "2026-01-05",  # the document's date
            "2026-02-10",  # explicit, later than the document
            "2026-03-01",
            "2026-03-05",
            "2026-03-06",
            "2026-04-01",
            "2026-05-01",
        ]
        assert [c["actor_id"] for c in changes_seen] == [
            "zhang.wei",
            "zhang.wei",
            *["wang.fang"] * 4,
            "zhang.wei",
        ]
        assert changes_seen[1]["type"] == "bianzhi.orgs.OrgRenamed.v1"
        assert changes_seen[1]["data"]["name"] == "石家庄市长安区财政局（国资办）"
        assert changes_seen[1]["document"] == doc(2, date(2026, 2, 1)).model_dump(mode="json")


async def test_refusals_change_nothing_and_the_operational_endpoints(orgs_service, client) -> None:
    city = register("石家庄市人民政府", "130100")
    district = register("石家庄市长安区人民政府", "130102", parent_org_id=city.org_id)
    await complete(client, city)
    await complete(client, district)
    before = await events_of(client, district.org_id, 1) + await events_of(client, city.org_id, 1)

    # cycles: the city under its own child, and the district under its own child
    up = MoveOrg(org_id=city.org_id, parent_org_id=district.org_id, document=doc(9, date.today()))
    await reject(client, up, "conflict")
    office = register("长安区人民政府办公室", "130102", parent_org_id=district.org_id)
    await complete(client, office)
    cycle = MoveOrg(
        org_id=district.org_id, parent_org_id=office.org_id, document=doc(10, date.today())
    )
    res = await reject(client, cycle, "conflict")
    assert res.data["details"] == {
        "org_id": str(district.org_id),
        "parent_org_id": str(office.org_id),
    }

    # outside the actor's region: 唐山 may not touch 石家庄's orgs
    rename = RenameOrg(org_id=district.org_id, name="改名", document=doc(11, date.today()))
    res = await reject(client, rename, "forbidden", actorregion="130200")
    assert res.data["details"] == {"division_code": "130102", "actor_region": "130200"}
    assert (res.actorid, res.actorregion) == (ACTOR["actorid"], "130200")

    async with http(orgs_service) as api:
        for org, parent, version in ((city, None, 1), (district, city.org_id, 1)):
            view = await get(api, f"/orgs/{org.org_id}")
            assert view["parent_org_id"] == (str(parent) if parent else None)
            assert view["version"] == version
            assert view["name"] == org.name
            history = await get(api, f"/orgs/{org.org_id}/history")
            assert len(history["changes"]) == 1

        after = await events_of(client, district.org_id, 1) + await events_of(
            client, city.org_id, 1
        )
        assert [e.id for e in after] == [e.id for e in before]

        # --- the operational endpoints -----------------------------------------------------
        assert await get(api, "/health/live") == {"live": True}
        assert await get(api, "/health/ready") == {
            "ready": True,
            "broker": True,
            "database": True,
            "relay": True,
        }
        metrics = await api.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert "bianzhi_messages_handled_total" in metrics.text
        asyncapi = await api.get("/docs/asyncapi")
        assert asyncapi.status_code == 200
        assert "bianzhi.orgs.commands.v1" in asyncapi.text
        assert (await api.get("/docs/asyncapi/try")).status_code == 404
        assert (await api.post("/docs/asyncapi/try", json={})).status_code == 404
