"""The roster database: people (personal data encrypted), their history, the sagas in flight,
the org projection, and the messaging tables."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    Date,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
)

from services.runtime.tables import SeqType, messaging_tables

metadata = MetaData()

# One row per person ever enrolled. The blind index of the citizen ID is unique, so a person
# has one row and that row holds at most one slot (WIRE-CONTRACT §7.3). The number itself is
# stored only encrypted; ``citizen_masked`` is what queries and events show.
people = Table(
    "people",
    metadata,
    Column("person_id", String(36), primary_key=True),
    Column("citizen_index", String(64), nullable=False, unique=True),
    Column("citizen_enc", LargeBinary, nullable=False),
    Column("citizen_masked", String(18), nullable=False),
    Column("name", String(100), nullable=False),
    Column("sex", String(8), nullable=False),
    Column("birth_date", Date, nullable=False),
    Column("ethnicity", String(50), nullable=True),
    Column("education", String(50), nullable=True),
    Column("political_status", String(50), nullable=True),
    Column("phone_enc", LargeBinary, nullable=True),
    # enrolling | active | transferring | releasing | released | failed
    Column("status", String(16), nullable=False),
    Column("org_id", String(36), nullable=False),
    Column("category", String(32), nullable=False),
    Column("notice_no", String(64), nullable=False),
    Column("position", String(100), nullable=True),
    Column("leader_post", String(16), nullable=True),
    Column("unit_id", String(36), nullable=True),
    Column("entry_method", String(32), nullable=False),
    Column("enrolled_on", Date, nullable=True),
    Column("released_on", Date, nullable=True),
    Column("release_reason", String(32), nullable=True),
    Column("saga_id", String(36), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("version", Integer, nullable=False),
    Index("ix_people_org", "org_id", "status"),
)

# Every change of a person, with its document and effective date.
person_history = Table(
    "person_history",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("person_id", String(36), nullable=False),
    Column("event_id", String(200), nullable=False),
    Column("event_type", String(200), nullable=False),
    Column("org_id", String(36), nullable=False),
    Column("category", String(32), nullable=True),
    Column("effective_date", Date, nullable=True),
    Column("document", JSON, nullable=True),
    Column("details", JSON, nullable=False),
    Column("command_id", String(200), nullable=True),
    Column("actor_id", String(200), nullable=True),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Index("ix_person_history_person", "person_id", "seq"),
)

# A saga in flight or ended: the command that started it (its envelope without data, for the
# result), the quota step it waits for, and what to apply when the step succeeds.
sagas = Table(
    "sagas",
    metadata,
    Column("saga_id", String(36), primary_key=True),
    Column("kind", String(16), nullable=False),  # enrol | transfer | release
    Column("person_id", String(36), nullable=False),
    Column("command_id", String(200), nullable=False),
    Column("command_envelope", LargeBinary, nullable=False),
    Column("step_request_id", String(36), nullable=False, unique=True),
    Column("step_type", String(200), nullable=False),
    Column("compensation_request_id", String(36), nullable=True, unique=True),
    # waiting → completed | rejected; on a timeout, an enrolment: timed_out (compensation sent)
    # → compensated; a transfer or release: cancelling (cancel sent) → cancelled | completed;
    # compensation_failed when quota refused the compensation or the cancel.
    Column("status", String(16), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("deadline", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Index("ix_sagas_due", "status", "deadline"),
)

# What the roster keeps of the orgs events: enough to refuse early (org not active, outside
# the actor's region, category not allowed for its kind). Quota decides when it is unknown here.
org_projection = Table(
    "org_projection",
    metadata,
    Column("org_id", String(36), primary_key=True),
    Column("name", String(200), nullable=True),
    Column("kind", String(32), nullable=True),
    Column("division_code", String(6), nullable=True),
    Column("status", String(16), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Which personal-data key computed the stored blind indexes (purpose ``blind_index``): recorded
# when the roster first starts, checked at every start against the keys configured, since a
# number must hash as it did when it was stored to be found (docs/deploy.md). And which key
# everything was encrypted under when a re-encryption last finished clean (``encryption``).
personal_data_keys = Table(
    "personal_data_keys",
    metadata,
    Column("purpose", String(16), primary_key=True),
    Column("key_id", String(16), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)

messaging = messaging_tables(metadata)
