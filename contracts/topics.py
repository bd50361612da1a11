"""Topic names of the wire contract (WIRE-CONTRACT §1)."""

from __future__ import annotations

SERVICES: tuple[str, ...] = ("orgs", "quota", "roster", "notify")

COMMAND_RESULTS = "bianzhi.command-results.v1"
DLQ_SUFFIX = ".dlq"


def commands(service: str) -> str:
    """The command topic of ``service``."""
    return f"bianzhi.{service}.commands.v1"


def events(service: str) -> str:
    """The change-event topic of ``service``."""
    return f"bianzhi.{service}.events.v1"


def restricted_events(service: str) -> str:
    """The restricted change-event topic of ``service``: its events with the personal data in
    full, for the consumers authorised for it only (docs/security.md §5)."""
    return f"bianzhi.{service}.events.restricted.v1"


def answers(service: str) -> str:
    """The answers topic of ``service``: the results of the saga steps it sends, which name
    it in their ``replyto`` attribute (docs/contract-extensions.md). They are on
    ``bianzhi.command-results.v1`` as well, as every command's result is; the service reads
    them here, without the results of every other command."""
    return f"bianzhi.{service}.answers.v1"


def dlq(topic: str) -> str:
    """The dead-letter topic of ``topic``."""
    return f"{topic}{DLQ_SUFFIX}"


ORGS_COMMANDS = commands("orgs")
QUOTA_COMMANDS = commands("quota")
ROSTER_COMMANDS = commands("roster")
NOTIFY_COMMANDS = commands("notify")
ORGS_EVENTS = events("orgs")
QUOTA_EVENTS = events("quota")
ROSTER_EVENTS = events("roster")
NOTIFY_EVENTS = events("notify")
ROSTER_EVENTS_RESTRICTED = restricted_events("roster")
ORGS_ANSWERS = answers("orgs")
ROSTER_ANSWERS = answers("roster")

# The services that send saga steps, and so have an answers topic; a ``replyto`` naming any
# other topic is not followed.
SAGA_SERVICES: tuple[str, ...] = ("orgs", "roster")
ANSWER_TOPICS: frozenset[str] = frozenset(answers(s) for s in SAGA_SERVICES)

# Topics whose records carry personal data in full. No bianzhi service consumes them, so they
# have no dead-letter topic: a consumer keeps its own dead letters inside the same boundary.
RESTRICTED_TOPICS: tuple[str, ...] = (ROSTER_EVENTS_RESTRICTED,)


def all_topics() -> list[str]:
    """Every topic of the contract, dead-letter and restricted topics included, in a stable
    order."""
    base = (
        [commands(s) for s in SERVICES]
        + [events(s) for s in SERVICES]
        + [COMMAND_RESULTS]
        + [answers(s) for s in SAGA_SERVICES]
    )
    return base + list(RESTRICTED_TOPICS) + [dlq(t) for t in base]
