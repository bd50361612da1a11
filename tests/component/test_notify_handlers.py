"""The notify service without Kafka (SQLite and PostgreSQL): commands go into its command
consumer, other services' events into its event consumers, as if they came off their topics.
The delivery worker is driven round by round with a scripted sender; the relay does not run,
so what notify would publish stays in the outbox, where it is checked."""

from __future__ import annotations

import base64
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from contracts.base import Event
from contracts.codes import Category, OrgKind, OrgStatus
from contracts.common import Document
from contracts.envelope import CONTENT_TYPE, Envelope
from contracts.notify import Subscribe, Unsubscribe
from contracts.orgs import OrgRegistered, OrgRenamed
from contracts.quota import QuotaApproved
from contracts.topics import NOTIFY_EVENTS, ORGS_EVENTS, QUOTA_EVENTS
from services.notify.adapters.orm import deliveries, subscriptions
from services.notify.adapters.secrets import SecretBox, SecretKeyError
from services.notify.adapters.webhook import Attempt
from services.notify.bootstrap import build
from services.notify.domain.model import Outcome
from services.notify.settings import NotifySettings
from services.runtime.app import ServiceRuntime
from services.runtime.events import EventConsumer
from services.runtime.messaging import RawMessage, event_routes
from tests.component.test_orgs_handlers import (
    COMPLETED,
    REJECTED,
    DeadLetters,
    count,
    envelope,
    outbox,
    process,
    result,
    stored_results,
)
from tests.conftest import service_settings
from tests.support.sql import recorded, uncached

ADMIN = {"actorid": "wang.fang", "actorregion": "130100", "actorroles": "admin"}
SECRET = "whsec-0123456789abcdef"
KEY = base64.b64encode(bytes(range(32))).decode()
DOC = Document(title="关于设立机构的批复", number="冀编〔2026〕1号", date=date(2026, 1, 5))
_offsets = itertools.count()


@pytest.fixture
async def notify(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    monkeypatch.setenv("BIANZHI_NOTIFY_DATABASE_URL", db_url)
    rt = build(
        service_settings(tmp_path, "localhost:1"),
        NotifySettings(
            max_attempts=3, backoff_initial_s=0.001, backoff_max_s=0.002, secrets_key=KEY
        ),
    )
    rt.command_consumer.dead_letter = DeadLetters()
    await rt.migrate()
    try:
        yield rt
    finally:
        await rt.engine.dispose()
        await rt.read_engine.dispose()


@pytest.fixture
def feeds(notify: ServiceRuntime) -> dict[str, EventConsumer]:
    """The consumers the runtime subscribes to the other services' events topics."""
    return {
        sub.topic: EventConsumer(
            routes=event_routes(sub.routes),
            service="notify",
            consumer=f"notify<-{sub.topic}",
            uow_factory=notify.uow,
            dead_letter=DeadLetters(),
        )
        for sub in notify.definition.event_subscriptions
    }


class ScriptedSender:
    """Stands in for the webhook sender: answers each POST with the next scripted outcome."""

    def __init__(self, *answers: Attempt) -> None:
        self.answers = list(answers)
        self.posts: list[dict[str, Any]] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def post(self, *, url: str, secret: str, event_id: str, body: bytes) -> Attempt:
        self.posts.append({"url": url, "secret": secret, "event_id": event_id, "body": body})
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


# --- helpers ------------------------------------------------------------------------------


def subscribe(**kw: Any) -> Subscribe:
    fields: dict[str, Any] = {
        "subscription_id": uuid.uuid4(),
        "subscriber": "石家庄市财政局",
        "event_types": ["bianzhi.orgs.*"],
        "division_code": "130100",
        "channel": {"kind": "webhook", "url": "https://finance.example/hook", "secret": SECRET},
    }
    fields.update(kw)
    return Subscribe.model_validate(fields)


async def command(rt: ServiceRuntime, payload: Any, **actor: str) -> Envelope:
    env = envelope(payload, **{**ADMIN, **actor})
    return await result(rt, await process(rt, env))


async def subscribed(rt: ServiceRuntime, actorregion: str = "130100", **kw: Any) -> uuid.UUID:
    cmd = subscribe(**kw)
    res = await command(rt, cmd, actorregion=actorregion)
    assert res.type == COMPLETED, res.data
    return cmd.subscription_id


async def in_two_cities(rt: ServiceRuntime, event_types: list[str]) -> tuple[uuid.UUID, uuid.UUID]:
    """Subscriptions to ``event_types`` in 石家庄 (130100) and in 唐山 (130200)."""
    city = await subscribed(rt, event_types=event_types, division_code="130100")
    other_city = await subscribed(
        rt, event_types=event_types, division_code="130200", actorregion="130000"
    )
    return city, other_city


async def registered_org(feeds: dict[str, EventConsumer]) -> uuid.UUID:
    """An org notify learns was registered in 长安区 (130102, in 130100)."""
    org_id = uuid.uuid4()
    await feed(feeds, ORGS_EVENTS, org_registered("130102", org_id))
    return org_id


async def rejected(rt: ServiceRuntime, payload: Any, code: str, **actor: str) -> dict[str, Any]:
    res = await command(rt, payload, **actor)
    assert res.type == REJECTED, res.data
    assert res.data["code"] == code, res.data
    stored = await stored_results(rt, res.data["command_id"])
    assert [(r.result_type, r.code) for r in stored] == [(REJECTED, code)]
    return res.data


async def feed(feeds: dict[str, EventConsumer], topic: str, event: Event, **kw: Any) -> Envelope:
    env = event.envelope(source="/elsewhere", actorid="li.na", actorregion="130000", **kw)
    await feeds[topic].process(
        RawMessage(
            topic=topic,
            partition=0,
            offset=next(_offsets),
            key=(env.subject or env.id).encode(),
            value=env.to_bytes(),
            headers=(("content-type", CONTENT_TYPE.encode()),),
        )
    )
    return env


def org_registered(division_code: str = "130102", org_id: uuid.UUID | None = None) -> Event:
    return OrgRegistered(
        org_id=org_id or uuid.uuid4(),
        name="石家庄市长安区财政局",
        kind=OrgKind.ORGAN,
        division_code=division_code,
        status=OrgStatus.ACTIVE,
        document=DOC,
        effective_date=DOC.date,
    )


def quota_approved(org_id: uuid.UUID, approved: int = 10) -> QuotaApproved:
    """Quota's event for ``approved`` admin places of ``org_id`` (one more than before)."""
    return QuotaApproved.model_validate(
        {
            "org_id": str(org_id),
            "category": Category.ADMIN.value,
            "approved": approved,
            "previous_approved": approved - 1,
            "document": DOC.model_dump(mode="json"),
            "effective_date": DOC.date.isoformat(),
        }
    )


def quota_raw(event: Event) -> RawMessage:
    """``event`` as a record of quota's events topic."""
    env = event.envelope(source="/quota", actorid="li.na", actorregion="130000")
    return RawMessage(
        topic=QUOTA_EVENTS,
        partition=0,
        offset=next(_offsets),
        key=env.id.encode(),
        value=env.to_bytes(),
    )


async def delivery_rows(rt: ServiceRuntime, subscription_id: uuid.UUID) -> list[Any]:
    async with rt.sessions() as session:
        query = select(deliveries).where(deliveries.c.subscription_id == str(subscription_id))
        return list((await session.execute(query)).all())


def http(rt: ServiceRuntime) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.app), base_url="http://t")


# --- commands -----------------------------------------------------------------------------


async def test_subscribe_stores_the_secret_and_announces_the_subscription_without_it(
    notify: ServiceRuntime,
) -> None:
    sid = await subscribed(notify)
    async with notify.sessions() as session:
        row = (
            await session.execute(
                select(subscriptions).where(subscriptions.c.subscription_id == str(sid))
            )
        ).one()
    assert (row.status, row.channel_kind) == ("active", "webhook")
    # Sealed at rest (AES-GCM, bound to the subscription), and it opens with the key.
    assert row.secret.startswith("aesgcm1:") and SECRET not in row.secret
    box = SecretBox(base64.b64decode(KEY))
    assert box.open(row.secret, subscription_id=str(sid)) == SECRET
    with pytest.raises(SecretKeyError):
        box.open(row.secret, subscription_id=str(uuid.uuid4()))
    (created,) = await outbox(notify, topic=NOTIFY_EVENTS)
    assert created.key == str(sid)
    assert created.message_type == "bianzhi.notify.SubscriptionCreated.v1"
    assert SECRET.encode() not in created.value
    data = json.loads(created.value)["data"]
    assert data["channel"] == {"kind": "webhook", "url": "https://finance.example/hook"}
    assert data["division_code"] == "130100"


async def test_unsubscribe_removes_and_announces(notify: ServiceRuntime) -> None:
    sid = await subscribed(notify)
    res = await command(notify, Unsubscribe(subscription_id=sid))
    assert res.type == COMPLETED, res.data
    assert await count(notify, subscriptions, subscriptions.c.status == "removed") == 1
    removed = await outbox(notify, message_type="bianzhi.notify.SubscriptionRemoved.v1")
    assert [r.key for r in removed] == [str(sid)]


async def test_only_admins_manage_subscriptions(notify: ServiceRuntime) -> None:
    data = await rejected(notify, subscribe(), "forbidden", actorroles="approver")
    assert data["details"]["required_role"] == "admin"
    sid = await subscribed(notify)
    await rejected(notify, Unsubscribe(subscription_id=sid), "forbidden", actorroles="clerk")
    assert await count(notify, subscriptions, subscriptions.c.status == "active") == 1


async def test_a_subscription_must_lie_inside_the_actors_region(notify: ServiceRuntime) -> None:
    # 唐山市 (130200) is not inside 石家庄市 (130100), nor is the whole province.
    await rejected(notify, subscribe(division_code="130200"), "forbidden")
    await rejected(notify, subscribe(division_code="130000"), "forbidden")
    sid = await subscribed(notify, division_code="130102")
    await rejected(notify, Unsubscribe(subscription_id=sid), "forbidden", actorregion="130200")
    assert await count(notify, subscriptions) == 1


async def test_unknown_and_repeated_subscriptions_are_refused(notify: ServiceRuntime) -> None:
    await rejected(notify, Unsubscribe(subscription_id=uuid.uuid4()), "not_found")
    sid = await subscribed(notify)
    await rejected(notify, subscribe(subscription_id=sid), "conflict")
    assert (await command(notify, Unsubscribe(subscription_id=sid))).type == COMPLETED
    await rejected(notify, Unsubscribe(subscription_id=sid), "conflict")


async def test_a_malformed_channel_is_an_invalid_message(notify: ServiceRuntime) -> None:
    from tests.component.test_orgs_handlers import raw_envelope

    data = subscribe().model_dump(mode="json")
    data["channel"]["secret"] = "Tiny9Key"
    env = raw_envelope(Subscribe.TYPE, data, **ADMIN)
    res = await result(notify, await process(notify, env))
    assert (res.type, res.data["code"]) == (REJECTED, "invalid_message")
    assert "Tiny9Key" not in json.dumps(res.data)


# --- fan-out ------------------------------------------------------------------------------


async def test_events_are_queued_for_matching_subscriptions_in_their_region(
    notify: ServiceRuntime, feeds: dict[str, EventConsumer]
) -> None:
    city, other_city = await in_two_cities(notify, ["bianzhi.orgs.*"])
    quota_only = await subscribed(notify, event_types=["bianzhi.quota.*"])

    env = await feed(feeds, ORGS_EVENTS, org_registered("130102"))
    (row,) = await delivery_rows(notify, city)
    assert (row.event_id, row.event_type, row.status, row.attempts) == (
        env.id,
        env.type,
        "pending",
        0,
    )
    assert await delivery_rows(notify, other_city) == []
    assert await delivery_rows(notify, quota_only) == []


async def test_org_events_without_a_division_are_placed_by_the_org_projection(
    notify: ServiceRuntime, feeds: dict[str, EventConsumer]
) -> None:
    city, other_city = await in_two_cities(notify, ["bianzhi.*"])
    org_id = await registered_org(feeds)
    renamed = await feed(
        feeds,
        ORGS_EVENTS,
        OrgRenamed(
            org_id=org_id,
            name="石家庄市长安区财政局（新）",
            previous_name="石家庄市长安区财政局",
            document=DOC,
            effective_date=DOC.date,
        ),
    )
    approved = await feed(
        feeds,
        QUOTA_EVENTS,
        quota_approved(org_id),
    )
    ids = {r.event_id for r in await delivery_rows(notify, city)}
    assert {renamed.id, approved.id} <= ids and len(ids) == 3
    assert await delivery_rows(notify, other_city) == []


async def test_a_fetch_of_events_reads_the_subscriptions_once_and_places_only_wanted_events(
    notify: ServiceRuntime, feeds: dict[str, EventConsumer]
) -> None:
    orgs_city = await subscribed(notify, event_types=["bianzhi.orgs.*"], division_code="130100")
    quota_city = await subscribed(notify, event_types=["bianzhi.quota.*"], division_code="130100")
    org_id = await registered_org(feeds)

    def reads(table: str) -> int:
        return sum(1 for e in seen if e.reads(table))

    with recorded(notify.engine) as seen:
        await feeds[QUOTA_EVENTS].process_batch(
            [quota_raw(quota_approved(org_id, n)) for n in range(1, 6)]
        )
        # Each event is placed (one division look-up each) for the one subscription of its type.
        assert (reads("subscriptions"), reads("org_divisions")) == (1, 5)
        assert uncached(seen) == []  # the events and what is owed for them: compiled once
        assert len(await delivery_rows(notify, quota_city)) == 5
        res = await command(notify, Unsubscribe(subscription_id=quota_city))
        assert res.type == COMPLETED, res.data
        # With no subscription to quota's events, a fetch of them places nothing.
        seen.clear()
        await feeds[QUOTA_EVENTS].process_batch(
            [quota_raw(quota_approved(org_id, n)) for n in range(6, 11)]
        )
        assert (reads("subscriptions"), reads("org_divisions")) == (1, 0)
    assert len(await delivery_rows(notify, orgs_city)) == 1  # its OrgRegistered only


async def test_each_wanted_event_of_a_fetch_is_queued_for_its_subscription(
    notify: ServiceRuntime, feeds: dict[str, EventConsumer]
) -> None:
    city, elsewhere = await in_two_cities(notify, ["bianzhi.quota.*"])
    org_id = await registered_org(feeds)
    records = [quota_raw(quota_approved(org_id, n)) for n in range(1, 4)]
    await feeds[QUOTA_EVENTS].process_batch(records)
    sent = {json.loads(r.value)["id"] for r in records}
    assert {r.event_id for r in await delivery_rows(notify, city)} == sent
    assert await delivery_rows(notify, elsewhere) == []


async def test_an_event_is_queued_once_per_subscription_however_often_it_arrives(
    notify: ServiceRuntime, feeds: dict[str, EventConsumer]
) -> None:
    sid = await subscribed(notify)
    env = org_registered().envelope(source="/orgs", actorregion="130000")
    for _ in range(3):
        await feeds[ORGS_EVENTS].process(
            RawMessage(
                topic=ORGS_EVENTS,
                partition=0,
                offset=next(_offsets),
                key=env.id.encode(),
                value=env.to_bytes(),
            )
        )
    assert len(await delivery_rows(notify, sid)) == 1


async def test_removed_subscriptions_get_nothing_and_lose_what_was_owed(
    notify: ServiceRuntime, feeds: dict[str, EventConsumer]
) -> None:
    sid = await subscribed(notify)
    await feed(feeds, ORGS_EVENTS, org_registered())
    await command(notify, Unsubscribe(subscription_id=sid))
    await feed(feeds, ORGS_EVENTS, org_registered())
    (row,) = await delivery_rows(notify, sid)
    assert (row.status, row.last_error) == ("failed", "subscription removed")


# --- delivery -----------------------------------------------------------------------------


async def test_a_delivery_retries_server_errors_then_is_delivered_once(
    notify: ServiceRuntime, feeds: dict[str, EventConsumer]
) -> None:
    sender = ScriptedSender(
        Attempt(Outcome.RETRY, 503, "HTTP 503"),
        Attempt(Outcome.RETRY, None, "timeout"),
        Attempt(Outcome.DELIVERED, 200, None),
    )
    notify.worker.sender = sender  # type: ignore[attr-defined]
    sid = await subscribed(notify)
    env = await feed(feeds, ORGS_EVENTS, org_registered())
    for _ in range(50):
        await notify.worker.deliver_due()  # type: ignore[attr-defined]
        if len(sender.posts) == 3:
            break
    assert len(sender.posts) == 3
    assert {p["event_id"] for p in sender.posts} == {env.id}
    assert sender.posts[0]["secret"] == SECRET
    assert Envelope.from_bytes(sender.posts[0]["body"]).id == env.id
    (row,) = await delivery_rows(notify, sid)
    assert (row.status, row.attempts, row.last_status_code) == ("delivered", 3, 200)
    (done,) = await outbox(notify, message_type="bianzhi.notify.NotificationDelivered.v1")
    data = json.loads(done.value)
    assert data["data"]["attempts"] == 3 and data["causationid"] == env.id
    assert data["correlationid"] == env.effective_correlation_id


async def test_a_receiver_that_keeps_failing_ends_in_notification_failed(
    notify: ServiceRuntime, feeds: dict[str, EventConsumer]
) -> None:
    sender = ScriptedSender(Attempt(Outcome.RETRY, 500, "HTTP 500: down"))
    notify.worker.sender = sender  # type: ignore[attr-defined]
    sid = await subscribed(notify)
    await feed(feeds, ORGS_EVENTS, org_registered())
    for _ in range(50):
        await notify.worker.deliver_due()  # type: ignore[attr-defined]
    assert len(sender.posts) == 3  # max_attempts
    (row,) = await delivery_rows(notify, sid)
    assert (row.status, row.attempts, row.last_error) == ("failed", 3, "HTTP 500: down")
    (failed,) = await outbox(notify, message_type="bianzhi.notify.NotificationFailed.v1")
    assert json.loads(failed.value)["data"]["error"] == "HTTP 500: down"


async def test_a_client_error_fails_at_once(
    notify: ServiceRuntime, feeds: dict[str, EventConsumer]
) -> None:
    sender = ScriptedSender(Attempt(Outcome.FAILED, 404, "HTTP 404"))
    notify.worker.sender = sender  # type: ignore[attr-defined]
    sid = await subscribed(notify)
    await feed(feeds, ORGS_EVENTS, org_registered())
    for _ in range(5):
        await notify.worker.deliver_due()  # type: ignore[attr-defined]
    assert len(sender.posts) == 1
    (row,) = await delivery_rows(notify, sid)
    assert (row.status, row.attempts, row.last_status_code) == ("failed", 1, 404)
    assert len(await outbox(notify, message_type="bianzhi.notify.NotificationFailed.v1")) == 1


# --- queries ------------------------------------------------------------------------------


async def test_queries_show_a_subscription_without_its_secret_and_its_deliveries(
    notify: ServiceRuntime, feeds: dict[str, EventConsumer]
) -> None:
    sid = await subscribed(notify)
    env = await feed(feeds, ORGS_EVENTS, org_registered())
    async with http(notify) as api:
        response = await api.get(f"/subscriptions/{sid}")
        assert response.status_code == 200
        assert SECRET not in response.text and "secret" not in response.json()["channel"]
        body = response.json()
        assert body["status"] == "active" and body["event_types"] == ["bianzhi.orgs.*"]
        assert body["deliveries"] == {"pending": 1, "delivered": 0, "failed": 0}

        response = await api.get(f"/subscriptions/{sid}/deliveries")
        assert response.status_code == 200
        (item,) = response.json()["items"]
        assert (item["event_id"], item["status"], item["attempts"]) == (env.id, "pending", 0)

        assert (await api.get(f"/subscriptions/{sid}/deliveries?status=failed")).json()[
            "total"
        ] == 0
        assert (await api.get(f"/subscriptions/{uuid.uuid4()}")).status_code == 404
        assert (await api.get(f"/subscriptions/{uuid.uuid4()}/deliveries")).status_code == 404
        assert (await api.get("/subscriptions/nope")).status_code == 400
