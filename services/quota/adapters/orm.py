"""The quota database: the org projection, the establishment ledger, its history, messaging."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
)

from services.runtime.tables import SeqType, messaging_tables

metadata = MetaData()

# What quota knows of each org, fed by bianzhi.orgs.events.v1. kind, division_code and name are
# empty while only a merge of the org has been seen.
org_projection = Table(
    "org_projection",
    metadata,
    Column("org_id", String(36), primary_key=True),
    Column("kind", String(32), nullable=True),
    Column("division_code", String(6), nullable=True),
    Column("parent_org_id", String(36), nullable=True),
    Column("status", String(16), nullable=False),
    Column("name", String(200), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_org_projection_division", "division_code"),
)

# Approved, occupied and reserved places per org and category (核定编制 / 实有 / 预留).
establishment = Table(
    "establishment",
    metadata,
    Column("org_id", String(36), nullable=False),
    Column("category", String(32), nullable=False),
    Column("approved", Integer, nullable=False),
    Column("occupied", Integer, nullable=False),
    Column("reserved", Integer, nullable=False),
    Column("funding", String(16), nullable=True),
    Column("version", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("org_id", "category", name="pk_establishment"),
    CheckConstraint("approved >= 0", name="ck_establishment_approved"),
    CheckConstraint("occupied >= 0", name="ck_establishment_occupied"),
    CheckConstraint("reserved >= 0", name="ck_establishment_reserved"),
    Index("ix_establishment_category", "category"),
)

# Approved, occupied and reserved places and establishment rows (``orgs``) summed per division
# code prefix (GB/T 2260: 2 digits a province, 4 a city, 6 a county, see
# ``contracts.identifiers.division_prefix``) and category, in ``DIVISION_TOTALS_SHARDS`` parts
# per prefix and category (the part an org adds to is fixed by the last character of its id),
# summed on read. Kept by database triggers on ``establishment`` and ``org_projection`` in the
# writing transaction (migration 0003), so every write path keeps it; the division roll-up reads
# it instead of summing the subtree. Parts spread concurrent writers of one province over
# several rows (PostgreSQL row locks) instead of queueing them on one.
DIVISION_TOTALS_SHARDS = 8
division_totals = Table(
    "division_totals",
    metadata,
    Column("prefix", String(6), nullable=False),
    Column("category", String(32), nullable=False),
    Column("shard", Integer, nullable=False),
    Column("approved", Integer, nullable=False),
    Column("occupied", Integer, nullable=False),
    Column("reserved", Integer, nullable=False),
    Column("orgs", Integer, nullable=False),
    PrimaryKeyConstraint("prefix", "category", "shard", name="pk_division_totals"),
)

# Region limits per division and category (编制总量控制数).
region_limits = Table(
    "region_limits",
    metadata,
    Column("division_code", String(6), nullable=False),
    Column("category", String(32), nullable=False),
    Column("limit", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("division_code", "category", name="pk_region_limits"),
    CheckConstraint('"limit" >= 0', name="ck_region_limits_limit"),
)

# Leader posts of an org (unit_id '') or of one of its internal units (领导职数).
leader_posts = Table(
    "leader_posts",
    metadata,
    Column("org_id", String(36), nullable=False),
    Column("unit_id", String(36), nullable=False),
    Column("principal", Integer, nullable=False),
    Column("deputy", Integer, nullable=False),
    Column("principal_held", Integer, nullable=False),
    Column("deputy_held", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("org_id", "unit_id", name="pk_leader_posts"),
    CheckConstraint("principal >= 0", name="ck_leader_posts_principal"),
    CheckConstraint("deputy >= 0", name="ck_leader_posts_deputy"),
    CheckConstraint("principal_held >= 0", name="ck_leader_posts_principal_held"),
    CheckConstraint("deputy_held >= 0", name="ck_leader_posts_deputy_held"),
)

# Quota-use notices (用编通知单): ``count`` places of one org and category reserved until
# ``valid_until``; ``used`` of them consumed by enrolments. Cancelling or expiry releases the rest.
notices = Table(
    "notices",
    metadata,
    Column("notice_no", String(64), primary_key=True),
    Column("org_id", String(36), nullable=False),
    Column("category", String(32), nullable=False),
    Column("count", Integer, nullable=False),
    Column("used", Integer, nullable=False),
    Column("valid_until", Date, nullable=False),
    Column("status", String(16), nullable=False),
    Column("document", JSON, nullable=False),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("closed_at", DateTime(timezone=True), nullable=True),
    Column("version", Integer, nullable=False),
    CheckConstraint("count >= 1", name="ck_notices_count"),
    CheckConstraint("used >= 0 AND used <= count", name="ck_notices_used"),
    Index("ix_notices_org", "org_id", "category"),
    Index("ix_notices_open", "status", "valid_until"),
)

# The slot each person holds (占编): one at a time (WIRE-CONTRACT §7.3).
slots = Table(
    "slots",
    metadata,
    Column("person_id", String(36), primary_key=True),
    Column("org_id", String(36), nullable=False),
    Column("category", String(32), nullable=False),
    Column("unit_id", String(36), nullable=False),
    Column("leader_post", String(16), nullable=True),
    Column("notice_no", String(64), nullable=False),
    Column("request_id", String(36), nullable=False),
    Column("occupied_at", DateTime(timezone=True), nullable=False),
    Index("ix_slots_org", "org_id", "category"),
)

# Every slot request that took effect, by the saga's request_id: a request sent again under a
# new message id has no second effect.
slot_requests = Table(
    "slot_requests",
    metadata,
    Column("request_id", String(36), primary_key=True),
    Column("request_type", String(200), nullable=False),
    Column("command_id", String(200), nullable=False),
    Column("person_id", String(36), nullable=False),
    Column("org_id", String(36), nullable=False),
    Column("event_id", String(200), nullable=True),
    Column("event_type", String(200), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# One row per province and category. Every change of approved quota or of a limit locks it
# first, so region sums are checked against committed numbers only (PostgreSQL; SQLite has a
# single writer anyway).
ledger_guards = Table(
    "ledger_guards",
    metadata,
    Column("province_code", String(6), nullable=False),
    Column("category", String(32), nullable=False),
    PrimaryKeyConstraint("province_code", "category", name="pk_ledger_guards"),
)

# Every change of the ledger, with its document and effective date; rows are only ever appended.
quota_ledger = Table(
    "quota_ledger",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("event_id", String(200), nullable=False),
    Column("event_type", String(200), nullable=False),
    Column("command_id", String(200), nullable=False),
    Column("org_id", String(36), nullable=True),
    Column("unit_id", String(36), nullable=True),
    Column("division_code", String(6), nullable=True),
    Column("category", String(32), nullable=True),
    Column("document", JSON, nullable=True),
    Column("effective_date", Date, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("actor_id", String(200), nullable=True),
    Column("actor_region", String(12), nullable=True),
    Column("before", JSON, nullable=True),
    Column("after", JSON, nullable=False),
    Index("ix_quota_ledger_org", "org_id", "seq"),
    Index("ix_quota_ledger_division", "division_code", "seq"),
    Index("ix_quota_ledger_event", "event_id"),
)

messaging = messaging_tables(metadata)
