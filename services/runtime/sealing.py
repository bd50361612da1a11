"""Sealed values: personal data in full kept encrypted wherever it waits (outbox, dead letters).

A service whose messages carry personal data in full (the roster's restricted events, its
commands) gives the runtime a ``Sealer``. Outbox rows for its ``sealed_topics`` are written
sealed and opened by the relay only as it publishes them (the header ``x-bianzhi-sealed`` names
the key; it is not published); dead letters of its commands are sealed for good
(``x-dlq-sealed``), to be opened by whoever holds the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from services.runtime.relay import OutboxRecord, PublishBatch

SEALED_HEADER = "x-bianzhi-sealed"


class Sealer(Protocol):
    """Encrypts and decrypts a value bound to a topic; ``seal`` also returns a label of the key."""

    def seal(self, value: bytes, topic: str) -> tuple[bytes, str]: ...

    def unseal(self, blob: bytes, topic: str) -> bytes: ...


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

    async def publish_opened(records: Sequence[OutboxRecord]) -> None:
        await publish([opened(r, sealer) for r in records])

    return publish_opened
