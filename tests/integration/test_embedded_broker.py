"""The embedded broker (tansu) against the real binary: start, topics, a round trip, stop."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from services.runtime.embedded_broker import (
    BrokerStartError,
    EmbeddedBroker,
    PartitionWriteCounter,
    TansuProfile,
    ensure_topics,
    free_port,
    missing_topics,
)

PROFILE = TansuProfile()


def unique(name: str) -> str:
    return f"test.{name}.{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedBroker]:
    embedded = EmbeddedBroker(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log")
    started = time.monotonic()
    await embedded.start()
    print(f"tansu ready in {time.monotonic() - started:.3f} s on {embedded.bootstrap}")
    yield embedded
    await embedded.stop()


async def partition_counts(bootstrap: str, topics: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described}


@pytest.mark.broker
async def test_ensure_topics_creates_missing_topics_once(broker: EmbeddedBroker) -> None:
    topics = [unique("commands"), unique("events")]

    assert await missing_topics(broker.bootstrap, topics) == topics
    assert await ensure_topics(broker.bootstrap, topics) == topics
    assert await partition_counts(broker.bootstrap, topics) == dict.fromkeys(topics, 12)

    assert await ensure_topics(broker.bootstrap, topics) == []
    assert await missing_topics(broker.bootstrap, topics) == []


@pytest.mark.broker
async def test_missing_topics_does_not_create_what_it_asks_about(broker: EmbeddedBroker) -> None:
    # A metadata request that names a missing topic makes tansu auto-create it.
    topic = unique("absent")

    assert await missing_topics(broker.bootstrap, [topic]) == [topic]
    assert await missing_topics(broker.bootstrap, [topic]) == [topic]


@pytest.mark.broker
async def test_keyed_messages_round_trip_through_a_consumer_group(broker: EmbeddedBroker) -> None:
    started = time.monotonic()
    topic = unique("roundtrip")
    await ensure_topics(broker.bootstrap, [topic])
    sent = [
        (f"org-{i}".encode(), f'{{"n": {i}}}'.encode(), [("type", f"T{i}".encode())])
        for i in range(3)
    ]

    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap,
        acks=PROFILE.acks,
        linger_ms=PROFILE.linger_ms,
        enable_idempotence=PROFILE.enable_idempotence,
    )
    await producer.start()
    try:
        for key, value, headers in sent:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap,
        group_id=unique("group"),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=PROFILE.session_timeout_ms,
        heartbeat_interval_ms=PROFILE.heartbeat_interval_ms,
        fetch_max_wait_ms=PROFILE.fetch_max_wait_ms,
    )
    await consumer.start()
    received = []
    try:
        async with asyncio.timeout(20):
            while len(received) < len(sent):
                batches = await consumer.getmany(timeout_ms=500)
                received += [record for records in batches.values() for record in records]
        await consumer.commit()
    finally:
        await consumer.stop()

    assert sorted((r.key, r.value, list(r.headers)) for r in received) == sent
    print(f"produce/consume round trip in {time.monotonic() - started:.3f} s")


@pytest.mark.broker
async def test_stop_ends_the_process_and_a_second_stop_is_harmless() -> None:
    embedded = EmbeddedBroker()
    await embedded.start()
    pid = embedded.pid
    assert pid is not None
    assert embedded.running

    await embedded.stop()

    assert not embedded.running
    assert not process_exists(pid)
    await embedded.stop()
    assert isinstance(await embedded.wait_exit(), int)


def broker_environment(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode() for k, v in pairs}


@pytest.mark.broker
async def test_the_broker_runs_the_worker_threads_it_is_given(broker: EmbeddedBroker) -> None:
    # One by default (see DEFAULT_WORKER_THREADS); tansu's runtime reads the variable at start.
    assert broker.pid is not None
    assert broker_environment(broker.pid)["TOKIO_WORKER_THREADS"] == "1"
    async with EmbeddedBroker(worker_threads=2) as two:
        assert two.pid is not None
        assert broker_environment(two.pid)["TOKIO_WORKER_THREADS"] == "2"
        assert await missing_topics(two.bootstrap, ["test.threads"]) == ["test.threads"]
    with pytest.raises(ValueError, match="at least 1"):
        EmbeddedBroker(worker_threads=0)


@pytest.mark.broker
async def test_wait_exit_reports_a_broker_that_dies() -> None:
    async with EmbeddedBroker() as embedded:
        assert embedded.pid is not None
        os.kill(embedded.pid, signal.SIGKILL)

        assert await asyncio.wait_for(embedded.wait_exit(), 5) == -signal.SIGKILL
        assert not embedded.running


@pytest.mark.broker
async def test_a_broker_dropped_without_stop_does_not_outlive_its_owner() -> None:
    embedded = EmbeddedBroker()
    await embedded.start()
    pid = embedded.pid
    assert pid is not None

    del embedded
    gc.collect()

    for _ in range(250):  # the kill is immediate; the reaping by asyncio's watcher is not
        if not process_exists(pid):
            break
        await asyncio.sleep(0.02)
    assert not process_exists(pid)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.broker
async def test_start_on_a_taken_port_raises_a_clear_error() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        embedded = EmbeddedBroker(port=port)

        with pytest.raises(BrokerStartError, match=f"port 127.0.0.1:{port} is already in use"):
            await embedded.start()
        assert not embedded.running


@pytest.mark.broker
async def test_a_broker_exiting_during_start_up_raises_with_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The port check runs before tansu binds; a port taken in between makes tansu exit (with
    # status 0), which start() must notice instead of waiting out its timeout.
    monkeypatch.setattr("services.runtime.embedded_broker._port_in_use", lambda *_: False)
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        embedded = EmbeddedBroker(port=port, log_path=tmp_path / "tansu.log")

        with pytest.raises(BrokerStartError, match="exited during start-up") as raised:
            await embedded.start(timeout=10)
    assert "AddrInUse" in str(raised.value)
    assert not embedded.running


def test_partition_write_counter_warns_past_the_threshold_and_not_before() -> None:
    counter = PartitionWriteCounter(warn_at=100)
    counter.record("bianzhi.roster.events.v1", 3, batches=99)
    counter.record("bianzhi.roster.events.v1", 4, batches=150)
    counter.record("bianzhi.roster.events.v1", 5)
    assert len(counter.check()) == 1
    assert "partition 4 " in counter.check()[0]

    counter.record("bianzhi.roster.events.v1", 3)

    warnings = counter.check()
    assert len(warnings) == 2
    assert "partition 3 of bianzhi.roster.events.v1 holds 100 record batches" in warnings[0]
    assert "bianzhi up --fresh" in warnings[0]
    assert "outbox is re-published" in warnings[0]


def test_partition_write_counter_defaults_to_ten_thousand_batches() -> None:
    counter = PartitionWriteCounter()
    counter.record("t", 0, batches=9_999)
    assert counter.check() == []
    counter.record("t", 0)
    assert counter.count("t", 0) == 10_000
    assert len(counter.check()) == 1
