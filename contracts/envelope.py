"""The CloudEvents 1.0 envelope (structured JSON mode) every bianzhi message travels in."""

from __future__ import annotations

import hashlib
import os
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
    """A fresh message id: ``str(uuid.uuid4())``, without the ``UUID`` object."""
    return _uuid_text(os.urandom(16), "4")


def derived_id(namespace: uuid.UUID, name: str) -> str:
    """The id derived from ``name`` in ``namespace``: ``str(uuid.uuid5(namespace, name))``,
    without the ``UUID`` object."""
    return _uuid_text(hashlib.sha1(namespace.bytes + name.encode()).digest(), "5")


def _uuid_text(raw: bytes, version: str) -> str:
    """The text of the UUID of the first 16 bytes of ``raw`` with the RFC 4122 variant and
    ``version`` (one hex digit) set, as ``uuid.UUID(bytes=..., version=...)`` sets them."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{version}{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def now() -> datetime:
    """The current time, timezone-aware."""
    return datetime.now(UTC)
