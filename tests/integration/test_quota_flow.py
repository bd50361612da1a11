"""The quota service end to end beside the orgs service: real broker, real databases (SQLite and
PostgreSQL), each service with a database of its own."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import httpx
import pytest

from contracts.codes import Category
from contracts.common import Document
from contracts.quota import ApproveQuota
from contracts.topics import QUOTA_EVENTS
from services.quota.bootstrap import build
from services.runtime.app import ServiceRuntime
from tests.conftest import service_settings, wait_for
from tests.support.builders import register_org
from tests.support.databases import database
from tests.support.kafka import CommandClient, read_topic
from tests.support.lifecycle import running

pytestmark = pytest.mark.broker

COMPLETED = "bianzhi.CommandCompleted.v1"
DOC = Document(title="关于核定编制的批复", number="冀编〔2026〕7号", date=date(2026, 2, 1))


@pytest.fixture
async def quota_service(
    topics: str, db_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    async with database(db_backend, tmp_path, "quota") as url:
        monkeypatch.setenv("BIANZHI_QUOTA_DATABASE_URL", url)
        runtime = build(service_settings(tmp_path, topics))
        async with running(runtime.app):
            yield runtime


def http(service: ServiceRuntime) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=service.app), base_url="http://t")


async def test_an_org_registered_with_orgs_gets_quota_approved_by_quota(
    orgs_service: ServiceRuntime, quota_service: ServiceRuntime, client: CommandClient
) -> None:
    org = register_org()
    registered = await client.result(await client.send(org))
    assert registered.type == COMPLETED, registered.data

    async with http(quota_service) as api:

        async def projected() -> bool:
            response = await api.get(f"/orgs/{org.org_id}/establishment")
            return response.status_code == 200

        await wait_for(projected, timeout=20)

        approve = ApproveQuota(
            org_id=org.org_id,
            category=Category.ADMIN,
            approved=12,
            document=DOC,
            effective_date=DOC.date,
        )
        res = await client.result(await client.send(approve))
        assert res.type == COMPLETED, res.data
        assert res.data["subject"] == str(org.org_id)

        body = (await api.get(f"/orgs/{org.org_id}/establishment")).json()
        assert body["division_code"] == org.division_code
        assert body["categories"] == [
            {
                "category": "admin",
                "funding": None,
                "approved": 12,
                "occupied": 0,
                "reserved": 0,
                "vacant": 12,
            }
        ]

    async def published() -> bool:
        return len(await read_topic(client.bootstrap, QUOTA_EVENTS)) == 1

    await wait_for(published, timeout=10)
    (record,) = await read_topic(client.bootstrap, QUOTA_EVENTS)
    event = json.loads(record.value)
    assert event["type"] == "bianzhi.quota.QuotaApproved.v1"
    assert event["id"] in res.data["events"]
    assert record.key == str(org.org_id).encode()
