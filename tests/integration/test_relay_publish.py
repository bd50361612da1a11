"""The relay's publisher on the real broker: records sent straight to the aiokafka producer are
the records FastStream's ``publish`` writes (same partition, key, value and headers)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import ConsumerRecord

from services.runtime.broker import connected_producer, make_broker, outbox_publisher
from services.runtime.embedded_broker import ensure_topics
from services.runtime.relay import OutboxRecord
from tests.conftest import service_settings

pytestmark = pytest.mark.broker

PARTITIONS = 12


def records(topic: str) -> list[OutboxRecord]:
    """Keyed and unkeyed rows, with and without a correlation id, with the outbox's header."""
    out = []
    for i in range(40):
        out.append(
            OutboxRecord(
                seq=i,
                topic=topic,
                key=str(uuid.uuid4()) if i % 5 else None,
                value=f'{{"n": {i}, "名称": "机关"}}'.encode(),
                headers={"content-type": "application/cloudevents+json"} if i % 7 else {},
                correlation_id=str(uuid.uuid4()) if i % 3 else None,
            )
        )
    return out


async def read_all(bootstrap: str, topic: str, count: int) -> list[ConsumerRecord]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        got: list[ConsumerRecord] = []
        async with asyncio.timeout(20):
            while len(got) < count:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    got.extend(batch)
        return got
    finally:
        await consumer.stop()


async def test_direct_records_are_the_records_faststream_writes(kafka: str, tmp_path: Path) -> None:
    direct_topic, framework_topic = (f"test.relay.{n}.{uuid.uuid4().hex[:8]}" for n in "ab")
    await ensure_topics(kafka, [direct_topic, framework_topic], partitions=PARTITIONS)
    broker = make_broker(service_settings(tmp_path, kafka), client_id="relay-publish-test")
    await broker.connect()
    try:
        assert connected_producer(broker) is not None
        direct = records(direct_topic)
        ack = await outbox_publisher(broker)(direct)
        assert ack is not None
        await ack
        # The same rows through FastStream's own publish.
        framework = [
            OutboxRecord(r.seq, framework_topic, r.key, r.value, r.headers, r.correlation_id)
            for r in direct
        ]
        for rec in framework:
            await broker.publish(
                rec.value,
                topic=rec.topic,
                key=rec.key.encode() if rec.key is not None else None,
                headers=rec.headers,
                correlation_id=rec.correlation_id,
            )
    finally:
        await broker.stop()

    got_direct = {r.value: r for r in await read_all(kafka, direct_topic, len(direct))}
    got_framework = {r.value: r for r in await read_all(kafka, framework_topic, len(direct))}
    assert set(got_direct) == set(got_framework) == {r.value for r in direct}
    for rec in direct:
        a, b = got_direct[rec.value], got_framework[rec.value]
        assert a.key == b.key
        headers_a, headers_b = dict(a.headers), dict(b.headers)
        if rec.correlation_id is None:
            # Each path makes up an id of its own for a row without one.
            assert uuid.UUID(headers_a.pop("correlation_id").decode())
            assert uuid.UUID(headers_b.pop("correlation_id").decode())
        assert headers_a == headers_b
        assert [name for name, _ in a.headers] == [name for name, _ in b.headers]
        if rec.key is not None:
            # The key decides the partition on both paths (an unkeyed record goes anywhere),
            # and it is Kafka's default choice, the one any other client makes for that key.
            assert a.partition == b.partition
            everyone = list(range(PARTITIONS))
            assert a.partition == DefaultPartitioner()(rec.key.encode(), everyone, everyone)
    # Order holds: the rows of one partition arrive in the order they were sent.
    partitions = {r.partition for r in got_direct.values()}
    for partition in partitions:
        arrived = [
            r.value
            for r in sorted(got_direct.values(), key=lambda r: r.offset)
            if r.partition == partition
        ]
        assert arrived == [r.value for r in direct if got_direct[r.value].partition == partition]
