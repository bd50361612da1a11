"""The orgs service end to end: real broker, real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid
from datetime import date

import pytest

from contracts.common import Document
from contracts.orgs import RegisterOrg
from contracts.topics import ORGS_EVENTS
from tests.support.kafka import read_topic

pytestmark = pytest.mark.broker

DOC = Document(title="关于设立机构的批复", number="冀编〔2026〕1号", date=date(2026, 1, 5))


def register(org_id: uuid.UUID | None = None, **kw: object) -> RegisterOrg:
    fields: dict[str, object] = {
        "org_id": org_id or uuid.uuid4(),
        "name": "石家庄市长安区财政局",
        "kind": "organ",
        "division_code": "130102",
        "document": DOC,
    }
    fields.update(kw)
    return RegisterOrg.model_validate(fields)


async def test_register_org_completes_and_publishes_event(orgs_service, client) -> None:
    cmd = register()
    command_id = await client.send(cmd)
    result = await client.result(command_id)
    assert result.type == "bianzhi.CommandCompleted.v1", result.data
    assert result.data["subject"] == str(cmd.org_id)
    events = [r for r in await read_topic(client.bootstrap, ORGS_EVENTS)]
    assert len(events) == 1
    assert result.data["events"] == [__import__("json").loads(events[0].value)["id"]]
