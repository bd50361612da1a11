"""Signed checkpoints of each service's audit chain (审计日志), anchored outside its database.

Every accepted and every refused command is appended to a hash chain in the owning service's
database; every N entries the service emits ``bianzhi.<svc>.AuditCheckpoint.v1`` on its own
events topic, keyed by the service name: the sequence number and hash of the chain head, signed
with the service's Ed25519 audit key. Whoever keeps these events can later prove that the
database still holds that chain (``bianzhi audit verify SERVICE --head SEQ:HASH``).

The signature is Ed25519 over ``signing_input()``: the UTF-8 JSON of ``service``, ``head_seq``,
``head_hash`` and ``at`` with sorted keys and no whitespace (the RFC 8785 form of these values),
base64url-encoded without padding in ``signature``; ``kid`` names the key.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, ClassVar

from pydantic import Field

from contracts.base import Event, type_name
from contracts.topics import NOTIFY_EVENTS, ORGS_EVENTS, QUOTA_EVENTS, ROSTER_EVENTS

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class AuditCheckpoint(Event):
    """The head of a service's audit chain, signed by the service."""

    SUBJECT: ClassVar[str] = "service"

    service: str = Field(min_length=1, max_length=50)
    head_seq: int = Field(ge=1)
    head_hash: Sha256Hex
    at: datetime
    kid: str = Field(min_length=1, max_length=100)
    signature: str = Field(min_length=1, max_length=200)

    def signing_input(self) -> bytes:
        """The bytes the signature covers (``at`` as UTC RFC 3339 with microseconds)."""
        return checkpoint_signing_input(self.service, self.head_seq, self.head_hash, self.at)


def checkpoint_signing_input(service: str, head_seq: int, head_hash: str, at: datetime) -> bytes:
    """What a checkpoint's signature covers; the same bytes in every language."""
    stamp = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    content = {"at": stamp, "head_hash": head_hash, "head_seq": head_seq, "service": service}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class OrgsAuditCheckpoint(AuditCheckpoint):
    TYPE: ClassVar[str] = type_name("orgs", "AuditCheckpoint")
    TOPIC: ClassVar[str] = ORGS_EVENTS


class QuotaAuditCheckpoint(AuditCheckpoint):
    TYPE: ClassVar[str] = type_name("quota", "AuditCheckpoint")
    TOPIC: ClassVar[str] = QUOTA_EVENTS


class RosterAuditCheckpoint(AuditCheckpoint):
    TYPE: ClassVar[str] = type_name("roster", "AuditCheckpoint")
    TOPIC: ClassVar[str] = ROSTER_EVENTS


class NotifyAuditCheckpoint(AuditCheckpoint):
    TYPE: ClassVar[str] = type_name("notify", "AuditCheckpoint")
    TOPIC: ClassVar[str] = NOTIFY_EVENTS


CHECKPOINTS: dict[str, type[AuditCheckpoint]] = {
    "orgs": OrgsAuditCheckpoint,
    "quota": QuotaAuditCheckpoint,
    "roster": RosterAuditCheckpoint,
    "notify": NotifyAuditCheckpoint,
}
