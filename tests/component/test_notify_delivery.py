"""The notify delivery worker without Kafka (SQLite and PostgreSQL): the attempt log, the
dead-letter record and ``NotificationFailed`` after the last attempt, resending, alerts for
staffing offices, sealed secrets, and the worker as a background job of the service."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import insert, select, update

from contracts.codes import Category
from contracts.notify import ResendDelivery
from contracts.quota import OverQuotaDetected, QuotaUseNoticeExpired, RegionLimitReached
from contracts.roster import PersonReleased
from contracts.topics import NOTIFY_EVENTS, ORGS_EVENTS, QUOTA_EVENTS, ROSTER_EVENTS, dlq
from services.notify.adapters.orm import delivery_attempts, subscriptions
from services.notify.adapters.webhook import Attempt
from services.notify.domain.model import Outcome
from services.runtime.app import ServiceRuntime
from services.runtime.events import EventConsumer
from services.runtime.logging import configure_logging
from tests.component.test_notify_handlers import (
    COMPLETED,
    SECRET,
    ScriptedSender,
    command,
    delivery_rows,
    feed,
    feeds,  # noqa: F401  (fixture)
    http,
    notify,  # noqa: F401  (fixture)
    org_registered,
    outbox,
    rejected,
    subscribed,
)


@pytest.fixture
def service_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """Captures what ``capture_service_logs`` turns on; logging goes back to the real stderr
    afterwards (threads such as the SMTP server's may still log once the test is over)."""
    yield capsys
    with capsys.disabled():
        configure_logging("notify", "WARNING")


def capture_service_logs(capsys: pytest.CaptureFixture[str]) -> None:
    """The service's JSON log lines at INFO, into ``capsys`` (from now on in this test)."""
    configure_logging("notify", "INFO")
    capsys.readouterr()


async def drive(rt: ServiceRuntime, rounds: int = 20) -> None:
    for _ in range(rounds):
        await rt.worker.deliver_due()  # type: ignore[attr-defined]


async def attempt_rows(rt: ServiceRuntime, delivery_id: str) -> list[Any]:
    async with rt.sessions() as session:
        query = (
            select(delivery_attempts)
            .where(delivery_attempts.c.delivery_id == delivery_id)
            .order_by(delivery_attempts.c.resend, delivery_attempts.c.attempt)
        )
        return list((await session.execute(query)).all())


# --- the attempt log --------------------------------------------------------------------------


async def test_every_attempt_is_recorded_and_shown_never_the_secret(
    notify: ServiceRuntime,  # noqa: F811
    feeds: dict[str, EventConsumer],  # noqa: F811
    service_logs: pytest.CaptureFixture[str],
) -> None:
    notify.worker.sender = ScriptedSender(  # type: ignore[attr-defined]
        Attempt(Outcome.RETRY, 503, "HTTP 503: busy"),
        Attempt(Outcome.RETRY, None, "timeout after 10s (ReadTimeout)"),
        Attempt(Outcome.DELIVERED, 200, None),
    )
    sid = await subscribed(notify)
    env = await feed(feeds, ORGS_EVENTS, org_registered())
    capture_service_logs(service_logs)
    await drive(notify, 10)
    output = service_logs.readouterr().err
    logs = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    (row,) = await delivery_rows(notify, sid)
    attempts = await attempt_rows(notify, row.delivery_id)
    assert [(a.attempt, a.outcome, a.status_code, a.error) for a in attempts] == [
        (1, "retry", 503, "HTTP 503: busy"),
        (2, "retry", None, "timeout after 10s (ReadTimeout)"),
        (3, "delivered", 200, None),
    ]
    assert all(a.duration_ms >= 0 and a.channel_kind == "webhook" for a in attempts)
    logged = [e for e in logs if e["event"] == "delivery attempt"]
    assert [(e["attempt"], e["outcome"]) for e in logged] == [
        (1, "retry"),
        (2, "retry"),
        (3, "delivered"),
    ]
    assert all(e["event_id"] == env.id and "duration_ms" in e for e in logged)
    assert SECRET not in output

    async with http(notify) as api:
        (item,) = (await api.get(f"/subscriptions/{sid}/deliveries")).json()["items"]
        assert [(h["attempt"], h["outcome"], h["status_code"]) for h in item["history"]] == [
            (1, "retry", 503),
            (2, "retry", None),
            (3, "delivered", 200),
        ]
        one = (await api.get(f"/deliveries/{row.delivery_id}")).json()
        assert one["status"] == "delivered" and len(one["history"]) == 3
        assert (await api.get(f"/deliveries/{uuid.uuid4()}")).status_code == 404


# --- after the last attempt -------------------------------------------------------------------


async def test_the_last_attempt_ends_in_notification_failed_and_a_dead_letter_record(
    notify: ServiceRuntime,  # noqa: F811
    feeds: dict[str, EventConsumer],  # noqa: F811
) -> None:
    notify.worker.sender = ScriptedSender(  # type: ignore[attr-defined]
        Attempt(Outcome.RETRY, 502, "HTTP 502: bad gateway")
    )
    sid = await subscribed(notify)
    env = await feed(feeds, ORGS_EVENTS, org_registered())
    await drive(notify)
    (row,) = await delivery_rows(notify, sid)
    assert (row.status, row.attempts) == ("failed", 3)

    (failed,) = await outbox(notify, message_type="bianzhi.notify.NotificationFailed.v1")
    data = json.loads(failed.value)["data"]
    assert data == {
        "subscription_id": str(sid),
        "event_id": env.id,
        "event_type": env.type,
        "attempts": 3,
        "error": "HTTP 502: bad gateway",
        "delivery_id": row.delivery_id,
        "channel": "webhook",
        "status_code": 502,
    }
    (dead,) = await outbox(notify, topic=dlq(ORGS_EVENTS))
    assert dead.value == env.to_bytes()  # the original CloudEvent, as received
    assert dead.key == env.subject
    headers = dead.headers
    assert headers["x-dlq-error"] == "HTTP 502: bad gateway"
    assert headers["x-dlq-topic"] == ORGS_EVENTS
    assert headers["x-dlq-consumer"] == "notify.delivery"
    assert (headers["x-dlq-subscription-id"], headers["x-dlq-delivery-id"]) == (
        str(sid),
        row.delivery_id,
    )
    assert (headers["x-dlq-attempts"], headers["x-dlq-status-code"]) == ("3", "502")
    assert headers["x-dlq-event-id"] == env.id and headers["x-dlq-channel"] == "webhook"
    assert SECRET not in json.dumps(headers)
    # Nothing more is tried, announced or dead-lettered for it.
    await drive(notify, 5)
    assert len(notify.worker.sender.posts) == 3  # type: ignore[attr-defined]
    assert len(await outbox(notify, topic=dlq(ORGS_EVENTS))) == 1


# --- resending --------------------------------------------------------------------------------


async def test_a_failed_delivery_is_resent_from_its_first_attempt(
    notify: ServiceRuntime,  # noqa: F811
    feeds: dict[str, EventConsumer],  # noqa: F811
) -> None:
    notify.worker.sender = ScriptedSender(  # type: ignore[attr-defined]
        Attempt(Outcome.FAILED, 410, "HTTP 410: gone")
    )
    sid = await subscribed(notify)
    env = await feed(feeds, ORGS_EVENTS, org_registered())
    await drive(notify, 3)
    (row,) = await delivery_rows(notify, sid)
    assert row.status == "failed"

    # Still being attempted, unknown, or outside the actor's region: refused.
    await rejected(notify, ResendDelivery(delivery_id=uuid.uuid4()), "not_found")
    await rejected(
        notify, ResendDelivery(delivery_id=row.delivery_id), "forbidden", actorregion="130200"
    )
    await rejected(
        notify, ResendDelivery(delivery_id=row.delivery_id), "forbidden", actorroles="approver"
    )

    res = await command(notify, ResendDelivery(delivery_id=row.delivery_id))
    assert res.type == COMPLETED, res.data
    (resent,) = await outbox(notify, message_type="bianzhi.notify.DeliveryResent.v1")
    assert json.loads(resent.value)["data"] | {} == {
        "subscription_id": str(sid),
        "delivery_id": row.delivery_id,
        "event_id": env.id,
        "event_type": env.type,
        "previous_status": "failed",
        "previous_attempts": 1,
        "resends": 1,
    }
    (pending,) = await delivery_rows(notify, sid)
    assert (pending.status, pending.attempts, pending.resends) == ("pending", 0, 1)
    await rejected(notify, ResendDelivery(delivery_id=row.delivery_id), "conflict")

    notify.worker.sender = ScriptedSender(Attempt(Outcome.DELIVERED, 200, None))  # type: ignore[attr-defined]
    await drive(notify, 3)
    (done,) = await delivery_rows(notify, sid)
    assert (done.status, done.attempts, done.resends) == ("delivered", 1, 1)
    attempts = await attempt_rows(notify, row.delivery_id)
    assert [(a.resend, a.attempt, a.outcome) for a in attempts] == [
        (0, 1, "failed"),
        (1, 1, "delivered"),
    ]
    async with http(notify) as api:
        listed = (await api.get("/deliveries?status=failed")).json()
        assert listed["total"] == 0
        listed = (await api.get(f"/deliveries?subscription_id={sid}")).json()
        assert [i["delivery_id"] for i in listed["items"]] == [row.delivery_id]
        assert listed["items"][0]["subscriber"] == "石家庄市财政局"
        assert (await api.get("/deliveries?subscription_id=nope")).status_code == 400


# --- alerts -----------------------------------------------------------------------------------


async def test_alerts_go_to_the_offices_whose_division_holds_the_org(
    notify: ServiceRuntime,  # noqa: F811
    feeds: dict[str, EventConsumer],  # noqa: F811
) -> None:
    city = await subscribed(notify, event_types=["bianzhi.alerts.*"], division_code="130100")
    province = await subscribed(
        notify,
        event_types=["bianzhi.quota.OverQuotaDetected.v1"],
        division_code="130000",
        actorregion="130000",
    )
    other_city = await subscribed(
        notify, event_types=["bianzhi.alerts.*"], division_code="130200", actorregion="130000"
    )
    roster_only = await subscribed(notify, event_types=["bianzhi.roster.*"])
    org_id = uuid.uuid4()
    await feed(feeds, ORGS_EVENTS, org_registered("130102", org_id))

    over = await feed(
        feeds,
        QUOTA_EVENTS,
        OverQuotaDetected(org_id=org_id, category=Category.ADMIN, approved=10, occupied=12),
    )
    expired = await feed(
        feeds,
        QUOTA_EVENTS,
        QuotaUseNoticeExpired.model_validate(
            {"notice_no": "石编用〔2026〕7号", "org_id": str(org_id), "valid_until": "2026-03-31"}
        ),
    )
    reached = await feed(
        feeds,
        QUOTA_EVENTS,
        RegionLimitReached(
            division_code="130100",
            category=Category.ADMIN,
            limit=1000,
            used=900,
            threshold_percent=90,
        ),
    )
    # Not an alert: a subscription to alerts does not get it.
    await feed(
        feeds,
        ROSTER_EVENTS,
        PersonReleased.model_validate(
            {
                "person_id": str(uuid.uuid4()),
                "citizen_id_masked": "130102********1233",
                "org_id": str(org_id),
                "category": "admin",
                "reason": "retired",
                "effective_date": "2026-06-30",
            }
        ),
    )
    got = {r.event_id for r in await delivery_rows(notify, city)}
    assert got == {over.id, expired.id, reached.id}
    assert {r.event_id for r in await delivery_rows(notify, province)} == {over.id}
    assert await delivery_rows(notify, other_city) == []
    assert len(await delivery_rows(notify, roster_only)) == 1


# --- secrets at rest --------------------------------------------------------------------------


async def test_plaintext_secrets_are_sealed_when_the_worker_starts(
    notify: ServiceRuntime,  # noqa: F811
    feeds: dict[str, EventConsumer],  # noqa: F811
) -> None:
    sid = await subscribed(notify)
    async with notify.sessions() as session:  # as a database written before encryption
        await session.execute(
            update(subscriptions)
            .where(subscriptions.c.subscription_id == str(sid))
            .values(secret=SECRET)
        )
        await session.commit()
    sender = ScriptedSender(Attempt(Outcome.DELIVERED, 200, None))
    notify.worker.sender = sender  # type: ignore[attr-defined]
    await notify.worker.start()  # type: ignore[attr-defined]
    await notify.worker.stop()  # type: ignore[attr-defined]
    async with notify.sessions() as session:
        stored = (
            await session.execute(
                select(subscriptions.c.secret).where(subscriptions.c.subscription_id == str(sid))
            )
        ).scalar_one()
    assert stored.startswith("aesgcm1:") and SECRET not in stored
    await feed(feeds, ORGS_EVENTS, org_registered())
    await drive(notify, 2)
    assert [p["secret"] for p in sender.posts] == [SECRET]


async def test_a_secret_that_does_not_open_fails_only_its_own_deliveries(
    notify: ServiceRuntime,  # noqa: F811
    feeds: dict[str, EventConsumer],  # noqa: F811
) -> None:
    good = await subscribed(notify)
    lost = await subscribed(notify)
    async with notify.sessions() as session:  # sealed under a key this service no longer has
        await session.execute(
            update(subscriptions)
            .where(subscriptions.c.subscription_id == str(lost))
            .values(secret="aesgcm1:" + "A" * 60)
        )
        await session.commit()
    sender = ScriptedSender(Attempt(Outcome.DELIVERED, 200, None))
    notify.worker.sender = sender  # type: ignore[attr-defined]
    await feed(feeds, ORGS_EVENTS, org_registered())
    await drive(notify, 2)
    # The good subscription is served; the other one's attempt fails with the reason.
    assert [p["secret"] for p in sender.posts] == [SECRET]
    (served,) = await delivery_rows(notify, good)
    (stuck,) = await delivery_rows(notify, lost)
    assert served.status == "delivered" and stuck.status == "pending"
    tried = await attempt_rows(notify, stuck.delivery_id)
    assert tried and all(a.outcome == "retry" for a in tried)  # the key may come back
    assert all(f"subscription {lost} does not open with this key" in a.error for a in tried)


# --- the worker as a background job -----------------------------------------------------------


class SlowSender(ScriptedSender):
    """Holds each request until released, to stop the worker with one in flight."""

    def __init__(self) -> None:
        super().__init__(Attempt(Outcome.DELIVERED, 200, None))
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def post(self, *, url: str, secret: str, event_id: str, body: bytes) -> Attempt:
        self.entered.set()
        await self.release.wait()
        return await super().post(url=url, secret=secret, event_id=event_id, body=body)


async def test_the_worker_is_a_background_job_that_settles_what_is_in_flight_when_stopped(
    notify: ServiceRuntime,  # noqa: F811
    feeds: dict[str, EventConsumer],  # noqa: F811
) -> None:
    (job,) = notify.definition.background
    assert job.__name__ == "deliver_notifications"
    sender = SlowSender()
    notify.worker.sender = sender  # type: ignore[attr-defined]
    sid = await subscribed(notify)
    env = await feed(feeds, ORGS_EVENTS, org_registered())

    task = asyncio.create_task(job(notify))  # what the runtime does once the service is up
    await asyncio.wait_for(sender.entered.wait(), timeout=10)
    task.cancel()  # what the runtime does first at shutdown
    await asyncio.sleep(0.05)
    assert not task.done()  # still waiting for the attempt in flight
    sender.release.set()
    await asyncio.gather(task, return_exceptions=True)
    assert not notify.worker.running  # type: ignore[attr-defined]
    (row,) = await delivery_rows(notify, sid)
    assert (row.event_id, row.status) == (env.id, "delivered")
    assert len(await outbox(notify, message_type="bianzhi.notify.NotificationDelivered.v1")) == 1


async def test_an_attempt_on_a_removed_subscription_is_logged_but_changes_nothing(
    notify: ServiceRuntime,  # noqa: F811
    feeds: dict[str, EventConsumer],  # noqa: F811
) -> None:
    sid = await subscribed(notify)
    await feed(feeds, ORGS_EVENTS, org_registered())
    notify.worker.sender = ScriptedSender(Attempt(Outcome.RETRY, 500, "HTTP 500"))  # type: ignore[attr-defined]
    async with notify.uow() as uow:
        (claimed,) = await uow.deliveries.claim_due(limit=5, lease_until=_later())  # type: ignore[attr-defined]
        await uow.commit()
    async with notify.sessions() as session:
        await session.execute(
            insert(delivery_attempts).values(
                attempt_id=str(uuid.uuid4()),
                delivery_id=claimed.delivery_id,
                subscription_id=str(sid),
                event_id=claimed.event_id,
                attempt=0,
                resend=0,
                channel_kind="webhook",
                outcome="retry",
                status_code=None,
                error="seeded",
                duration_ms=0,
                started_at=_later(),
            )
        )
        await session.commit()
    from contracts.notify import Unsubscribe

    await command(notify, Unsubscribe(subscription_id=sid))
    await notify.worker.settle(claimed, Attempt(Outcome.FAILED, 404, "HTTP 404"))  # type: ignore[attr-defined]
    assert await outbox(notify, message_type="bianzhi.notify.NotificationFailed.v1") == []
    assert await outbox(notify, topic=dlq(ORGS_EVENTS)) == []
    assert len(await attempt_rows(notify, claimed.delivery_id)) == 2
    assert len(await outbox(notify, topic=NOTIFY_EVENTS)) == 2  # created, removed


def _later() -> Any:
    from datetime import timedelta

    from contracts.envelope import now

    return now() + timedelta(minutes=5)
