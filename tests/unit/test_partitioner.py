"""The services' partitioner makes Kafka's default choice of partition, only for less."""

from __future__ import annotations

import random
import uuid
from collections import Counter

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as kafka_murmur2

from services.runtime.partitioner import KeyPartitioner, murmur2


def test_murmur2_equals_kafkas_for_every_length_and_byte() -> None:
    rng = random.Random(7)
    samples = [bytes(rng.randrange(256) for _ in range(n)) for n in range(70) for _ in range(40)]
    samples += [bytes([b]) * n for b in (0, 0x7F, 0x80, 0xFF) for n in range(9)]
    samples += ["机关编制".encode(), str(uuid.UUID(int=0)).encode()]
    for data in samples:
        assert murmur2(data) == kafka_murmur2(data), data


def test_keys_go_to_kafkas_default_partition_and_repeat_the_same() -> None:
    ours, kafkas = KeyPartitioner(), DefaultPartitioner()
    for count in (1, 3, 12, 50):
        everyone = list(range(count))
        keys = [str(uuid.uuid4()).encode() for _ in range(300)]
        for key in keys + keys:  # the second time from what it remembers
            assert ours(key, everyone, everyone) == kafkas(key, everyone, everyone)


def test_a_record_without_a_key_goes_to_an_available_partition() -> None:
    partitioner = KeyPartitioner()
    chosen = Counter(partitioner(None, list(range(12)), [2, 5, 9]) for _ in range(300))
    assert set(chosen) == {2, 5, 9}
    assert set(partitioner(None, list(range(4)), []) for _ in range(200)) == {0, 1, 2, 3}
