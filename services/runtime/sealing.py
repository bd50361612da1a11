"""Sealed values: personal data in full kept encrypted wherever it waits (outbox, dead letters).

A service whose messages carry personal data in full (the roster's restricted events, its
commands) gives the runtime a ``Sealer``. Outbox rows for its ``sealed_topics`` are written
sealed and opened by the relay only as it publishes them (the header ``x-bianzhi-sealed`` names
the key; it is not published); dead letters of its commands are sealed for good
(``x-dlq-sealed``), to be opened by whoever holds the key.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from services.runtime.relay import OutboxRecord, PublishBatch

SEALED_HEADER = "x-bianzhi-sealed"
# A sealed dead letter: the key's label, and the record key sealed (base64), if it had one.
DLQ_SEALED_HEADER = "x-dlq-sealed"
DLQ_SEALED_KEY_HEADER = "x-dlq-sealed-key"


class Sealer(Protocol):
    """Encrypts and decrypts a value bound to a topic; ``seal`` also returns a label of the key."""

    def seal(self, value: bytes, topic: str) -> tuple[bytes, str]: ...

    def unseal(self, blob: bytes, topic: str) -> bytes: ...


def seal_dead_letter(
    sealer: Sealer, topic: str, value: bytes, key: bytes | None
) -> tuple[bytes, dict[str, str]]:
    """A dead letter of ``topic`` sealed: its value, and the headers that say so. The record
    key is the sender's choice and may be the very number, so it is sealed into a header and
    the dead letter goes out without one."""
    sealed, label = sealer.seal(value, topic)
    headers = {DLQ_SEALED_HEADER: label}
    if key is not None:
        sealed_key, _ = sealer.seal(key, topic + "#key")
        headers[DLQ_SEALED_KEY_HEADER] = base64.b64encode(sealed_key).decode()
    return sealed, headers


def open_dead_letter(
    sealer: Sealer, value: bytes, headers: Mapping[str, str]
) -> tuple[bytes, bytes | None]:
    """The original value and key of a dead letter ``seal_dead_letter`` sealed (its headers
    name the topic it came from); raises when the key does not open it."""
    source = headers["x-dlq-topic"]
    sealed_key = headers.get(DLQ_SEALED_KEY_HEADER)
    key = (
        sealer.unseal(base64.b64decode(sealed_key), source + "#key")
        if sealed_key is not None
        else None
    )
    return sealer.unseal(value, source), key


class SealedRowError(RuntimeError):
    """An outbox row is sealed and no key to open it was given."""


def opened(record: OutboxRecord, sealer: Sealer | None) -> OutboxRecord:
    """``record`` as it is published: opened when it was stored sealed."""
    label = record.headers.get(SEALED_HEADER)
    if label is None:
        return record
    if sealer is None:
        raise SealedRowError(
            f"outbox row {record.seq} for {record.topic} is sealed with {label}; "
            "its service's personal-data key is needed to publish it"
        )
    try:
        value = sealer.unseal(record.value, record.topic)
    except Exception as exc:  # another key (InvalidTag), or not a sealed value at all
        raise SealedRowError(
            f"outbox row {record.seq} for {record.topic} is sealed with {label} and does not "
            f"open with the key given ({type(exc).__name__})"
        ) from None
    headers = {k: v for k, v in record.headers.items() if k != SEALED_HEADER}
    return replace(record, value=value, headers=headers)


def opening_publisher(publish: PublishBatch, sealer: Sealer | None) -> PublishBatch:
    """``publish`` that opens sealed rows first."""

    async def publish_opened(records: Sequence[OutboxRecord]) -> Awaitable[None] | None:
        return await publish([opened(r, sealer) for r in records])

    return publish_opened
