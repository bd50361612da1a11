"""Which partition a keyed record goes to: Kafka's own choice, computed for less.

Kafka's default partitioner (the Java client's, and aiokafka's ``DefaultPartitioner``) puts a
keyed record in partition ``murmur2(key) & 0x7FFFFFFF`` modulo the partition count; consumers and
other producers rely on it (one key, one partition, one order). aiokafka computes murmur2 in pure
Python, a byte at a time, for every record: for the relays, which send four records per
enrolment keyed by UUIDs, that was about 2 % of the roster's CPU in a burst.

``KeyPartitioner`` gives the very same partition: the same murmur2, read a 32-bit word at a time,
and remembered for recent keys (an organ's id keys every slot request for it; a person's id keys
both the public event and its restricted counterpart).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["KeyPartitioner", "murmur2"]

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_SEED = 0x9747B28C


@lru_cache(maxsize=64)
def _words(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}I")


def murmur2(data: bytes) -> int:
    """MurmurHash2 of ``data`` as Kafka computes it (``org.apache.kafka.common.utils.Utils``):
    an unsigned 32-bit value, equal to aiokafka's ``murmur2``."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    whole = length // 4
    if whole:
        for k in _words(whole).unpack_from(data):
            k = (k * _M) & _MASK
            k ^= k >> 24
            k = (k * _M) & _MASK
            h = ((h * _M) & _MASK) ^ k
    tail = length & 3
    if tail:
        at = length - tail
        if tail == 3:
            h ^= data[at + 2] << 16
        if tail >= 2:
            h ^= data[at + 1] << 8
        h ^= data[at]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


@lru_cache(maxsize=16_384)
def _positive_hash(key: bytes) -> int:
    return murmur2(key) & 0x7FFFFFFF


class KeyPartitioner:
    """A producer's ``partitioner``: Kafka's default choice (murmur2 of the key modulo the
    partition count; a random available partition for a record without a key)."""

    def __call__(
        self, key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]
    ) -> int:
        if key is None:
            return random.choice(available or all_partitions)
        return all_partitions[_positive_hash(key) % len(all_partitions)]
