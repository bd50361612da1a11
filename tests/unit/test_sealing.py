"""Sealed outbox rows: opened by the relay as it publishes, never published sealed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.roster.domain.personal_data import PersonalDataCipher
from services.runtime.relay import OutboxRecord
from services.runtime.sealing import SEALED_HEADER, SealedRowError, opened, opening_publisher

TOPIC = "bianzhi.roster.events.restricted.v1"
CIPHER = PersonalDataCipher(b"\x07" * 32)


def sealed_record(value: bytes) -> OutboxRecord:
    blob, label = CIPHER.seal(value, TOPIC)
    return OutboxRecord(
        seq=7,
        topic=TOPIC,
        key="p1",
        value=blob,
        headers={"content-type": "x", SEALED_HEADER: label},
    )


def test_a_sealed_row_is_published_opened_without_its_seal_header() -> None:
    record = sealed_record(b'{"citizen_id": "130102198503020518"}')
    assert b"130102198503020518" not in record.value
    published: list[OutboxRecord] = []

    async def publish(records: Sequence[OutboxRecord]) -> None:
        published.extend(records)

    plain = OutboxRecord(seq=8, topic="t", key=None, value=b"plain", headers={})
    asyncio.run(opening_publisher(publish, CIPHER)([record, plain]))
    assert [r.value for r in published] == [b'{"citizen_id": "130102198503020518"}', b"plain"]
    assert published[0].headers == {"content-type": "x"} and published[1] is plain


def test_a_sealed_row_without_the_key_is_refused_not_published_sealed() -> None:
    with pytest.raises(SealedRowError, match="personal-data key is needed"):
        opened(sealed_record(b"x"), None)


def test_a_row_sealed_for_another_topic_does_not_open() -> None:
    record = sealed_record(b"x")
    moved = OutboxRecord(
        seq=record.seq, topic="bianzhi.roster.events.v1", key=None, value=record.value,
        headers=record.headers,
    )  # fmt: skip
    with pytest.raises(SealedRowError, match="does not open with the key given"):
        opened(moved, CIPHER)
    with pytest.raises(SealedRowError, match="InvalidTag"):
        opened(sealed_record(b"x"), PersonalDataCipher(b"\x08" * 32))
