"""Notify end to end: the real broker, a real database (SQLite and PostgreSQL), and real HTTP
receivers on a loopback port (an ASGI app served by uvicorn in this process).

An orgs event published on ``bianzhi.orgs.events.v1`` reaches a subscribed receiver, signed so
that it verifies; a receiver that answers 500 twice gets the event again until it answers 200,
and then never again."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from contracts.codes import OrgKind, OrgStatus
from contracts.common import Document
from contracts.envelope import Envelope
from contracts.notify import Subscribe
from contracts.orgs import OrgRegistered
from contracts.topics import NOTIFY_EVENTS, ORGS_EVENTS
from services.notify.bootstrap import build
from services.notify.settings import NotifySettings
from services.runtime.app import ServiceRuntime
from services.runtime.embedded_broker import free_port
from tests.conftest import service_settings, wait_for
from tests.support.databases import database
from tests.support.kafka import CommandClient, read_topic
from tests.support.lifecycle import running

pytestmark = pytest.mark.broker

COMPLETED = "bianzhi.CommandCompleted.v1"
ADMIN = {"actorid": "wang.fang", "actorregion": "130100", "actorroles": "admin"}
SECRET = "whsec-integration-0123456789"
KEY = base64.b64encode(bytes(range(32, 64))).decode()
DOC = Document(title="关于设立机构的批复", number="冀编〔2026〕1号", date=date(2026, 1, 5))


@dataclass
class Receiver:
    """A downstream department's endpoint: verifies what it gets, answers as scripted."""

    secret: str
    fail_first: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    accepted: Counter[str] = field(default_factory=Counter)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        # What a receiver does (services/notify/README.md): recompute and compare.
        expected = hmac.new(
            self.secret.encode(),
            headers["webhook-timestamp"].encode() + b"." + body,
            hashlib.sha256,
        ).hexdigest()
        verified = hmac.compare_digest(f"v1={expected}", headers["webhook-signature"])
        fresh = abs(time.time() - int(headers["webhook-timestamp"])) < 300
        self.requests.append({"headers": headers, "body": body, "verified": verified})
        status = 500 if len(self.requests) <= self.fail_first else 200
        if status == 200 and verified and fresh:
            self.accepted[headers["webhook-id"]] += 1
        else:
            status = 500 if status == 500 else 401
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


class Routes:
    def __init__(self, receivers: dict[str, Receiver]) -> None:
        self.receivers = receivers

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await self.receivers[scope["path"]](scope, receive, send)


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[str, dict[str, Receiver]]]:
    found = {"/ok": Receiver(SECRET), "/flaky": Receiver(SECRET, fail_first=2)}
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(Routes(found), host="127.0.0.1", port=port, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    await wait_for(lambda: _started(server), timeout=10)
    try:
        yield f"http://127.0.0.1:{port}", found
    finally:
        server.should_exit = True
        await task


async def _started(server: uvicorn.Server) -> bool:
    return server.started


@pytest.fixture
async def notify_service(
    topics: str, db_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    async with database(db_backend, tmp_path, "notify") as url:
        monkeypatch.setenv("BIANZHI_NOTIFY_DATABASE_URL", url)
        runtime = build(
            service_settings(tmp_path, topics),
            NotifySettings(
                webhook_timeout_s=5,
                max_attempts=5,
                backoff_initial_s=0.1,
                backoff_max_s=0.4,
                poll_interval_s=0.05,
                secrets_key=KEY,
            ),
        )
        async with running(runtime.app):
            yield runtime


async def test_orgs_events_reach_webhooks_signed_and_exactly_once_after_retries(
    notify_service: ServiceRuntime,
    client: CommandClient,
    receivers: tuple[str, dict[str, Receiver]],
) -> None:
    base, found = receivers
    subs = {}
    for path in found:
        cmd = Subscribe.model_validate(
            {
                "subscription_id": str(uuid.uuid4()),
                "subscriber": f"receiver {path}",
                "event_types": ["bianzhi.orgs.*"],
                "division_code": "130100",
                "channel": {"kind": "webhook", "url": base + path, "secret": SECRET},
            }
        )
        res = await client.result(await client.send(cmd, **ADMIN))
        assert res.type == COMPLETED, res.data
        subs[path] = cmd.subscription_id

    event = OrgRegistered(
        org_id=uuid.uuid4(),
        name="石家庄市长安区财政局",
        kind=OrgKind.ORGAN,
        division_code="130102",
        status=OrgStatus.ACTIVE,
        document=DOC,
        effective_date=DOC.date,
    )
    env = event.envelope(source="/bianzhi/orgs", actorid="li.na", actorregion="130000")
    published = time.perf_counter()
    await client.send_envelope(env, ORGS_EVENTS)

    async def delivered_to_both() -> bool:
        return all(r.accepted[env.id] == 1 for r in found.values())

    await wait_for(delivered_to_both, timeout=30)
    print(f"\nevent → both receivers accepted it: {time.perf_counter() - published:.2f}s")

    ok, flaky = found["/ok"], found["/flaky"]
    (request,) = ok.requests
    assert request["verified"]
    assert request["headers"]["content-type"] == "application/cloudevents+json"
    assert request["headers"]["webhook-id"] == env.id
    assert request["headers"]["webhook-signature"].startswith("v1=")
    received = Envelope.from_bytes(request["body"])
    assert (received.id, received.type, received.data["org_id"]) == (
        env.id,
        env.type,
        str(event.org_id),
    )
    assert SECRET.encode() not in request["body"]
    assert [r["headers"]["webhook-id"] for r in flaky.requests] == [env.id] * 3
    assert all(r["verified"] for r in flaky.requests)

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=notify_service.app), base_url="http://t"
    ) as api:

        async def settled() -> bool:
            response = await api.get(f"/subscriptions/{subs['/flaky']}/deliveries")
            items = response.json()["items"]
            return len(items) == 1 and items[0]["status"] == "delivered"

        await wait_for(settled, timeout=10)
        (item,) = (await api.get(f"/subscriptions/{subs['/flaky']}/deliveries")).json()["items"]
        assert (item["event_id"], item["attempts"], item["last_status_code"]) == (env.id, 3, 200)
        subscription = (await api.get(f"/subscriptions/{subs['/ok']}")).json()
        assert subscription["deliveries"]["delivered"] == 1
        assert SECRET not in json.dumps(subscription)

    # Nothing more arrives later: delivered means done.
    await asyncio.sleep(0.5)
    assert len(ok.requests) == 1 and len(flaky.requests) == 3

    async def announced() -> bool:
        records = await read_topic(client.bootstrap, NOTIFY_EVENTS)
        types = Counter(json.loads(r.value)["type"] for r in records)
        return types["bianzhi.notify.NotificationDelivered.v1"] == 2

    await wait_for(announced, timeout=10, interval=0.3)
    records = await read_topic(client.bootstrap, NOTIFY_EVENTS)
    delivered = [
        json.loads(r.value)
        for r in records
        if json.loads(r.value)["type"] == "bianzhi.notify.NotificationDelivered.v1"
    ]
    attempts = {d["subject"]: d["data"]["attempts"] for d in delivered}
    assert attempts == {str(subs["/ok"]): 1, str(subs["/flaky"]): 3}
    assert all(d["causationid"] == env.id for d in delivered)
