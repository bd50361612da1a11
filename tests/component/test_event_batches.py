"""A fetch of events is applied in one transaction; a bad event is set apart, not the batch
(SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from contracts.codes import OrgKind
from contracts.common import Document
from contracts.orgs import OrgRegistered, OrgRenamed
from contracts.topics import ORGS_EVENTS
from services.quota.adapters.orm import org_projection
from services.quota.bootstrap import build
from services.quota.service_layer import projection as quota_projection
from services.runtime.app import ServiceRuntime
from services.runtime.events import EventConsumer
from services.runtime.messaging import RawMessage, event_routes
from tests.component.test_orgs_handlers import DeadLetters
from tests.conftest import service_settings
from tests.support.wiring import raw

DOC = Document(title="关于设立机构的批复", number="冀编〔2026〕1号", date=date(2026, 1, 5))


@pytest.fixture
async def quota(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    monkeypatch.setenv("BIANZHI_QUOTA_DATABASE_URL", db_url)
    rt = build(service_settings(tmp_path, "localhost:1"))
    await rt.migrate()
    try:
        yield rt
    finally:
        await rt.engine.dispose()
        await rt.read_engine.dispose()


def consumer(rt: ServiceRuntime, dead: DeadLetters) -> EventConsumer:
    (sub,) = rt.definition.event_subscriptions
    return EventConsumer(
        routes=event_routes(sub.routes),
        service="quota",
        consumer=f"quota<-{sub.topic}",
        uow_factory=rt.uow,
        dead_letter=dead,
        retry_initial_s=0.01,
    )


def registered(name: str = "长安区财政局") -> tuple[uuid.UUID, RawMessage]:
    org_id = uuid.uuid4()
    event = OrgRegistered(
        org_id=org_id,
        name=name,
        kind=OrgKind.ORGAN,
        division_code="130102",
        document=DOC,
        effective_date=DOC.date,
    )
    return org_id, raw(ORGS_EVENTS, event.envelope(source="/orgs"))


async def names(rt: ServiceRuntime) -> dict[str, Any]:
    async with rt.sessions() as session:
        rows = await session.execute(select(org_projection.c.org_id, org_projection.c.name))
        return {r.org_id: r.name for r in rows}


async def test_one_fetch_is_one_transaction_in_order_with_duplicates_skipped(quota) -> None:
    dead = DeadLetters()
    units: list[Any] = []

    def counted() -> Any:
        units.append(quota.uow())
        return units[-1]

    first, first_raw = registered()
    second, second_raw = registered("长安区教育局")
    rename = raw(
        ORGS_EVENTS,
        OrgRenamed(
            org_id=first,
            name="长安区财政局（新）",
            previous_name="长安区财政局",
            document=DOC,
            effective_date=DOC.date,
        ).envelope(source="/orgs"),
    )
    batch = consumer(quota, dead)
    batch.uow_factory = counted
    await batch.process_batch([first_raw, rename, second_raw, first_raw])
    assert len(units) == 1  # four records, one unit of work
    assert await names(quota) == {str(first): "长安区财政局（新）", str(second): "长安区教育局"}
    inbox = quota.definition.tables.inbox
    async with quota.sessions() as session:
        claimed = (await session.execute(select(func.count()).select_from(inbox))).scalar_one()
    assert claimed == 3 and dead.sent == []
    # Delivered again (a redelivery after a crash): nothing changes.
    await consumer(quota, dead).process_batch([second_raw, rename])
    assert await names(quota) == {str(first): "长安区财政局（新）", str(second): "长安区教育局"}


async def test_a_failing_event_is_dead_lettered_alone_and_the_rest_applied(
    quota, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = DeadLetters()
    poisoned, poisoned_raw = registered("有问题的机构")
    fine, fine_raw = registered()
    real = quota_projection.org_registered

    async def fails_for_one(event: OrgRegistered, uow: Any, env: Any) -> None:
        if event.org_id == poisoned:
            raise ValueError("a handler bug for this one event")
        await real(event, uow, env)

    monkeypatch.setattr(quota_projection, "org_registered", fails_for_one)
    events = consumer(quota, dead)
    events.routes[OrgRegistered.TYPE] = type(events.routes[OrgRegistered.TYPE])(
        OrgRegistered, fails_for_one
    )
    garbage = RawMessage(topic=ORGS_EVENTS, partition=0, offset=1, key=None, value=b"{not json")
    await events.process_batch([poisoned_raw, garbage, fine_raw])
    assert await names(quota) == {str(fine): "长安区财政局"}
    errors = sorted(headers["x-dlq-error"].split(":")[0] for *_, headers in dead.sent)
    assert errors == ["ValueError", "not a CloudEvents envelope"]
