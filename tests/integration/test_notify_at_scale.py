"""Notify under load and from an operator's seat, end to end: the real broker, a real database
(SQLite and PostgreSQL), real HTTP receivers on a loopback port (ASGI apps served by uvicorn in
this process).

- 1,000 events to 10 subscriptions, one of whose receivers is dead: the nine others (served
  by a process of their own) get every event exactly once by id, signed; the dead one's
  deliveries end failed, each announced by ``NotificationFailed`` and dead-lettered.
- ``bianzhi deliveries`` lists a failed delivery from notify's query API, and ``--resend``
  makes notify deliver it again once its receiver is back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select

from contracts.codes import OrgKind, OrgStatus
from contracts.envelope import CONTENT_TYPE
from contracts.notify import Subscribe
from contracts.orgs import OrgRegistered
from contracts.topics import NOTIFY_EVENTS, ORGS_EVENTS, dlq
from services.cli.main import main as bianzhi
from services.notify.adapters.orm import deliveries
from services.notify.bootstrap import build
from services.notify.domain.model import verify
from services.notify.settings import NotifySettings
from services.runtime.app import ServiceRuntime
from services.runtime.embedded_broker import free_port
from tests.conftest import service_settings, wait_for
from tests.integration.test_notify_webhooks import DOC, SECRET, Receiver, Routes
from tests.support.databases import database
from tests.support.kafka import CommandClient, read_topic
from tests.support.lifecycle import running
from tests.support.net import free_ports, refused_port

pytestmark = pytest.mark.broker

COMPLETED = "bianzhi.CommandCompleted.v1"
ADMIN = {"actorid": "wang.fang", "actorregion": "130100", "actorroles": "admin"}
KEY = base64.b64encode(b"k" * 32).decode()
ROOT = Path(__file__).resolve().parents[2]
EVENTS = 1_000
SUBSCRIPTIONS = 10


class CountingReceivers:
    """Many receivers behind one server (``/r0``, ``/r1``, …): each verifies the signature
    and counts the event ids it accepted; ``GET /stats`` tells what every path accepted."""

    def __init__(self) -> None:
        self.accepted: dict[str, Counter[str]] = {}
        self.unverified = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] == "GET":
            stats = {"accepted": self.accepted, "unverified": self.unverified}
            await respond(send, 200, json.dumps(stats).encode())
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        timestamp = headers.get("webhook-timestamp", "0")
        if not verify(SECRET, int(timestamp), body, headers.get("webhook-signature", "")):
            self.unverified += 1
            await respond(send, 401, b"")
            return
        self.accepted.setdefault(scope["path"], Counter())[headers["webhook-id"]] += 1
        await respond(send, 200, b"")


async def respond(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body})


def serve_receivers(port: int) -> None:
    """The receivers' own process (a second core for them, as on a real network)."""
    uvicorn.run(
        CountingReceivers(), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )


@contextlib.asynccontextmanager
async def receivers_process(port: int) -> AsyncIterator[str]:
    root = ROOT
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        f"from tests.integration.test_notify_at_scale import serve_receivers; "
        f"serve_receivers({port})",
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    base = f"http://127.0.0.1:{port}"

    async def up() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            async with httpx.AsyncClient() as client:
                return (await client.get(f"{base}/stats")).status_code == 200
        return False

    try:
        await wait_for(up, timeout=30, interval=0.1)
        yield base
    finally:
        process.terminate()
        await process.wait()


@contextlib.asynccontextmanager
async def serve(app: Any, port: int) -> AsyncIterator[uvicorn.Server]:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    await wait_for(started, timeout=10)
    try:
        yield server
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def notify_running(
    topics: str, db_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any
) -> AsyncIterator[ServiceRuntime]:
    async with database(db_backend, tmp_path, "notify") as url:
        monkeypatch.setenv("BIANZHI_NOTIFY_DATABASE_URL", url)
        runtime = build(
            service_settings(tmp_path, topics),
            NotifySettings(webhook_timeout_s=5, poll_interval_s=0.05, secrets_key=KEY, **kw),
        )
        async with running(runtime.app):
            yield runtime


async def subscribe(client: CommandClient, url: str, name: str) -> uuid.UUID:
    cmd = Subscribe.model_validate(
        {
            "subscription_id": str(uuid.uuid4()),
            "subscriber": name,
            "event_types": ["bianzhi.orgs.*"],
            "division_code": "130100",
            "channel": {"kind": "webhook", "url": url, "secret": SECRET},
        }
    )
    res = await client.result(await client.send(cmd, **ADMIN))
    assert res.type == COMPLETED, res.data
    return cmd.subscription_id


def org_event() -> OrgRegistered:
    return OrgRegistered(
        org_id=uuid.uuid4(),
        name="石家庄市长安区财政局",
        kind=OrgKind.ORGAN,
        division_code="130102",
        status=OrgStatus.ACTIVE,
        document=DOC,
        effective_date=DOC.date,
    )


async def counts_by_status(runtime: ServiceRuntime) -> dict[str, int]:
    async with runtime.sessions() as session:
        rows = await session.execute(
            select(deliveries.c.status, func.count()).group_by(deliveries.c.status)
        )
        return {status: int(n) for status, n in rows.all()}


# 11,000 attempts through one process: well under a minute on an idle two-core runner, but a
# runner shared with other jobs may take several (the figures are printed with -s).
@pytest.mark.timeout(900)
async def test_a_thousand_events_reach_nine_receivers_exactly_once_despite_a_dead_one(
    topics: str,
    db_backend: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    client: CommandClient,
) -> None:
    live = [f"/r{i}" for i in range(SUBSCRIPTIONS - 1)]
    # Held to the end, so nothing listens on it (two calls of free_port once gave the
    # receivers' own port twice, and the receivers accepted the dead one's deliveries).
    with refused_port() as dead_port:
        async with (
            receivers_process(free_port()) as base,
            notify_running(
                topics,
                db_backend,
                tmp_path,
                monkeypatch,
                max_attempts=2,
                backoff_initial_s=0.05,
                backoff_max_s=0.1,
                concurrency=64,
                per_subscription_concurrency=16,
            ) as runtime,
        ):
            for path in live:
                await subscribe(client, f"{base}{path}", f"receiver {path}")
            dead = await subscribe(client, f"http://127.0.0.1:{dead_port}/gone", "dead receiver")

            envelopes = [
                org_event().envelope(source="/bianzhi/orgs", actorregion="130000")
                for _ in range(EVENTS)
            ]
            started = time.perf_counter()
            for env in envelopes:
                await client.producer.send(
                    ORGS_EVENTS,
                    env.to_bytes(),
                    key=(env.subject or env.id).encode(),
                    headers=[("content-type", CONTENT_TYPE.encode())],
                )
            await client.producer.flush()

            async def settled() -> bool:
                counts = await counts_by_status(runtime)
                return sum(counts.values()) == EVENTS * SUBSCRIPTIONS and not counts.get("pending")

            await wait_for(settled, timeout=300, interval=0.5)
            elapsed = time.perf_counter() - started
            print(
                f"\n{db_backend}: {EVENTS} events × {SUBSCRIPTIONS} subscriptions settled in "
                f"{elapsed:.1f}s ({EVENTS * (SUBSCRIPTIONS - 1) / elapsed:.0f} deliveries/s)"
            )

            ids = {env.id for env in envelopes}
            async with httpx.AsyncClient() as api:
                stats = (await api.get(f"{base}/stats")).json()
            assert stats["unverified"] == 0
            assert sorted(stats["accepted"]) == sorted(live)
            for path, accepted in stats["accepted"].items():
                assert set(accepted) == ids, path
                assert set(accepted.values()) == {1}, path  # exactly once by event id
            assert await counts_by_status(runtime) == {
                "delivered": EVENTS * (SUBSCRIPTIONS - 1),
                "failed": EVENTS,
            }

            async def announced() -> bool:
                records = await read_topic(client.bootstrap, NOTIFY_EVENTS, timeout=20)
                types = Counter(json.loads(r.value)["type"] for r in records)
                return (
                    types["bianzhi.notify.NotificationFailed.v1"] == EVENTS
                    and types["bianzhi.notify.NotificationDelivered.v1"] == EVENTS * 9
                )

            await wait_for(announced, timeout=60, interval=1)
            dead_letters = await read_topic(client.bootstrap, dlq(ORGS_EVENTS), timeout=20)
            headers = [dict(r.headers) for r in dead_letters]
            assert {h["x-dlq-subscription-id"].decode() for h in headers} == {str(dead)}
            assert {h["x-dlq-event-id"].decode() for h in headers} == ids
            assert {json.loads(r.value)["id"] for r in dead_letters} == ids


def cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = bianzhi(list(args))
    return status, out.getvalue()


async def test_the_deliveries_command_lists_a_failure_and_resends_it(
    topics: str,
    db_backend: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    client: CommandClient,
) -> None:
    receiver_port, api_port = free_ports(2)
    receiver = Receiver(SECRET)
    async with (
        notify_running(topics, db_backend, tmp_path, monkeypatch, max_attempts=1) as runtime,
        serve(runtime.app, api_port),
    ):
        sid = await subscribe(client, f"http://127.0.0.1:{receiver_port}/hook", "人社局")
        env = org_event().envelope(source="/bianzhi/orgs", actorregion="130000")
        await client.send_envelope(env, ORGS_EVENTS)

        async def failed() -> bool:
            return (await counts_by_status(runtime)).get("failed") == 1

        await wait_for(failed, timeout=30)
        url = f"http://127.0.0.1:{api_port}"
        status, listed = await asyncio.to_thread(cli, "deliveries", "--url", url)
        assert status == 0
        (line,) = listed.splitlines()
        delivery_id = line.split()[0]
        assert "failed" in line and "orgs.OrgRegistered" in line and "人社局" in line
        assert "ConnectError" in line

        status, as_json = await asyncio.to_thread(
            cli, "deliveries", "--url", url, "--json", "--subscription", str(sid)
        )
        (item,) = [json.loads(x) for x in as_json.splitlines()]
        assert (item["event_id"], item["attempts"], item["status"]) == (env.id, 1, "failed")
        assert [h["outcome"] for h in item["history"]] == ["failed"]

        async with serve(Routes({"/hook": receiver}), receiver_port):
            status, answer = await asyncio.to_thread(
                cli,
                "deliveries",
                "--resend",
                delivery_id,
                "--actor",
                "wang.fang",
                "--region",
                "130100",
                "--broker",
                topics,
            )
            assert status == 0, answer
            assert json.loads(answer)["type"] == COMPLETED

            async def delivered() -> bool:
                return receiver.accepted[env.id] == 1

            await wait_for(delivered, timeout=30)
        status, listed = await asyncio.to_thread(cli, "deliveries", "--url", url)
        assert (status, listed.strip()) == (0, "no failed deliveries")
        status, listed = await asyncio.to_thread(
            cli, "deliveries", "--url", url, "--status", "delivered"
        )
        assert delivery_id in listed
