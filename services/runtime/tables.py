"""The tables every service database holds: outbox, inbox, command results and the audit log."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
)

from services.runtime.audit import audit_table

# SQLite only auto-increments an INTEGER PRIMARY KEY.
SeqType = BigInteger().with_variant(Integer(), "sqlite")


@dataclass(frozen=True)
class MessagingTables:
    outbox: Table
    inbox: Table
    command_results: Table
    audit: Table


def messaging_tables(metadata: MetaData) -> MessagingTables:
    """Declare the messaging tables in a service's metadata."""
    outbox = Table(
        "outbox",
        metadata,
        # seq orders publication; one key's rows are published in seq order.
        Column("seq", SeqType, primary_key=True, autoincrement=True),
        Column("message_id", String(200), nullable=False, index=True),
        Column("topic", String(250), nullable=False),
        Column("key", String(200), nullable=True),
        Column("value", LargeBinary, nullable=False),
        Column("headers", JSON, nullable=False),
        Column("message_type", String(200), nullable=False),
        Column("correlation_id", String(200), nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("published_at", DateTime(timezone=True), nullable=True),
        Index("ix_outbox_unpublished", "published_at", "seq"),
        Index("ix_outbox_created", "created_at"),
    )
    inbox = Table(
        "inbox",
        metadata,
        Column("consumer", String(100), nullable=False),
        Column("message_id", String(200), nullable=False),
        Column("message_type", String(200), nullable=True),
        Column("received_at", DateTime(timezone=True), nullable=False),
        # The duplicate check is this key failing inside the business transaction.
        PrimaryKeyConstraint("consumer", "message_id", name="pk_inbox"),
    )
    command_results = Table(
        "command_results",
        metadata,
        Column("command_id", String(200), primary_key=True),
        Column("command_type", String(200), nullable=False),
        Column("result_type", String(200), nullable=False),
        Column("code", String(50), nullable=True),
        Column("actor_id", String(200), nullable=True),
        Column("actor_region", String(12), nullable=True),
        Column("envelope", LargeBinary, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    return MessagingTables(
        outbox=outbox,
        inbox=inbox,
        command_results=command_results,
        audit=audit_table(metadata),
    )
