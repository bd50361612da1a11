"""The quota guarantee through the real broker (SQLite and PostgreSQL): 200 OccupySlot requests
for 50 places, handled by two quota processes of one consumer group while the group rebalances
(the second process joins mid-way, then the first is stopped): exactly 50 occupy, 150 are
refused, and the database, the events and the results agree.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from contracts.codes import Category
from contracts.common import Document
from contracts.envelope import CONTENT_TYPE, Envelope
from contracts.quota import ApproveQuota, IssueQuotaUseNotice, OccupySlot
from contracts.topics import QUOTA_COMMANDS, QUOTA_EVENTS
from services.quota.adapters.orm import establishment, notices, slots
from services.quota.bootstrap import build
from services.quota.service_layer.rebuild import compare, live_counts, rebuild
from services.runtime.app import ServiceRuntime
from services.runtime.embedded_broker import free_port
from tests.conftest import service_settings, wait_for
from tests.support.builders import register_org
from tests.support.databases import database
from tests.support.kafka import CommandClient, read_topic

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
COMPLETED = "bianzhi.CommandCompleted.v1"
REJECTED = "bianzhi.CommandRejected.v1"
DOC = Document(title="关于核定编制的批复", number="冀编〔2026〕50号", date=date(2026, 2, 1))
NOTICE = "冀编用〔2026〕50/1号"
PLACES = 50
REQUESTS = 200


class QuotaProcess:
    """One quota service process (uvicorn, as in production) with its log file."""

    def __init__(self, name: str, env: dict[str, str], tmp_path: Path) -> None:
        self.name = name
        self.env = env
        self.port = free_port()
        self.log_path = tmp_path / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "services.quota.entrypoints.app:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )

    async def ready(self) -> None:
        async with httpx.AsyncClient(base_url=self.url) as http:

            async def up() -> bool:
                assert self.proc is not None
                if self.proc.returncode is not None:
                    raise AssertionError(f"{self.name} exited: {self.log_path.read_text()}")
                try:
                    return (await http.get("/health/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(up, timeout=60, interval=0.1)

    async def occupy_handled(self) -> float:
        """OccupySlot commands this process answered (its Prometheus counter)."""
        async with httpx.AsyncClient(base_url=self.url) as http:
            text = (await http.get("/metrics")).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("bianzhi_messages_handled_total{")
            and "OccupySlot" in line
            and ('outcome="completed"' in line or 'outcome="rejected"' in line)
        )

    async def stop(self) -> int:
        """SIGTERM: the process drains what it is handling and leaves the group."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            return await self.proc.wait()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@asynccontextmanager
async def quota_processes(
    topics: str, url: str, tmp_path: Path
) -> AsyncIterator[tuple[QuotaProcess, QuotaProcess]]:
    """Two quota processes on one database and in one consumer group (not started)."""
    env = {
        **os.environ,
        "BIANZHI_KAFKA_BOOTSTRAP": topics,
        "BIANZHI_DATA_DIR": str(tmp_path),
        "BIANZHI_QUOTA_DATABASE_URL": url,
        "BIANZHI_KAFKA_GROUP_PREFIX": f"guarantee-{uuid.uuid4().hex[:8]}",
        "BIANZHI_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "BIANZHI_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
        "BIANZHI_KAFKA_COMMAND_FETCH_MAX_WAIT_MS": "10",
        "BIANZHI_KAFKA_EVENT_FETCH_MAX_WAIT_MS": "20",
        "BIANZHI_RELAY_POLL_INTERVAL_S": "0.1",
        "BIANZHI_LOG_LEVEL": "WARNING",
    }
    first = QuotaProcess("quota-1", env, tmp_path)
    second = QuotaProcess("quota-2", env, tmp_path)
    try:
        yield first, second
    finally:
        await first.kill()
        await second.kill()


async def send_keyed_apart(client: CommandClient, env: Envelope) -> None:
    """Publish a command keyed by its request rather than its org, so the requests spread over
    every partition and both processes work on the same establishment row at the same time
    (the guard is the database's conditional update, never the ordering of one partition)."""
    await client.send_raw(
        QUOTA_COMMANDS,
        env.to_bytes(),
        key=str(env.data["request_id"]).encode(),
        headers=[("content-type", CONTENT_TYPE.encode())],
    )


async def test_200_occupy_requests_for_50_places_across_a_rebalance(
    orgs_service: ServiceRuntime,
    client: CommandClient,
    db_backend: str,
    topics: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with database(db_backend, tmp_path, "quota") as url:
        await _run(client, topics, tmp_path, monkeypatch, url)


async def _run(
    client: CommandClient,
    topics: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    url: str,
) -> None:
    async with quota_processes(topics, url, tmp_path) as (first, second):
        await first.start()
        await first.ready()

        org = register_org(name="长安区行政审批局")
        assert (await client.result(await client.send(org))).type == COMPLETED
        async with httpx.AsyncClient(base_url=first.url) as http:

            async def projected() -> bool:
                return (await http.get(f"/orgs/{org.org_id}/establishment")).status_code == 200

            await wait_for(projected, timeout=30)
        for setup in (
            ApproveQuota(
                org_id=org.org_id,
                category=Category.ADMIN,
                approved=PLACES,
                document=DOC,
                effective_date=DOC.date,
            ),
            IssueQuotaUseNotice(
                notice_no=NOTICE,
                org_id=org.org_id,
                category=Category.ADMIN,
                count=PLACES,
                valid_until=date(2099, 12, 31),
                document=DOC,
            ),
        ):
            res = await client.result(await client.send(setup))
            assert res.type == COMPLETED, res.data

        envs = [
            client.envelope(
                OccupySlot(
                    request_id=uuid.uuid4(),
                    person_id=uuid.uuid4(),
                    org_id=org.org_id,
                    category=Category.ADMIN,
                    notice_no=NOTICE,
                ),
                actorroles="clerk",
            )
            for _ in range(REQUESTS)
        ]
        # First 70 to the lone first process; the second joins while the next 60 arrive (the
        # group rebalances under load); the first is stopped during the last 70.
        await asyncio.gather(*(send_keyed_apart(client, e) for e in envs[:70]))
        await second.start()
        await asyncio.gather(*(send_keyed_apart(client, e) for e in envs[70:130]))
        await second.ready()
        await asyncio.gather(*(send_keyed_apart(client, e) for e in envs[130:165]))
        first_handled = await first.occupy_handled()
        code = await first.stop()
        assert code in (0, -signal.SIGTERM), first.log_path.read_text()
        await asyncio.gather(*(send_keyed_apart(client, e) for e in envs[165:]))

        answers = await asyncio.gather(*(client.wait_results(e.id, 1, timeout=120) for e in envs))
        second_handled = await second.occupy_handled()
        await asyncio.sleep(0.5)  # a redelivered command's repeated result, if any, arrives
        await second.stop()

    # Both processes answered OccupySlot requests.
    assert first_handled > 0 and second_handled > 0, (first_handled, second_handled)

    # Results: one outcome per command (a redelivery repeats the same result, never another).
    outcome: dict[str, str] = {}
    for env, _ in zip(envs, answers, strict=True):
        kinds = {(r.type, r.data.get("code")) for r in client.results_of(env.id)}
        assert len(kinds) == 1, (env.id, kinds)
        ((kind, code_),) = kinds
        outcome[env.id] = "completed" if kind == COMPLETED else code_
    tally = Counter(outcome.values())
    assert tally["completed"] == PLACES, tally
    assert tally["notice_exhausted"] + tally["no_vacancy"] == REQUESTS - PLACES, tally

    # Events: exactly one SlotOccupied per completed request (by event id: the relay may
    # publish a row twice after a crash, never two events for one request).
    events = {
        e.id: e
        for e in (Envelope.from_bytes(r.value) for r in await read_topic(topics, QUOTA_EVENTS))
    }
    occupied = [e for e in events.values() if e.type.endswith(".SlotOccupied.v1")]
    assert len(occupied) == PLACES
    completed_persons = {str(e.data["person_id"]) for e in envs if outcome[e.id] == "completed"}
    assert {e.data["person_id"] for e in occupied} == completed_persons
    assert sorted(e.data["occupied"] for e in occupied) == list(range(1, PLACES + 1))

    # The database agrees with the events and the results.
    monkeypatch.setenv("BIANZHI_QUOTA_DATABASE_URL", url)
    rt = build(service_settings(tmp_path, topics))
    try:
        async with rt.sessions() as session:
            est = (
                await session.execute(
                    select(
                        establishment.c.approved,
                        establishment.c.occupied,
                        establishment.c.reserved,
                    ).where(establishment.c.org_id == str(org.org_id))
                )
            ).one()
            assert tuple(est) == (PLACES, PLACES, 0)
            used = (
                await session.execute(select(notices.c.used).where(notices.c.notice_no == NOTICE))
            ).scalar_one()
            assert used == PLACES
            holders = set(
                (
                    await session.execute(
                        select(slots.c.person_id).where(slots.c.org_id == str(org.org_id))
                    )
                ).scalars()
            )
            assert holders == completed_persons
            assert (
                await session.execute(select(func.count()).select_from(slots))
            ).scalar_one() == PLACES
            # Replaying the published events rebuilds the same counts.
            ordered = sorted(events.values(), key=lambda e: e.time)
            assert compare(rebuild(ordered), await live_counts(session)) == []
    finally:
        await rt.engine.dispose()
        await rt.read_engine.dispose()
