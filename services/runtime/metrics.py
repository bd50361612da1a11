"""Prometheus metrics shared by the services (``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

MESSAGES_HANDLED = Counter(
    "bianzhi_messages_handled_total",
    "Messages consumed and handled, by outcome (completed, rejected, duplicate, ignored).",
    ["service", "type", "outcome"],
)
COMMANDS_REJECTED = Counter(
    "bianzhi_commands_rejected_total", "Commands rejected, by reason code.", ["service", "code"]
)
SIGNATURES_REFUSED = Counter(
    "bianzhi_signatures_refused_total",
    "Commands refused for their signature (forbidden), by details.reason (docs/security.md).",
    ["service", "reason"],
)
AUDIT_CHECKPOINTS = Counter(
    "bianzhi_audit_checkpoints_total", "Signed audit checkpoints emitted.", ["service"]
)
DEAD_LETTERED = Counter(
    "bianzhi_dead_lettered_total", "Messages sent to a dead-letter topic.", ["service", "topic"]
)
TRANSIENT_RETRIES = Counter(
    "bianzhi_transient_retries_total",
    "Retries after a transient failure (database unavailable).",
    ["service"],
)
HANDLER_LATENCY = Histogram(
    "bianzhi_handler_latency_seconds",
    "Time from receipt to commit of one message.",
    ["service", "type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MESSAGE_AGE = Histogram(
    "bianzhi_message_age_seconds",
    "Time from a command's production to the start of its handling (queueing and delivery).",
    ["service"],
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60),
)
BATCH_SIZE = Histogram(
    "bianzhi_batch_size",
    "Commands handled per fetch.",
    ["service"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)
FETCH_HOLES = Counter(
    "bianzhi_fetch_holes_total",
    "Fetches that skipped offsets of a partition: read again (read_again), or given up on after "
    "the missing records never became readable (passed).",
    ["outcome"],
)
OFFSET_COMMITS = Counter(
    "bianzhi_offset_commits_total",
    "Offset commit requests of the services' consumers: committed, refused (the partitions had "
    "gone to another member, which reads those records again) or failed (kept for the next one).",
    ["outcome"],
)
FETCH_TRANSACTIONS = Counter(
    "bianzhi_fetch_transactions_total",
    "Fetches bringing records of several topics: handled in one transaction (together), or in "
    "one per topic after that failed (apart: a command refused mid-batch, a failing handler).",
    ["service", "outcome"],
)
OUTBOX_BACKLOG = Gauge(
    "bianzhi_outbox_backlog", "Outbox rows not yet published (as last seen).", ["service"]
)
OUTBOX_PUBLISHED = Counter(
    "bianzhi_outbox_published_total", "Outbox rows published by the relay.", ["service"]
)


def render() -> tuple[bytes, str]:
    """The metrics page and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
