"""The orgs service end to end: real broker, real database (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import date

import pytest

from contracts.common import Document
from contracts.topics import ORGS_EVENTS
from tests.support.builders import register_org as register
from tests.support.kafka import read_topic

pytestmark = pytest.mark.broker

DOC = Document(title="关于设立机构的批复", number="冀编〔2026〕1号", date=date(2026, 1, 5))


async def test_register_org_completes_and_publishes_event(orgs_service, client) -> None:
    cmd = register()
    command_id = await client.send(cmd)
    result = await client.result(command_id)
    assert result.type == "bianzhi.CommandCompleted.v1", result.data
    assert result.data["subject"] == str(cmd.org_id)
    events = [r for r in await read_topic(client.bootstrap, ORGS_EVENTS)]
    assert len(events) == 1
    assert result.data["events"] == [__import__("json").loads(events[0].value)["id"]]
