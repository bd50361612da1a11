"""The audit log (审计日志): every accepted and refused command, in a hash chain.

Each service database holds one ``audit_log`` table. Every entry records who (actor id, region,
roles), what (message id, type, subject), when and the outcome (``completed``, ``rejected``,
``forbidden`` with its reason code), plus ``prev_hash`` — the hash of the entry before it — and
its own ``hash``::

    hash = SHA-256( prev_hash (64 hex chars) || "\\n" || canonical JSON of the entry )

with ``prev_hash`` of the first entry 64 zeros. The canonical JSON is ``signing.canonical_json``
(RFC 8785) of the fields named in ``AuditEntry.content``; ``at`` is written as UTC RFC 3339 with
microseconds. ``seq`` numbers the rows (1, 2, 3, … without gaps) but is not hashed: the order
of the chain is proven by the links, so ``verify`` can tell an edited entry (its hash no longer
fits its content), a moved one (it is intact but follows the wrong entry) and a missing one.

Appends are serialized: on PostgreSQL by a transaction-scoped advisory lock taken before the
chain head is read; on SQLite the write lock every transaction takes at ``BEGIN IMMEDIATE``
(``services.runtime.db``) already does it. The entries are written in the caller's transaction,
so an audit entry exists exactly when the command's effect (or its refusal) was committed.

A command consumer appends in every transaction, so it does not read the head each time: it
remembers the head its last committed append left (``AuditLog.remember``) and writes the next
entries after it with ``ON CONFLICT DO NOTHING``. Under the append lock the table cannot change,
and it can only have grown since that commit (another replica, another process); then the first
new ``seq`` is taken and fewer rows come back than were written. Those rows are taken out again
and the entries chained after the head as read, as without a remembered head.

Every ``checkpoint_every`` entries a signed checkpoint of the chain head
(``contracts.audit.AuditCheckpoint``) goes out on the service's events topic, so the chain can be
anchored outside the database: deleting the newest entries is caught by ``verify`` against the
last checkpoint (``expected_head``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    MetaData,
    Select,
    String,
    Table,
    delete,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from contracts.audit import CHECKPOINTS, AuditCheckpoint
from contracts.codes import ReasonCode
from contracts.envelope import Envelope, now
from services.runtime import metrics
from services.runtime.db import ignoring_duplicates, insert_rows
from services.runtime.security_settings import SecuritySettings
from services.runtime.signing import (
    b64url,
    b64url_decode,
    canonical_json,
    fingerprint,
    load_private_key,
)

log = structlog.get_logger("bianzhi.audit")

GENESIS = "0" * 64
TABLE_NAME = "audit_log"

Outcome = Literal["completed", "rejected", "forbidden"]
Break = Literal["altered", "reordered", "missing"]
Database = AsyncSession | AsyncConnection


def audit_table(metadata: MetaData, name: str = TABLE_NAME) -> Table:
    """Declare the audit table in a service's metadata (its migrations create it)."""
    return Table(
        name,
        metadata,
        # Assigned by `append` under the append lock: 1, 2, 3, … with no gaps.
        Column("seq", BigInteger, primary_key=True, autoincrement=False),
        Column("at", DateTime(timezone=True), nullable=False),
        Column("service", String(50), nullable=False),
        Column("message_id", String(200), nullable=False),
        Column("type", String(200), nullable=False),
        Column("actor_id", String(200), nullable=True),
        Column("actor_region", String(12), nullable=True),
        Column("actor_roles", String(200), nullable=True),
        Column("subject", String(200), nullable=True),
        Column("outcome", String(16), nullable=False),
        Column("code", String(50), nullable=True),
        Column("prev_hash", String(64), nullable=False),
        Column("hash", String(64), nullable=False, unique=True),
        Index(f"ix_{name}_message_id", "message_id"),
        Index(f"ix_{name}_at", "at"),
    )


def _clean(value: str | None, limit: int) -> str | None:
    # Stored and hashed as the database will give it back: valid UTF-8 without NUL (which
    # PostgreSQL text refuses), within the column.
    if value is None:
        return None
    text = value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return text[:limit]


def _utc(at: datetime) -> datetime:
    # SQLite gives timestamps back without their offset; they were written in UTC.
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def outcome_of(code: str | None) -> Outcome:
    """The outcome of a command from its result code (``None`` for completed)."""
    if code is None:
        return "completed"
    return "forbidden" if code == ReasonCode.FORBIDDEN.value else "rejected"


@dataclass(frozen=True)
class AuditEntry:
    """What is recorded of one command."""

    at: datetime
    service: str
    message_id: str
    type: str
    actor_id: str | None
    actor_region: str | None
    actor_roles: str | None
    subject: str | None
    outcome: str
    code: str | None

    @classmethod
    def of_command(
        cls, env: Envelope, *, service: str, code: str | None, at: datetime | None = None
    ) -> AuditEntry:
        """The entry of a command whose result has code ``code`` (``None``: completed)."""
        return cls(
            at=_utc(at or now()),
            service=service,
            message_id=_clean(env.id, 200) or "",
            type=_clean(env.type, 200) or "",
            actor_id=_clean(env.actorid, 200),
            actor_region=_clean(env.actorregion, 12),
            actor_roles=_clean(env.actorroles, 200),
            subject=_clean(env.subject, 200),
            outcome=outcome_of(code),
            code=_clean(code, 50),
        )

    def content(self) -> dict[str, Any]:
        """The hashed fields, in wire form."""
        return {
            "at": _utc(self.at).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "service": self.service,
            "message_id": self.message_id,
            "type": self.type,
            "actor_id": self.actor_id,
            "actor_region": self.actor_region,
            "actor_roles": self.actor_roles,
            "subject": self.subject,
            "outcome": self.outcome,
            "code": self.code,
        }

    def row(self) -> dict[str, Any]:
        return {**self.content(), "at": _utc(self.at)}


def entry_hash(entry: AuditEntry, prev_hash: str) -> str:
    """The chain hash of ``entry`` following an entry whose hash is ``prev_hash``."""
    digest = hashlib.sha256(prev_hash.encode("ascii", "replace") + b"\n")
    digest.update(canonical_json(entry.content()))
    return digest.hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    """One stored entry of the chain."""

    seq: int
    entry: AuditEntry
    prev_hash: str
    hash: str

    def row(self) -> dict[str, Any]:
        """The stored row."""
        return {"seq": self.seq, **self.entry.row(), "prev_hash": self.prev_hash, "hash": self.hash}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> AuditRecord:
        entry = AuditEntry(
            at=_utc(row["at"]),
            service=row["service"],
            message_id=row["message_id"],
            type=row["type"],
            actor_id=row["actor_id"],
            actor_region=row["actor_region"],
            actor_roles=row["actor_roles"],
            subject=row["subject"],
            outcome=row["outcome"],
            code=row["code"],
        )
        return cls(int(row["seq"]), entry, row["prev_hash"], row["hash"])


@dataclass(frozen=True)
class ChainBreak:
    """The first entry whose content, order or presence was altered."""

    seq: int
    what: Break
    detail: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.what} ({self.detail})"


def _dialect(db: Database) -> str:
    if isinstance(db, AsyncConnection):
        return db.dialect.name
    return db.get_bind().dialect.name


def _lock_key(table: Table) -> int:
    # One advisory lock per audit table; a signed 64-bit key derived from its name.
    raw = hashlib.sha256(f"bianzhi.audit.{table.name}".encode()).digest()[:8]
    return int.from_bytes(raw, "big", signed=True)


class AuditLog:
    """Appends to and reads one service's audit chain."""

    def __init__(self, table: Table) -> None:
        self.table = table
        # (seq, hash) of the newest entry this process knows committed; see the module's doc.
        self._known_head: tuple[int, str] | None = None
        t = table
        self._select_head: Select[Any] = select(t.c.seq, t.c.hash).order_by(t.c.seq.desc()).limit(1)

    def remember(self, head: AuditRecord) -> None:
        """``head`` was committed: the next append may chain after it without reading the
        table. Called by the owner of the transaction once it has committed."""
        if self._known_head is None or head.seq > self._known_head[0]:
            self._known_head = (head.seq, head.hash)

    async def append(self, db: Database, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
        """Chain ``entries`` after the current head inside the caller's transaction."""
        if not entries:
            return []
        if _dialect(db) == "postgresql":
            # Held until the transaction ends: the next appender reads the head we leave.
            await db.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(self.table)}
            )
        known = self._known_head
        if known is not None:
            records = _chain(entries, *known)
            if await self._insert_after_known(db, records):
                return records
            self._known_head = None
        row = (await db.execute(self._select_head)).first()
        records = _chain(entries, *((row.seq, row.hash) if row is not None else (0, GENESIS)))
        await insert_rows(db, self.table, [r.row() for r in records])
        return records

    async def _insert_after_known(self, db: Database, records: list[AuditRecord]) -> bool:
        """Write ``records``, chained after the remembered head, unless the chain has grown
        past it; ``False`` (and nothing written) when it has."""
        stmt = ignoring_duplicates(db, self.table, returning=self.table.c.seq)
        written = (await insert_rows(db, stmt, [r.row() for r in records])).scalars().all()
        if len(written) == len(records):
            return True
        if written:
            await db.execute(delete(self.table).where(self.table.c.seq.in_(written)))
        return False

    async def head(self, db: Database) -> AuditRecord | None:
        """The newest entry, if any."""
        t = self.table
        row = (await db.execute(select(t).order_by(t.c.seq.desc()).limit(1))).mappings().first()
        return None if row is None else AuditRecord.from_row(row)

    async def records(
        self, db: Database, *, after_seq: int = 0, limit: int | None = None
    ) -> list[AuditRecord]:
        """Stored entries in ``seq`` order, from ``after_seq + 1``."""
        t = self.table
        query = select(t).where(t.c.seq > after_seq).order_by(t.c.seq)
        if limit is not None:
            query = query.limit(limit)
        return [AuditRecord.from_row(r) for r in (await db.execute(query)).mappings()]


def _chain(entries: Sequence[AuditEntry], seq: int, prev: str) -> list[AuditRecord]:
    """``entries`` as the records that follow the entry ``seq`` whose hash is ``prev``."""
    records = []
    for entry in entries:
        seq += 1
        digest = entry_hash(entry, prev)
        records.append(AuditRecord(seq, entry, prev, digest))
        prev = digest
    return records


def verify(
    records: Iterable[AuditRecord], *, expected_head: tuple[int, str] | None = None
) -> ChainBreak | None:
    """The first entry whose content, order or presence was altered; ``None`` if intact.

    ``expected_head`` is ``(seq, hash)`` of a checkpoint kept outside the database: entries
    deleted from the end of the chain are only found against it.
    """
    chain = sorted(records, key=lambda r: r.seq)
    known = {r.hash for r in chain}
    prev, expected_seq = GENESIS, 1
    for record in chain:
        if entry_hash(record.entry, record.prev_hash) != record.hash:
            return ChainBreak(record.seq, "altered", "its hash does not match its content")
        if record.prev_hash != prev:
            if record.seq > expected_seq:
                return ChainBreak(
                    expected_seq, "missing", f"entries {expected_seq}..{record.seq - 1} are gone"
                )
            if record.prev_hash in known:
                return ChainBreak(
                    record.seq, "reordered", "an intact entry stands after the wrong entry"
                )
            return ChainBreak(
                record.seq,
                "missing",
                "the entry it follows is not in the log (deleted, or replaced with its hash)",
            )
        if record.seq != expected_seq:
            return ChainBreak(record.seq, "altered", f"seq changed (expected {expected_seq})")
        prev, expected_seq = record.hash, record.seq + 1
    if expected_head is not None:
        head_seq, head_hash = expected_head
        at_head = next((r for r in chain if r.seq == head_seq), None)
        if at_head is None:
            return ChainBreak(head_seq, "missing", "the checkpointed head is gone")
        if at_head.hash != head_hash:
            return ChainBreak(head_seq, "altered", "the checkpointed head has another hash")
    return None


# --- checkpoints --------------------------------------------------------------------------


def checkpoints_due(records: Iterable[AuditRecord], every: int) -> list[AuditRecord]:
    """The records that complete a block of ``every`` entries."""
    return [r for r in records if r.seq % every == 0]


def make_checkpoint(
    service: str,
    record: AuditRecord,
    key: Ed25519PrivateKey,
    kid: str,
    *,
    at: datetime | None = None,
) -> AuditCheckpoint:
    """The signed checkpoint of the chain head ``record`` of ``service``."""
    model = CHECKPOINTS[service]
    unsigned = model(
        service=service,
        head_seq=record.seq,
        head_hash=record.hash,
        at=_utc(at or now()),
        kid=kid,
        signature="-",
    )
    signature = b64url(key.sign(unsigned.signing_input()))
    return unsigned.model_copy(update={"signature": signature})


def verify_checkpoint(
    checkpoint: AuditCheckpoint, public_keys: Mapping[str, Ed25519PublicKey]
) -> bool:
    """Whether ``checkpoint`` is signed by the key its ``kid`` names."""
    key = public_keys.get(checkpoint.kid)
    if key is None:
        return False
    try:
        key.verify(b64url_decode(checkpoint.signature), checkpoint.signing_input())
    except (InvalidSignature, ValueError):
        return False
    return True


class CommandAuditor:
    """What a command consumer calls once per transaction: append, and checkpoint when due.

    ``record`` returns the checkpoint envelopes to stage in the same unit of work (topic:
    ``envelope`` model's ``TOPIC``, key: the service name).
    """

    def __init__(
        self,
        *,
        service: str,
        table: Table,
        source: str,
        checkpoint_every: int = 1_000,
        signing_key: Ed25519PrivateKey | None = None,
        kid: str | None = None,
    ) -> None:
        if (signing_key is None) != (kid is None):
            raise ValueError("an audit signing key needs its kid, and a kid its key")
        self.service = service
        self.log = AuditLog(table)
        self.source = source
        self.checkpoint_every = checkpoint_every
        self.signing_key = signing_key
        self.kid = kid

    async def record(
        self, db: Database, outcomes: Sequence[tuple[Envelope, str | None]]
    ) -> list[tuple[Envelope, str]]:
        """Append one entry per ``(command, result code)``; the checkpoints now due."""
        due, _ = await self.append(db, outcomes)
        return due

    async def append(
        self, db: Database, outcomes: Sequence[tuple[Envelope, str | None]]
    ) -> tuple[list[tuple[Envelope, str]], AuditRecord | None]:
        """``record``, also returning the new head: once the transaction has committed, hand
        it to ``committed`` and the next append need not read the head."""
        stamp = now()
        entries = [
            AuditEntry.of_command(env, service=self.service, code=code, at=stamp)
            for env, code in outcomes
        ]
        records = await self.log.append(db, entries)
        head = records[-1] if records else None
        if self.signing_key is None or self.kid is None:
            return [], head
        due = []
        for record in checkpoints_due(records, self.checkpoint_every):
            checkpoint = make_checkpoint(self.service, record, self.signing_key, self.kid)
            env = checkpoint.envelope(source=self.source, subject=self.service)
            due.append((env, checkpoint.TOPIC))
            metrics.AUDIT_CHECKPOINTS.labels(self.service).inc()
            log.info("audit checkpoint", head_seq=record.seq, head_hash=record.hash)
        return due, head

    def committed(self, head: AuditRecord) -> None:
        """The transaction that appended up to ``head`` has committed."""
        self.log.remember(head)


def command_auditor(
    service: str, table: Table, source: str, settings: SecuritySettings
) -> CommandAuditor:
    """The auditor of ``service`` from ``BIANZHI_AUDIT_*`` settings."""
    key = (
        load_private_key(settings.audit_signing_private_key)
        if settings.audit_signing_private_key is not None
        else None
    )
    if key is not None:
        # The fingerprint lets an operator see that the kid names the key actually mounted.
        log.info(
            "audit checkpoints signed",
            kid=settings.audit_signing_kid,
            fingerprint=fingerprint(key.public_key()),
            every=settings.audit_checkpoint_every,
        )
    return CommandAuditor(
        service=service,
        table=table,
        source=source,
        checkpoint_every=settings.audit_checkpoint_every,
        signing_key=key,
        kid=settings.audit_signing_kid if key is not None else None,
    )
