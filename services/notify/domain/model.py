"""The rules of notify: which subscription wants an event, how a webhook is signed, and what
an HTTP answer means for a delivery. Pure functions; no I/O."""

from __future__ import annotations

import hashlib
import hmac
import random
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from uuid import UUID

from contracts import identifiers


class SubscriptionStatus(StrEnum):
    ACTIVE = "active"
    REMOVED = "removed"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class Subscription:
    subscription_id: UUID
    subscriber: str
    event_types: tuple[str, ...]
    division_code: str
    channel_kind: str
    url: str | None
    address: str | None
    status: SubscriptionStatus


# Alerts (预警) for staffing offices. Each is also known as ``bianzhi.alerts.<Name>.v<n>``, so
# an office subscribes to every alert, present and future, with ``bianzhi.alerts.*``.
ALERT_TYPES: dict[str, str] = {
    "bianzhi.quota.OverQuotaDetected.v1": "bianzhi.alerts.OverQuotaDetected.v1",
    "bianzhi.quota.RegionLimitReached.v1": "bianzhi.alerts.RegionLimitReached.v1",
    "bianzhi.quota.QuotaUseNoticeExpired.v1": "bianzhi.alerts.QuotaUseNoticeExpired.v1",
}


def is_alert(event_type: str) -> bool:
    return event_type in ALERT_TYPES


def type_matches(patterns: Iterable[str], event_type: str) -> bool:
    """Whether ``event_type`` (or, for an alert, its ``bianzhi.alerts.…`` name) matches any
    pattern (``*`` is any run of characters, case counts)."""
    names = [event_type]
    if alias := ALERT_TYPES.get(event_type):
        names.append(alias)
    return any(fnmatchcase(name, pattern) for pattern in patterns for name in names)


def division_matches(subscription_division: str, event_divisions: Iterable[str]) -> bool:
    """Whether any of the event's divisions lies inside the subscription's division."""
    for code in event_divisions:
        try:
            if identifiers.is_within(code, subscription_division):
                return True
        except identifiers.IdentifierError:
            continue
    return False


def wants(sub: Subscription, event_type: str, event_divisions: set[str] | None) -> bool:
    """Whether ``sub`` is owed an event of ``event_type`` concerning ``event_divisions``.

    ``None`` means the event's division cannot be known (an org notify has not seen yet): then
    only the type decides, so an event is never silently lost to a missing projection row.
    """
    if sub.status is not SubscriptionStatus.ACTIVE:
        return False
    if not type_matches(sub.event_types, event_type):
        return False
    if event_divisions is None:
        return True
    return division_matches(sub.division_code, event_divisions)


# --- webhook signatures -----------------------------------------------------------------------

SIGNATURE_VERSION = "v1"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1=`` + hex HMAC-SHA256 of ``f"{timestamp}.{body}"``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def verify(secret: str, timestamp: int, body: bytes, signature: str) -> bool:
    """Whether ``signature`` is the one ``sign`` makes (constant-time comparison)."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


# --- outcomes -----------------------------------------------------------------------------


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"


RETRYABLE_STATUSES = frozenset({408, 429})


def outcome_of_status(status: int) -> Outcome:
    """2xx delivered; 408, 429 and 5xx are worth retrying; anything else fails at once."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status in RETRYABLE_STATUSES or 500 <= status < 600:
        return Outcome.RETRY
    return Outcome.FAILED


def backoff_s(
    attempts: int, initial_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """The wait after ``attempts`` failed tries: exponential, capped, with "equal jitter"
    (half the step fixed, half random), so receivers coming back are not hit all at once."""
    step = min(max_s, initial_s * 2 ** max(0, attempts - 1))
    return step / 2 + (rng or random).uniform(0, step / 2)
