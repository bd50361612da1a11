"""The Kafka broker factory, the subscriber defaults, and publishing for relays and dead letters.

Every subscriber gets an explicit ``group_id`` and ``AckPolicy.MANUAL`` (set per subscriber: a
broker-level policy does not reach router subscribers in FastStream 0.7): its offsets are
committed by an ``OffsetCommitter`` once ``process`` has returned for them. Processing never lets
an exception escape but for cancellation, so an offset is committed only after its transaction
committed; a cancelled handler's records are not noted and are delivered again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.publisher.state import RealProducer
from faststream.message import StreamMessage
from faststream.security import (
    BaseSecurity,
    SASLPlaintext,
    SASLScram256,
    SASLScram512,
)

from services.runtime.gaps import OffsetGapGuard
from services.runtime.messaging import RawMessage
from services.runtime.offsets import OffsetCommitter
from services.runtime.partitioner import KeyPartitioner
from services.runtime.relay import OutboxRecord, PublishBatch
from services.runtime.settings import Settings

# The longest an idle batch subscriber waits in one poll (see ``subscribe``).
IDLE_POLL_MS = 1_000


def _poll_without_idle_sleep(subscriber: Any, committer: OffsetCommitter) -> None:
    """Make a FastStream batch subscriber poll again at once after a poll that found nothing,
    and hand on no record past a hole in its partition (``OffsetGapGuard``).

    FastStream's batch subscriber sleeps for its whole poll timeout after an empty poll, and a
    record that arrives during that sleep waits for it. A poll returns as soon as the consumer
    holds records, so with no sleep after an empty one the poll timeout only bounds how often an
    idle consumer wakes, and never delays a record.
    """
    guard = OffsetGapGuard()

    async def get_msg(consumer: Any) -> tuple[Any, ...]:
        committer.attach(consumer)
        batches = await consumer.getmany(
            timeout_ms=subscriber.batch_timeout_ms, max_records=subscriber.max_records
        )
        return tuple(guard.take(consumer, batches))

    subscriber.get_msg = get_msg


def _flush_before_leaving(subscriber: Any, committer: OffsetCommitter) -> None:
    """Commit what the subscriber handled when it stops: after its in-flight fetch is handled
    (FastStream's graceful stop waits for it) and before its consumer leaves the group."""
    stop_subscriber = subscriber.stop

    async def stop() -> None:
        consumer = subscriber.consumer
        if consumer is not None:
            stop_consumer = consumer.stop

            async def flush_then_stop() -> None:
                try:
                    await committer.flush()
                finally:
                    await stop_consumer()

            consumer.stop = flush_then_stop
        await stop_subscriber()

    subscriber.stop = stop


def security_from(settings: Settings) -> BaseSecurity | None:
    """The client security the settings ask for (SASL_SSL with SCRAM-SHA-512 in production)."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    context: ssl.SSLContext | None = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
    if protocol == "SSL":
        return BaseSecurity(ssl_context=context, use_ssl=True)
    username, password = settings.kafka_sasl_username, settings.sasl_password()
    if not username or not password:
        raise ValueError(
            f"BIANZHI_KAFKA_SECURITY_PROTOCOL={protocol} needs BIANZHI_KAFKA_SASL_USERNAME and "
            "BIANZHI_KAFKA_SASL_PASSWORD (or BIANZHI_KAFKA_SASL_PASSWORD_FILE)"
        )
    mechanism = settings.kafka_sasl_mechanism or "SCRAM-SHA-512"
    cls: type[SASLPlaintext | SASLScram256 | SASLScram512] = {
        "SCRAM-SHA-512": SASLScram512,
        "SCRAM-SHA-256": SASLScram256,
        "PLAIN": SASLPlaintext,
    }[mechanism]
    return cls(
        username=username,
        password=password,
        ssl_context=context,
        use_ssl=protocol == "SASL_SSL",
    )


def client_options(settings: Settings, *, client_id: str) -> dict[str, Any]:
    """Connection options of a plain aiokafka client (producer, consumer, admin), security
    included, from the same settings as the services' broker."""
    protocol = settings.kafka_security_protocol
    opts: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": client_id,
        "security_protocol": protocol,
    }
    security = security_from(settings)
    if security is not None and security.ssl_context is not None:
        opts["ssl_context"] = security.ssl_context
    if isinstance(security, SASLPlaintext | SASLScram256 | SASLScram512):
        opts["sasl_mechanism"] = settings.kafka_sasl_mechanism or "SCRAM-SHA-512"
        opts["sasl_plain_username"] = security.username
        opts["sasl_plain_password"] = security.password
    return opts


def make_broker(settings: Settings, *, client_id: str) -> KafkaBroker:
    """A broker configured from settings; nothing connects until it is started."""
    return KafkaBroker(
        settings.kafka_bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=settings.kafka_enable_idempotence,
        linger_ms=settings.kafka_linger_ms,
        max_batch_size=settings.kafka_max_batch_size,
        partitioner=KeyPartitioner(),
        allow_auto_create_topics=settings.kafka_allow_auto_create_topics,
        graceful_timeout=settings.kafka_graceful_timeout_s,
        security=security_from(settings),
        # FastStream's own lines (each message received/processed) at DEBUG; its errors
        # (a consume loop that fails, a connection lost) still reach the log.
        logger=logging.getLogger("bianzhi.faststream"),
        log_level=logging.DEBUG,
    )


async def _records(msg: StreamMessage[Any]) -> tuple[Any, ...]:
    """What a subscriber's handler is given: the records of the fetch themselves.

    Envelopes are parsed by the consumer itself, so that garbage reaches the DLQ path instead
    of failing inside the framework. The records come as the decoded body, not through a
    ``message`` parameter: FastStream resolves such a parameter from its context with a plain
    function, which fast_depends runs in a worker thread, one thread hop per fetch.
    """
    records = msg.raw_message
    return tuple(records) if isinstance(records, tuple | list) else (records,)


def _is_text(value: bytes | None) -> bool:
    if value is None:
        return False
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def _clean_headers(record: Any) -> Any:
    if all(_is_text(v) for _, v in record.headers or ()):
        return record
    clean = dataclasses.replace(
        record, headers=[(k, v if _is_text(v) else b"") for k, v in record.headers]
    )
    if hasattr(record, "consumer"):
        clean.consumer = record.consumer
    return clean


async def _parse_any_headers(
    records: Any, original: Callable[[Any], Awaitable[StreamMessage[Any]]]
) -> StreamMessage[Any]:
    # FastStream decodes every header as UTF-8: a record with a binary or null header would fail
    # to parse, never reach the consumer (so no dead letter) and be committed with the next one.
    # Let the framework parse it with blanked headers and keep the records as they arrived.
    is_batch = isinstance(records, tuple | list)
    batch = tuple(records) if is_batch else (records,)
    cleaned = tuple(_clean_headers(r) for r in batch)
    if all(c is r for c, r in zip(cleaned, batch, strict=True)):
        return await original(records)
    message = await original(type(records)(cleaned) if is_batch else cleaned[0])
    message.raw_message = records
    return message


def subscribe(
    broker: KafkaBroker,
    topics: str | Sequence[str],
    *,
    group_id: str,
    process: Callable[[Sequence[RawMessage]], Awaitable[None]],
    settings: Settings,
    fetch_max_wait_ms: int,
    max_records: int,
    description: str = "",
) -> Any:
    """Register one consumer of ``topics`` in ``group_id`` that hands each batch to ``process``.

    A batch is whatever one fetch returned (at most ``max_records``); its offsets are committed
    once ``process`` has returned, that is once every record in it has been handled, with those
    of the other batches handled within ``kafka_commit_interval_ms`` (``OffsetCommitter``).
    """
    committer = OffsetCommitter(interval_ms=settings.kafka_commit_interval_ms, name=group_id)

    async def on_batch(records: Any) -> None:
        await process([RawMessage.from_record(r) for r in records])
        await committer.done(records)

    names = [topics] if isinstance(topics, str) else list(topics)
    # How long one poll waits for records: it returns as soon as the consumer holds any, so a
    # long wait adds no latency (an idle consumer just wakes less often); see
    # ``_poll_without_idle_sleep`` for why no sleep follows an empty poll.
    batch_timeout_ms = max(fetch_max_wait_ms, IDLE_POLL_MS)
    on_batch.__name__ = "consume_" + "__".join(t.replace(".", "_").replace("-", "_") for t in names)
    subscriber = broker.subscriber(
        *names,
        group_id=group_id,
        batch=True,
        max_records=max_records,
        batch_timeout_ms=batch_timeout_ms,
        ack_policy=AckPolicy.MANUAL,
        listener=committer,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        fetch_max_wait_ms=fetch_max_wait_ms,
        parser=_parse_any_headers,
        decoder=_records,
        description=description,
    )
    _poll_without_idle_sleep(subscriber, committer)
    _flush_before_leaving(subscriber, committer)
    return subscriber(on_batch)


def connected_producer(broker: KafkaBroker) -> AIOKafkaProducer | None:
    """The aiokafka producer of a connected ``broker``; None before it connects, after it
    closes, and for FastStream's in-memory test broker (whose producer is no aiokafka one)."""
    state = getattr(getattr(broker.config, "producer", None), "_producer", None)
    if not isinstance(state, RealProducer):
        return None
    return state.producer if isinstance(state.producer, AIOKafkaProducer) else None


def record_headers(rec: OutboxRecord) -> list[tuple[str, bytes]]:
    """The Kafka headers of an outbox record: the ones FastStream's ``publish`` writes for it
    (``content-type``, ``correlation_id``, then the row's own, which override)."""
    headers = {
        "content-type": "",
        "correlation_id": rec.correlation_id or str(uuid.uuid4()),
        **rec.headers,
    }
    return [(name, value.encode()) for name, value in headers.items()]


def outbox_publisher(broker: KafkaBroker) -> PublishBatch:
    """Publish outbox rows in order through ``broker``: returns once every row is queued in the
    producer, with the acknowledgement of them all to await (see ``PublishBatch``).

    A connected broker's records go straight to its aiokafka producer, as the very records
    FastStream's ``publish`` would write (``record_headers``): its per-message command objects
    and wrappers cost the relay more than the send itself (39 against 22 us a record, measured
    on the roster's relay), and a relay sends several records per command handled. Anything
    else (FastStream's in-memory test broker) publishes through the framework.
    """

    async def publish(records: Sequence[OutboxRecord]) -> Awaitable[None]:
        futures = []
        producer = connected_producer(broker)
        if producer is not None:
            for rec in records:
                futures.append(
                    await producer.send(
                        rec.topic,
                        rec.value,
                        key=rec.key.encode() if rec.key is not None else None,
                        headers=record_headers(rec),
                    )
                )
            return asyncio.gather(*futures)
        for rec in records:
            fut = await broker.publish(
                rec.value,
                topic=rec.topic,
                key=rec.key.encode() if rec.key is not None else None,
                headers=rec.headers,
                correlation_id=rec.correlation_id,
                no_confirm=True,
            )
            futures.append(fut)
        return asyncio.gather(*futures)

    return publish


def dead_letter_publisher(
    broker: KafkaBroker,
) -> Callable[[str, bytes, bytes | None, dict[str, str]], Awaitable[None]]:
    async def publish(topic: str, value: bytes, key: bytes | None, headers: dict[str, str]) -> None:
        await broker.publish(value, topic=topic, key=key, headers=headers)

    return publish
