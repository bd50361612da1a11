"""Delivery guarantees (ARCHITECTURE §4) through the real broker and real databases.

At-least-once in, exactly-once effect: redelivered commands, a relay killed between publish and
mark, rows left behind by a crash, garbage on a command topic, transient database failures that
must hold the offset, and a shutdown (SIGTERM) that drains in-flight work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import RecordMetadata
from prometheus_client import REGISTRY
from sqlalchemy import func, insert, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.common import Document
from contracts.envelope import CONTENT_TYPE, Envelope, new_id, now
from contracts.orgs import OrgRegistered, RegisterOrg
from contracts.topics import COMMAND_RESULTS, ORGS_COMMANDS, ORGS_EVENTS, dlq
from services.orgs.adapters.orm import messaging, orgs
from services.orgs.bootstrap import definition
from services.orgs.service_layer.handlers import register_org
from services.orgs.service_layer.unit_of_work import OrgsUnitOfWork
from services.runtime.app import ServiceDefinition, ServiceRuntime, build_runtime
from services.runtime.db import create_engine
from services.runtime.embedded_broker import free_port
from services.runtime.events import EventConsumer
from services.runtime.messaging import (
    CommandHandler,
    CommandRoute,
    EventRoute,
    RawMessage,
    event_routes,
)
from services.runtime.relay import OutboxRelay
from services.runtime.settings import Settings
from services.runtime.uow import outbox_row
from tests.conftest import service_settings, wait_for
from tests.support.builders import register_org as register
from tests.support.kafka import CommandClient, read_topic
from tests.support.lifecycle import running

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
DOC = Document(title="关于设立机构的批复", number="冀编〔2026〕7号", date=date(2026, 1, 5))
COMPLETED = "bianzhi.CommandCompleted.v1"
REJECTED = "bianzhi.CommandRejected.v1"


# helpers ----------------------------------------------------------------------------------------


def with_register_handler(handler: CommandHandler, **changes: Any) -> ServiceDefinition:
    """The orgs service definition with RegisterOrg handled by ``handler``."""
    base = definition()
    routes = [
        CommandRoute(r.model, handler, r.role) if r.model is RegisterOrg else r
        for r in base.command_routes
    ]
    return dataclasses.replace(base, command_routes=routes, **changes)


@asynccontextmanager
async def serving(
    settings: Settings,
    service: ServiceDefinition | None = None,
    prepare: Callable[[ServiceRuntime], None] | None = None,
) -> AsyncIterator[ServiceRuntime]:
    """A running orgs service (lifespan in its own task, as uvicorn would run it)."""
    runtime = build_runtime(service or definition(), settings)
    if prepare is not None:
        prepare(runtime)
    async with running(runtime.app):
        yield runtime


async def send_at(client: CommandClient, env: Envelope, *, key: bytes | None = None) -> Any:
    """Send a command envelope; returns the broker's record metadata (partition, offset)."""
    return await client.producer.send_and_wait(
        ORGS_COMMANDS,
        env.to_bytes(),
        key=key if key is not None else (env.subject or env.id).encode(),
        headers=[("content-type", CONTENT_TYPE.encode())],
    )


async def committed(bootstrap: str, group_id: str, tp: TopicPartition) -> int | None:
    """The group's committed offset of ``tp``, read without joining the group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return await consumer.committed(tp)
    finally:
        await consumer.stop()


def command_group(settings: Settings) -> str:
    return f"{settings.kafka_group_prefix}-orgs"


async def count(engine: AsyncEngine, table: Any, *where: Any) -> int:
    async with engine.connect() as conn:
        return int(
            (await conn.execute(select(func.count()).select_from(table).where(*where))).scalar_one()
        )


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def transient_error() -> OperationalError:
    return OperationalError(
        "INSERT INTO orgs ...", {}, ConnectionError("server closed the connection unexpectedly")
    )


def envelopes_of(records: list[Any]) -> list[Envelope]:
    return [Envelope.from_bytes(r.value) for r in records]


async def results_on_topic(bootstrap: str, command_id: str) -> list[Any]:
    return [
        r
        for r in await read_topic(bootstrap, COMMAND_RESULTS)
        if json.loads(r.value)["data"].get("command_id") == command_id
    ]


@pytest.fixture
async def orgs_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AsyncEngine]:
    """The orgs service's database (both backends), and an engine for the test's own checks."""
    monkeypatch.setenv("BIANZHI_ORGS_DATABASE_URL", db_url)
    engine = create_engine(db_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def settings(topics: str, tmp_path: Path) -> Settings:
    return service_settings(tmp_path, topics)


# 1. redelivery ----------------------------------------------------------------------------------


async def test_redelivered_command_has_one_effect(
    orgs_db: AsyncEngine, settings: Settings, client: CommandClient
) -> None:
    cmd = register()
    env = client.envelope(cmd)
    refused = client.envelope(register(division_code="110101"))  # outside the actor's region
    async with serving(settings):
        for _ in range(3):
            await client.send_envelope(env, ORGS_COMMANDS)
        results = await client.wait_results(env.id, 3)
        for _ in range(2):
            await client.send_envelope(refused, ORGS_COMMANDS)
        rejections = await client.wait_results(refused.id, 2)

    assert {r.type for r in results} == {COMPLETED}, results[0].data
    # The stored result is re-emitted verbatim: same result id, same body.
    assert len({r.id for r in results}) == 1
    assert all(r == results[0] for r in results)
    on_topic = await results_on_topic(client.bootstrap, env.id)
    assert len(on_topic) == 3
    assert len({r.value for r in on_topic}) == 1

    assert await count(orgs_db, orgs, orgs.c.org_id == str(cmd.org_id)) == 1
    events = envelopes_of(await read_topic(client.bootstrap, ORGS_EVENTS))
    assert [e.type for e in events] == [OrgRegistered.TYPE]
    assert results[0].data["events"] == [events[0].id]
    cr = messaging.command_results
    assert await count(orgs_db, cr, cr.c.command_id == env.id) == 1
    assert await count(orgs_db, messaging.inbox, messaging.inbox.c.message_id == env.id) == 1

    # A rejection is stored and re-emitted the same way, and changes nothing either.
    assert [r.type for r in rejections] == [REJECTED, REJECTED]
    assert rejections[0] == rejections[1]
    assert rejections[0].data["code"] == "forbidden"
    assert await count(orgs_db, cr, cr.c.command_id == refused.id) == 1
    assert await count(orgs_db, orgs) == 1


# 2. relay crash between publish and mark; rows left behind by a crash ---------------------------


async def test_relay_killed_between_publish_and_mark_is_harmless(
    orgs_db: AsyncEngine, settings: Settings, client: CommandClient
) -> None:
    kills: list[list[int]] = []

    def kill_before_first_mark(runtime: ServiceRuntime) -> None:
        relay = runtime.relay
        real_mark = relay._mark

        async def mark(session: Any, seqs: list[int]) -> None:
            if not kills:
                kills.append(seqs)
                raise ConnectionResetError("relay died after publishing, before marking")
            await real_mark(session, seqs)

        relay._mark = mark  # type: ignore[method-assign]

    cmd = register()
    async with serving(settings, prepare=kill_before_first_mark) as runtime:
        command_id = await client.send(cmd)
        # The first pass published and died; the next pass publishes the same rows again.
        results = await client.wait_results(command_id, 2)
        o = messaging.outbox.c

        async def all_marked() -> bool:
            return await count(orgs_db, messaging.outbox, o.published_at.is_(None)) == 0

        await wait_for(all_marked)

        events = await read_topic(client.bootstrap, ORGS_EVENTS)
        # A consumer using the inbox applies each message id once, however often it arrives.
        applied: list[str] = []
        dead: list[str] = []

        async def apply(event: OrgRegistered, uow: Any, env: Envelope) -> None:
            applied.append(env.id)

        async def dead_letter(topic: str, *_: Any) -> None:
            dead.append(topic)

        projection = EventConsumer(
            routes=event_routes([EventRoute(OrgRegistered, apply)]),
            service="orgs",
            consumer="orgs<-probe",
            uow_factory=runtime.uow,
            dead_letter=dead_letter,
        )
        for record in events:
            await projection.process(RawMessage.from_record(record))

    assert len(kills) == 1 and len(kills[0]) == 2  # the event and the result, one pass
    assert [r.type for r in results] == [COMPLETED, COMPLETED]
    assert results[0] == results[1]  # same result id and body
    event_ids = [e.id for e in envelopes_of(events)]
    assert len(event_ids) == 2 and len(set(event_ids)) == 1  # duplicated, same message id
    assert results[0].data["events"] == [event_ids[0]]
    assert await count(orgs_db, messaging.outbox) == 2  # no new rows were made for the retry
    assert applied == [event_ids[0]]
    assert dead == []
    inbox = messaging.inbox
    assert await count(orgs_db, inbox, inbox.c.consumer == "orgs<-probe") == 1
    assert await count(orgs_db, orgs) == 1


async def test_rows_left_unpublished_by_a_crash_are_swept_on_start(
    orgs_db: AsyncEngine, settings: Settings, client: CommandClient
) -> None:
    runtime = build_runtime(definition(), settings)
    await runtime.migrate()
    left = [
        Envelope(
            id=new_id(),
            source="/tests",
            type="bianzhi.tests.Leftover.v1",
            time=now(),
            data={"n": n},
        )
        for n in range(5)
    ]
    async with runtime.sessions() as session, session.begin():
        await session.execute(
            insert(messaging.outbox), [outbox_row(e, ORGS_EVENTS, "one-key") for e in left]
        )
    await runtime.engine.dispose()
    assert await read_topic(client.bootstrap, ORGS_EVENTS) == []

    async with serving(settings) as fresh:  # a new process on the same database
        await wait_for(lambda: _zero(fresh.relay))
        # ... and it keeps working afterwards.
        command_id = await client.send(register())
        assert (await client.result(command_id)).type == COMPLETED

    published = envelopes_of(await read_topic(client.bootstrap, ORGS_EVENTS))
    leftovers = [e for e in published if e.type == "bianzhi.tests.Leftover.v1"]
    assert [e.id for e in leftovers] == [e.id for e in left]  # each once, in order
    o = messaging.outbox.c
    assert await count(orgs_db, messaging.outbox, o.published_at.is_(None)) == 0


async def _zero(relay: OutboxRelay) -> bool:
    return await relay.backlog() == 0


# 3. garbage ------------------------------------------------------------------------------------


async def test_garbage_goes_to_the_dlq_and_the_consumer_keeps_going(
    orgs_db: AsyncEngine, settings: Settings, client: CommandClient
) -> None:
    garbage = b"\xff\x00garbage"
    key = b"same-key"
    async with serving(settings):
        meta: RecordMetadata = await client.producer.send_and_wait(
            ORGS_COMMANDS,
            garbage,
            key=key,
            headers=[("x-trace", b"trace-42"), ("x-binary", b"\xfe\x01"), ("x-null", None)],
        )
        # Behind the garbage on the same partition: the consumer must get past it.
        good = client.envelope(register())
        await send_at(client, good, key=key)
        broken_id = new_id()
        broken = json.dumps({"id": broken_id, "type": RegisterOrg.TYPE, "data": "nope"}).encode()
        await client.send_raw(ORGS_COMMANDS, broken, key=key)
        result = await client.result(good.id)
        rejection = await client.result(broken_id)

    assert result.type == COMPLETED, result.data
    assert rejection.type == REJECTED
    assert rejection.data["code"] == "invalid_message"
    assert rejection.data["command_id"] == broken_id

    dead = await read_topic(client.bootstrap, dlq(ORGS_COMMANDS))
    assert len(dead) == 1
    record = dead[0]
    assert record.key == key
    assert record.value == garbage
    headers = dict(record.headers)
    assert headers["x-trace"] == b"trace-42"
    assert headers["x-binary"] == b"base64:/gE="
    assert headers["x-null"] == b""
    assert headers["x-dlq-error"]
    assert headers["x-dlq-topic"] == ORGS_COMMANDS.encode()
    assert headers["x-dlq-partition"] == str(meta.partition).encode()
    assert headers["x-dlq-offset"] == str(meta.offset).encode()
    assert await count(orgs_db, orgs) == 1


# 4. transient failures --------------------------------------------------------------------------


async def test_transient_failures_are_retried_until_they_pass(
    orgs_db: AsyncEngine, settings: Settings, client: CommandClient
) -> None:
    failures = {"left": 3}

    class FlakyCommitUnitOfWork(OrgsUnitOfWork):
        """The database goes away at commit time, three times, after the work was written."""

        async def commit(self) -> None:
            if failures["left"] > 0:
                failures["left"] -= 1
                raise transient_error()
            await super().commit()

    before = metric("bianzhi_transient_retries_total", service="orgs")
    service = dataclasses.replace(definition(), uow_class=FlakyCommitUnitOfWork)
    cmd = register()
    async with serving(settings, service):
        command_id = await client.send(cmd)
        result = await client.result(command_id)
        await asyncio.sleep(0.3)  # room for any stray second result

    assert failures["left"] == 0
    assert result.type == COMPLETED, result.data
    assert len(client.results_of(command_id)) == 1
    assert metric("bianzhi_transient_retries_total", service="orgs") - before >= 3
    assert await count(orgs_db, orgs) == 1
    assert len(await read_topic(client.bootstrap, ORGS_EVENTS)) == 1
    cr = messaging.command_results
    assert await count(orgs_db, cr) == 1
    assert await count(orgs_db, messaging.inbox) == 1


async def test_endless_transient_failure_holds_the_offset_until_a_healthy_restart(
    orgs_db: AsyncEngine, topics: str, tmp_path: Path, client: CommandClient
) -> None:
    # A short session: on the embedded broker the first restart of a group waits about 2.5
    # session timeouts before the new member gets its partitions.
    settings = service_settings(
        tmp_path,
        topics,
        kafka_graceful_timeout_s=2,
        kafka_session_timeout_ms=1500,
        kafka_heartbeat_interval_ms=500,
    )
    group = command_group(settings)
    doomed = register()
    attempts: list[float] = []

    async def database_down_for_doomed(cmd: RegisterOrg, uow: Any, ctx: Any) -> None:
        if cmd.org_id == doomed.org_id:
            attempts.append(time.monotonic())
            raise transient_error()
        await register_org(cmd, uow, ctx)

    key = b"one-partition"
    fine = client.envelope(register())
    stuck = client.envelope(doomed)
    async with serving(settings, with_register_handler(database_down_for_doomed)):
        first = await send_at(client, fine, key=key)
        assert (await client.result(fine.id)).type == COMPLETED
        tp = TopicPartition(ORGS_COMMANDS, first.partition)

        async def acked_fine() -> bool:
            return await committed(topics, group, tp) == first.offset + 1

        await wait_for(acked_fine)
        second = await send_at(client, stuck, key=key)
        assert (second.partition, second.offset) == (tp.partition, first.offset + 1)
        await wait_for(lambda: _at_least(attempts, 3))
        assert await committed(topics, group, tp) == second.offset  # not past the message
        stopping = time.monotonic()
    # The shutdown waited the graceful timeout, then cancelled the retry loop.
    assert time.monotonic() - stopping < 10
    assert attempts[-1] > stopping
    tried = len(attempts)

    assert await committed(topics, group, tp) == second.offset
    assert client.results_of(stuck.id) == []
    cr = messaging.command_results
    assert await count(orgs_db, cr, cr.c.command_id == stuck.id) == 0
    assert await count(orgs_db, messaging.inbox, messaging.inbox.c.message_id == stuck.id) == 0
    assert await count(orgs_db, orgs) == 1
    # A transient failure is never skipped: nothing was dead-lettered either.
    assert await read_topic(topics, dlq(ORGS_COMMANDS)) == []

    async with serving(settings):  # healthy again: same group, same database
        result = await client.result(stuck.id)

        async def acked_stuck() -> bool:
            return await committed(topics, group, tp) == second.offset + 1

        await wait_for(acked_stuck)

    assert len(attempts) == tried  # the healthy service handled it, not a leftover task
    assert result.type == COMPLETED, result.data
    assert len(client.results_of(stuck.id)) == 1
    assert len(client.results_of(fine.id)) == 1  # the acknowledged command was not redelivered
    assert await count(orgs_db, orgs, orgs.c.org_id == str(doomed.org_id)) == 1
    assert await count(orgs_db, cr) == 2
    o = messaging.outbox.c
    assert await count(orgs_db, messaging.outbox, o.topic == COMMAND_RESULTS) == 2


async def _at_least(items: list[Any], n: int) -> bool:
    return len(items) >= n


# 5. shutdown drains -----------------------------------------------------------------------------


async def test_shutdown_drains_the_in_flight_handler(
    orgs_db: AsyncEngine, settings: Settings, client: CommandClient
) -> None:
    quick = client.envelope(register())
    slow = client.envelope(register())
    entered = asyncio.Event()
    release = asyncio.Event()
    relay_stopping = asyncio.Event()
    quick_publishing = asyncio.Event()
    finished: list[float] = []

    async def slow_register(cmd: RegisterOrg, uow: Any, ctx: Any) -> None:
        if str(cmd.org_id) == slow.data["org_id"]:
            entered.set()
            await release.wait()
        await register_org(cmd, uow, ctx)
        finished.append(time.monotonic())

    def hold_relay(runtime: ServiceRuntime) -> None:
        # The quick command's rows are still being published when the slow one commits and the
        # drain begins: the relay must not take that pass, begun earlier, for its last one.
        relay = runtime.relay
        real_publish, real_stop = relay.publish, relay.stop

        async def publish(records: Any) -> Any:
            if any(quick.id.encode() in r.value for r in records):
                quick_publishing.set()
                await relay_stopping.wait()
            return await real_publish(records)

        async def stop(drain_timeout_s: float = 10.0) -> None:
            relay_stopping.set()
            await real_stop(drain_timeout_s)

        relay.publish = publish  # type: ignore[method-assign]
        relay.stop = stop  # type: ignore[method-assign]

    group = command_group(settings)
    key = b"drain"
    async with serving(settings, with_register_handler(slow_register), prepare=hold_relay):
        await send_at(client, quick, key=key)
        async with asyncio.timeout(20):
            await quick_publishing.wait()  # that pass has read the outbox: the slow one comes next
            meta = await send_at(client, slow, key=key)
            await entered.wait()
        asyncio.get_running_loop().call_later(0.5, release.set)
        stopping = time.monotonic()
        # Leaving the block runs the lifespan shutdown, as uvicorn does on SIGTERM.
    stopped = time.monotonic()

    assert len(finished) == 2, "the in-flight handler was cancelled instead of drained"
    assert stopping + 0.4 < finished[1] < stopped
    assert await count(orgs_db, orgs) == 2
    o = messaging.outbox.c
    assert await count(orgs_db, messaging.outbox, o.published_at.is_(None)) == 0
    for env in (quick, slow):  # published before the producer closed
        assert (await client.result(env.id, timeout=5)).type == COMPLETED
    tp = TopicPartition(ORGS_COMMANDS, meta.partition)
    assert await committed(client.bootstrap, group, tp) == meta.offset + 1


async def start_orgs_process(
    db_url: str, topics: str, tmp_path: Path, prefix: str, **env_overrides: str
) -> asyncio.subprocess.Process:
    """The orgs service as uvicorn runs it, in its own process, once it says it is ready; its
    output goes to ``tmp_path/uvicorn.log``."""
    port = free_port()
    env = {
        **os.environ,
        "BIANZHI_KAFKA_BOOTSTRAP": topics,
        "BIANZHI_DATA_DIR": str(tmp_path),
        "BIANZHI_ORGS_DATABASE_URL": db_url,
        "BIANZHI_KAFKA_SESSION_TIMEOUT_MS": "3000",
        "BIANZHI_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
        "BIANZHI_KAFKA_GROUP_PREFIX": prefix,
        "BIANZHI_LOG_LEVEL": "WARNING",
        **env_overrides,
    }
    log = (tmp_path / "uvicorn.log").open("ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "services.orgs.entrypoints.app:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    log.close()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def ready() -> bool:
                if proc.returncode is not None:
                    raise AssertionError(
                        f"uvicorn exited: {(tmp_path / 'uvicorn.log').read_text()}"
                    )
                try:
                    return (await http.get("/health/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(ready, timeout=30, interval=0.1)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return proc


async def test_sigterm_to_a_real_process_drains_and_exits_cleanly(
    orgs_db: AsyncEngine, db_url: str, topics: str, tmp_path: Path, client: CommandClient
) -> None:
    prefix = f"proc-{uuid.uuid4().hex[:8]}"
    proc = await start_orgs_process(db_url, topics, tmp_path, prefix)
    try:
        # The group has joined once the first command is answered.
        first = client.envelope(register())
        sent = [(first, await send_at(client, first))]
        await client.result(first.id)
        # A burst, then SIGTERM at once: some commands are in flight, some not yet fetched.
        burst = [client.envelope(register()) for _ in range(60)]
        metas = await asyncio.gather(*(send_at(client, e) for e in burst))
        sent += zip(burst, metas, strict=True)
        proc.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        async with asyncio.timeout(20):
            code = await proc.wait()
        assert time.monotonic() - sigterm_at < 20
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = (tmp_path / "uvicorn.log").read_text()
    # uvicorn (>= 0.29) re-raises the SIGTERM it handled once the shutdown is complete, so a
    # clean exit reports the signal (143 in a shell) rather than 0.
    assert code in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output, output
    assert "Traceback" not in output and "shutdown failed" not in output, output

    await asyncio.sleep(0.3)  # let the client's reader catch up
    cr = messaging.command_results
    async with orgs_db.connect() as conn:
        answered = set((await conn.execute(select(cr.c.command_id))).scalars())
    group = f"{prefix}-orgs"
    offsets = {
        p: await committed(topics, group, TopicPartition(ORGS_COMMANDS, p))
        for p in {m.partition for _, m in sent}
    }
    assert first.id in answered
    for e, m in sent:
        done = offsets[m.partition] or 0
        if e.id in answered:
            # Consumed: its result was published before exit and its offset was committed.
            assert len(await _wait_results(client, e.id)) == 1, e.id
            assert done > m.offset, (e.id, m, offsets)
        else:
            # Not consumed: nothing half-done, and it will be delivered again.
            assert client.results_of(e.id) == []
            assert done <= m.offset, (e.id, m, offsets)
    assert await count(orgs_db, orgs) == len(answered)


async def _wait_results(client: CommandClient, command_id: str) -> list[Envelope]:
    return await client.wait_results(command_id, 1, timeout=5)


# 6. offsets committed later than the handling, together -----------------------------------------


async def test_offsets_are_committed_together_and_before_the_consumer_leaves(
    orgs_db: AsyncEngine, topics: str, tmp_path: Path, client: CommandClient
) -> None:
    # An interval longer than the test: nothing is committed while the service runs, and the
    # graceful stop commits all that was handled.
    settings = service_settings(tmp_path, topics, kafka_commit_interval_ms=60_000)
    group = command_group(settings)
    key = b"one-partition"
    envs = [client.envelope(register()) for _ in range(5)]
    committed_before = metric("bianzhi_offset_commits_total", outcome="committed")
    async with serving(settings):
        metas = []
        for env in envs:  # one at a time: a fetch each
            metas.append(await send_at(client, env, key=key))
            assert (await client.result(env.id)).type == COMPLETED
        tp = TopicPartition(ORGS_COMMANDS, metas[0].partition)
        assert {m.partition for m in metas} == {tp.partition}
        assert await committed(topics, group, tp) is None
        assert metric("bianzhi_offset_commits_total", outcome="committed") == committed_before
    assert await committed(topics, group, tp) == metas[-1].offset + 1
    assert metric("bianzhi_offset_commits_total", outcome="committed") == committed_before + 1
    assert await count(orgs_db, orgs) == 5

    # With a short interval, the offsets follow the handling while the service runs.
    settings = service_settings(
        tmp_path,
        topics,
        kafka_commit_interval_ms=100,
        kafka_group_prefix=settings.kafka_group_prefix,
    )
    more = client.envelope(register())
    async with serving(settings):
        meta = await send_at(client, more, key=key)
        assert (await client.result(more.id)).type == COMPLETED

        async def caught_up() -> bool:
            return await committed(topics, group, tp) == meta.offset + 1

        await wait_for(caught_up)
    # The records committed on the way out were not delivered again.
    for env in envs:
        assert len(client.results_of(env.id)) == 1


async def test_a_killed_service_handles_again_what_it_had_not_committed_with_one_effect(
    orgs_db: AsyncEngine, db_url: str, topics: str, tmp_path: Path, client: CommandClient
) -> None:
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    group = f"{prefix}-orgs"
    key = b"one-partition"
    envs = [client.envelope(register()) for _ in range(8)]
    proc = await start_orgs_process(
        db_url, topics, tmp_path, prefix, BIANZHI_KAFKA_COMMIT_INTERVAL_MS="60000"
    )
    try:
        metas = [await send_at(client, env, key=key) for env in envs]
        for env in envs:
            assert (await client.result(env.id)).type == COMPLETED
        proc.kill()  # handled and published, their offsets not yet committed
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    tp = TopicPartition(ORGS_COMMANDS, metas[0].partition)
    assert await committed(topics, group, tp) is None
    events_before = envelopes_of(await read_topic(topics, ORGS_EVENTS))
    assert len(events_before) == len(envs)

    # The same group and database again: every record comes back and changes nothing.
    async with serving(service_settings(tmp_path, topics, kafka_group_prefix=prefix)):
        for env in envs:
            again = await client.wait_results(env.id, 2, timeout=30)
            assert again[0] == again[1]  # the stored result, sent again

        async def caught_up() -> bool:
            return await committed(topics, group, tp) == metas[-1].offset + 1

        await wait_for(caught_up)
    assert await count(orgs_db, orgs) == len(envs)
    cr = messaging.command_results
    assert await count(orgs_db, cr) == len(envs)
    # No new event: the relay may publish again one it had not marked published when the
    # process died (the same envelope, which consumers ignore by its id), never another one.
    events_after = envelopes_of(await read_topic(topics, ORGS_EVENTS))
    assert {e.id: e for e in events_after} == {e.id: e for e in events_before}
