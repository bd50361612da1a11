"""The orgs database: organizations, internal units, change history, and the messaging tables."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

from services.runtime.tables import SeqType, messaging_tables

metadata = MetaData()

orgs = Table(
    "orgs",
    metadata,
    Column("org_id", String(36), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("division_code", String(6), nullable=False),
    Column("parent_org_id", String(36), ForeignKey("orgs.org_id"), nullable=True),
    Column("uscc", String(18), nullable=True, unique=True),
    Column("grade", String(50), nullable=True),
    Column("alt_names", JSON, nullable=False),
    Column("functions", JSON, nullable=False),
    Column("funding", String(16), nullable=True),
    Column("status", String(16), nullable=False),
    Column("effective_date", Date, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("version", Integer, nullable=False),
    Index("ix_orgs_division", "division_code"),
    Index("ix_orgs_parent", "parent_org_id"),
    Index("ix_orgs_name", "name"),
)

org_units = Table(
    "org_units",
    metadata,
    Column("unit_id", String(36), primary_key=True),
    Column("org_id", String(36), ForeignKey("orgs.org_id"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("position", Integer, nullable=False),
    UniqueConstraint("org_id", "name", name="uq_org_units_name"),
    Index("ix_org_units_org", "org_id"),
)

# Every change, with its document and effective date; rows are only ever appended.
org_history = Table(
    "org_history",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("org_id", String(36), nullable=False),
    Column("event_id", String(200), nullable=False, unique=True),
    Column("event_type", String(200), nullable=False),
    Column("command_id", String(200), nullable=False),
    Column("document", JSON, nullable=True),
    Column("effective_date", Date, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("actor_id", String(200), nullable=True),
    Column("actor_region", String(12), nullable=True),
    Column("data", JSON, nullable=False),
    Index("ix_org_history_org", "org_id", "seq"),
)

# Merges and abolitions wait for quota (their sagas): the command (its envelope), the step sent
# and what to apply when quota agrees.
org_sagas = Table(
    "org_sagas",
    metadata,
    Column("saga_id", String(36), primary_key=True),
    Column("kind", String(16), nullable=False),  # merge | abolish
    Column("command_id", String(200), nullable=False),
    Column("command_envelope", LargeBinary, nullable=False),
    Column("org_ids", JSON, nullable=False),
    Column("payload", JSON, nullable=False),
    # waiting | completed | rejected
    Column("status", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    # When the step to quota is sent again if no answer has come (none: a saga from before
    # the column, sent again at the first sweep).
    Column("step_due_at", DateTime(timezone=True), nullable=True),
    Index("ix_org_sagas_status", "status", "created_at"),
)

# An org takes part in at most one merge or abolition at a time: the primary key decides.
org_saga_locks = Table(
    "org_saga_locks",
    metadata,
    Column("org_id", String(36), primary_key=True),
    Column("saga_id", String(36), nullable=False),
)

messaging = messaging_tables(metadata)
