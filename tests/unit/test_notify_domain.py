"""The rules of notify: matching events to subscriptions, signatures, outcomes, backoff."""

from __future__ import annotations

import hashlib
import hmac
import random
import uuid

import pytest

from services.notify.domain.model import (
    Outcome,
    Subscription,
    SubscriptionStatus,
    backoff_s,
    division_matches,
    outcome_of_status,
    sign,
    type_matches,
    verify,
    wants,
)


def subscription(**kw: object) -> Subscription:
    fields: dict[str, object] = {
        "subscription_id": uuid.uuid4(),
        "subscriber": "石家庄市财政局",
        "event_types": ("bianzhi.roster.*", "bianzhi.quota.OverQuotaDetected.v1"),
        "division_code": "130100",
        "channel_kind": "webhook",
        "url": "https://finance.example/hook",
        "address": None,
        "status": SubscriptionStatus.ACTIVE,
    }
    fields.update(kw)
    return Subscription(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("event_type", "expected"),
    [
        ("bianzhi.roster.PersonEnrolled.v1", True),
        ("bianzhi.roster.PersonReleased.v1", True),
        ("bianzhi.quota.OverQuotaDetected.v1", True),
        ("bianzhi.quota.OverQuotaDetected.v2", False),
        ("bianzhi.quota.QuotaApproved.v1", False),
        ("bianzhi.orgs.OrgRegistered.v1", False),
        ("bianzhi.Roster.PersonEnrolled.v1", False),  # case counts
    ],
)
def test_event_types_match_patterns(event_type: str, expected: bool) -> None:
    patterns = ("bianzhi.roster.*", "bianzhi.quota.OverQuotaDetected.v1")
    assert type_matches(patterns, event_type) is expected


def test_a_pattern_may_hold_wildcards_anywhere() -> None:
    assert type_matches(["bianzhi.*.OrgRegistered.*"], "bianzhi.orgs.OrgRegistered.v1")
    assert type_matches(["bianzhi.*"], "bianzhi.quota.SlotOccupied.v1")
    assert not type_matches([], "bianzhi.quota.SlotOccupied.v1")


def test_divisions_match_the_subscription_region_and_below() -> None:
    assert division_matches("130100", ["130102"])  # 长安区 lies in 石家庄市
    assert division_matches("130000", ["130102"])  # and in 河北省
    assert division_matches("130102", ["130102"])
    assert not division_matches("130200", ["130102"])  # 唐山市 does not hold it
    assert division_matches("130200", ["130102", "130203"])  # either side of a transfer
    assert not division_matches("130100", ["not-a-code"])


def test_wants_needs_an_active_subscription_the_type_and_the_region() -> None:
    sub = subscription()
    enrolled = "bianzhi.roster.PersonEnrolled.v1"
    assert wants(sub, enrolled, {"130102"})
    assert not wants(sub, enrolled, {"140105"})
    assert not wants(sub, "bianzhi.orgs.OrgRenamed.v1", {"130102"})
    assert not wants(subscription(status=SubscriptionStatus.REMOVED), enrolled, {"130102"})


def test_an_event_of_unknowable_division_goes_by_type_alone() -> None:
    sub = subscription()
    assert wants(sub, "bianzhi.roster.PersonEnrolled.v1", None)
    assert not wants(sub, "bianzhi.orgs.OrgRenamed.v1", None)


def test_the_signature_is_hex_hmac_sha256_over_timestamp_dot_body() -> None:
    secret, timestamp, body = "s3cret-s3cret-s3cret", 1764054000, b'{"id":"e1"}'
    expected = hmac.new(secret.encode(), b'1764054000.{"id":"e1"}', hashlib.sha256).hexdigest()
    assert sign(secret, timestamp, body) == f"v1={expected}"
    assert verify(secret, timestamp, body, f"v1={expected}")
    assert not verify("another-secret-value", timestamp, body, f"v1={expected}")
    assert not verify(secret, timestamp + 1, body, f"v1={expected}")
    assert not verify(secret, timestamp, body + b" ", f"v1={expected}")


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (202, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (408, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
        (301, Outcome.FAILED),
        (400, Outcome.FAILED),
        (401, Outcome.FAILED),
        (404, Outcome.FAILED),
        (410, Outcome.FAILED),
    ],
)
def test_http_answers_decide_the_outcome(status: int, outcome: Outcome) -> None:
    assert outcome_of_status(status) is outcome


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(7)
    for attempts, step in [(1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (10, 60.0)]:
        delays = [backoff_s(attempts, 2.0, 60.0, rng) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays)
        assert max(delays) - min(delays) > step / 4  # jittered, not a fixed schedule


# --- alerts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_type", "expected"),
    [
        ("bianzhi.quota.OverQuotaDetected.v1", True),
        ("bianzhi.quota.RegionLimitReached.v1", True),
        ("bianzhi.quota.QuotaUseNoticeExpired.v1", True),
        ("bianzhi.quota.QuotaApproved.v1", False),
        ("bianzhi.roster.PersonEnrolled.v1", False),
    ],
)
def test_alerts_are_matched_by_their_alert_names(event_type: str, expected: bool) -> None:
    assert type_matches(["bianzhi.alerts.*"], event_type) is expected
    assert type_matches([event_type], event_type)  # and by their own type, as ever


def test_one_alert_may_be_chosen_by_its_alert_name() -> None:
    patterns = ["bianzhi.alerts.OverQuotaDetected.v1"]
    assert type_matches(patterns, "bianzhi.quota.OverQuotaDetected.v1")
    assert not type_matches(patterns, "bianzhi.quota.RegionLimitReached.v1")
