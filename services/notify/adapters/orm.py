"""The notify database: subscriptions, the events owed to them, deliveries and every attempt
at them, the org projection (division and name), and the messaging tables."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from services.runtime.tables import messaging_tables

metadata = MetaData()

subscriptions = Table(
    "subscriptions",
    metadata,
    Column("subscription_id", String(36), primary_key=True),
    Column("subscriber", String(200), nullable=False),
    Column("event_types", JSON, nullable=False),
    Column("division_code", String(6), nullable=False),
    Column("channel_kind", String(16), nullable=False),
    Column("url", String(2000), nullable=True),
    Column("address", String(254), nullable=True),
    # The webhook's signing key, sealed (AES-GCM, adapters/secrets.py). Never logged, never
    # returned by a query, never in an event.
    Column("secret", Text, nullable=True),
    Column("status", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("removed_at", DateTime(timezone=True), nullable=True),
    Column("created_by", String(200), nullable=True),
    Index("ix_subscriptions_status", "status"),
)

# One copy of each event owed to at least one subscription: the exact body that is POSTed.
notify_events = Table(
    "notify_events",
    metadata,
    Column("event_id", String(200), primary_key=True),
    Column("event_type", String(200), nullable=False),
    Column("topic", String(250), nullable=False),
    Column("correlation_id", String(200), nullable=True),
    Column("body", LargeBinary, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("delivery_id", String(36), primary_key=True),
    Column("subscription_id", String(36), nullable=False),
    Column("event_id", String(200), nullable=False),
    Column("event_type", String(200), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("last_status_code", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    # When the next attempt is due; while an attempt is in flight, when its lease runs out.
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # How often an operator sent it again (`bianzhi deliveries --resend`); each time the
    # attempts start over.
    Column("resends", Integer, nullable=False, server_default="0"),
    # An event is queued once per subscription, however often it arrives.
    UniqueConstraint("subscription_id", "event_id", name="uq_deliveries_subscription_event"),
    Index("ix_deliveries_due", "status", "next_attempt_at"),
    Index("ix_deliveries_subscription", "subscription_id", "created_at"),
)

# Every attempt at a delivery, as it happened: the delivery log shown by the queries.
delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("attempt_id", String(36), primary_key=True),
    Column("delivery_id", String(36), nullable=False),
    Column("subscription_id", String(36), nullable=False),
    Column("event_id", String(200), nullable=False),
    # Number of the attempt within its round (a resend starts a new round).
    Column("attempt", Integer, nullable=False),
    Column("resend", Integer, nullable=False),
    Column("channel_kind", String(16), nullable=False),
    # delivered, retry (another attempt follows) or failed
    Column("outcome", String(16), nullable=False),
    # The HTTP status of a webhook, the SMTP reply code of an e-mail.
    Column("status_code", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("duration_ms", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Index("ix_delivery_attempts_delivery", "delivery_id", "started_at"),
)

# What notify keeps of the orgs events: the division of each org, to place events that only
# name an org (quota and roster events) inside a region, and its name, for e-mails.
org_divisions = Table(
    "org_divisions",
    metadata,
    Column("org_id", String(36), primary_key=True),
    Column("division_code", String(6), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("name", String(200), nullable=True),
)

messaging = messaging_tables(metadata)
