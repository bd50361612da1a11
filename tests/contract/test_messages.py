"""The message models: strict commands, tolerant events, identifier errors and privacy."""

from __future__ import annotations

import re
from datetime import date
from typing import Any

import pytest
from pydantic import ValidationError

from contracts.base import Command, Event, model_for, registry
from contracts.common import Document, effective_date, office_today
from contracts.envelope import Envelope
from contracts.notify import EmailChannel, SubscriptionChannel, WebhookChannel
from contracts.roster import (
    EnrolPerson,
    PersonEnrolled,
    PersonReleased,
    PersonTransferred,
    PersonUpdated,
)

from .examples import CITIZEN_ID, EVENT_EXAMPLES, EXAMPLES

COMMAND_TYPES = sorted(t for t, m in registry().items() if issubclass(m, Command))
EVENT_TYPES = sorted(t for t, m in registry().items() if issubclass(m, Event))
ROSTER_EVENTS = [PersonEnrolled, PersonTransferred, PersonReleased, PersonUpdated]


def error_types(exc: ValidationError) -> list[str]:
    return [error["type"] for error in exc.errors()]


def invalid(type_: str, **changes: Any) -> ValidationError:
    """The validation error of the example of ``type_`` with ``changes`` applied."""
    data = {**EXAMPLES[type_], **changes}
    with pytest.raises(ValidationError) as caught:
        registry()[type_].model_validate(data)
    return caught.value


def test_examples_cover_every_message_type() -> None:
    assert sorted(EXAMPLES) == COMMAND_TYPES
    assert sorted(EVENT_EXAMPLES) == EVENT_TYPES


@pytest.mark.parametrize("type_", COMMAND_TYPES)
def test_every_command_example_parses_and_survives_the_envelope(type_: str) -> None:
    model = registry()[type_]
    message = model.model_validate(EXAMPLES[type_])
    envelope = Envelope.from_bytes(message.envelope(source="/tests").to_bytes())
    assert envelope.type == type_
    assert envelope.subject == str(EXAMPLES[type_][model.SUBJECT])
    assert model_for(envelope.type) is model
    assert model.model_validate(envelope.data) == message


@pytest.mark.parametrize("type_", EVENT_TYPES)
def test_every_event_example_parses_and_survives_the_envelope(type_: str) -> None:
    model = registry()[type_]
    message = model.model_validate(EVENT_EXAMPLES[type_])
    envelope = Envelope.from_bytes(message.envelope(source="/tests").to_bytes())
    assert model.model_validate(envelope.data) == message


@pytest.mark.parametrize("type_", COMMAND_TYPES)
def test_commands_reject_unknown_fields(type_: str) -> None:
    assert error_types(invalid(type_, surprise="x")) == ["extra_forbidden"]


@pytest.mark.parametrize("type_", EVENT_TYPES)
def test_events_ignore_unknown_fields(type_: str) -> None:
    model = registry()[type_]
    plain = model.model_validate(EVENT_EXAMPLES[type_])
    assert model.model_validate({**EVENT_EXAMPLES[type_], "added_in_v1_1": {"x": 1}}) == plain


def test_an_invalid_citizen_id_is_reported_as_invalid_citizen_id() -> None:
    error = invalid("bianzhi.roster.EnrolPerson.v1", citizen_id="110105194912310021")
    assert error_types(error) == ["invalid_citizen_id"]
    assert error.errors()[0]["loc"] == ("citizen_id",)


def test_a_legacy_15_digit_citizen_id_is_normalised() -> None:
    data = {**EXAMPLES["bianzhi.roster.UpdatePerson.v1"], "citizen_id": "130102900307123"}
    command = registry()["bianzhi.roster.UpdatePerson.v1"].model_validate(data)
    assert len(command.citizen_id) == 18


@pytest.mark.parametrize(
    "type_", ["bianzhi.quota.SetRegionLimit.v1", "bianzhi.notify.Subscribe.v1"]
)
def test_an_unknown_division_is_reported_as_unknown_division(type_: str) -> None:
    error = invalid(type_, division_code="999999")
    assert error_types(error) == ["unknown_division"]
    assert error.errors()[0]["loc"] == ("division_code",)


def test_roster_events_never_carry_the_full_citizen_id() -> None:
    full_id = re.compile(r"\d{17}[\dX]")
    for model in ROSTER_EVENTS:
        fields = set(model.model_fields)
        assert "citizen_id" not in fields, model.__name__
        assert {"person_id", "citizen_id_masked"} <= fields, model.__name__
        assert not {"birth_date", "phone"} & fields, model.__name__
        assert model.SUBJECT == "person_id"
        example = model.model_validate(EVENT_EXAMPLES[model.TYPE])
        assert not full_id.search(example.model_dump_json())
    # an event built from a command's data drops the full number, since it is not a field
    enrolled = PersonEnrolled.model_validate(
        {**EVENT_EXAMPLES[PersonEnrolled.TYPE], "citizen_id": CITIZEN_ID}
    )
    assert CITIZEN_ID not in enrolled.model_dump_json()


# --- the rules inside single commands -----------------------------------------------------


def test_transfer_quota_needs_two_different_orgs_and_a_positive_amount() -> None:
    example = EXAMPLES["bianzhi.quota.TransferQuota.v1"]
    assert "value_error" in error_types(
        invalid("bianzhi.quota.TransferQuota.v1", to_org_id=example["from_org_id"])
    )
    assert error_types(invalid("bianzhi.quota.TransferQuota.v1", amount=0)) == [
        "greater_than_equal"
    ]


def test_move_slot_needs_two_different_orgs() -> None:
    example = EXAMPLES["bianzhi.quota.MoveSlot.v1"]
    assert error_types(invalid("bianzhi.quota.MoveSlot.v1", to_org_id=example["from_org_id"])) == [
        "value_error"
    ]


def test_a_notice_is_for_at_least_one_place() -> None:
    assert error_types(invalid("bianzhi.quota.IssueQuotaUseNotice.v1", count=0)) == [
        "greater_than_equal"
    ]


def test_funding_goes_with_institutional_categories_only() -> None:
    type_ = "bianzhi.quota.ApproveQuota.v1"
    assert error_types(invalid(type_, funding="full")) == ["value_error"]
    model = registry()[type_]
    assert model.model_validate({**EXAMPLES[type_], "category": "institutional", "funding": "full"})


def test_region_limit_reached_thresholds_are_90_and_100() -> None:
    model = registry()["bianzhi.quota.RegionLimitReached.v1"]
    data = EVENT_EXAMPLES["bianzhi.quota.RegionLimitReached.v1"]
    assert model.model_validate({**data, "threshold_percent": 100})
    with pytest.raises(ValidationError):
        model.model_validate({**data, "threshold_percent": 80})


def test_enrol_person_checks_birth_date_and_sex_against_the_citizen_id() -> None:
    type_ = "bianzhi.roster.EnrolPerson.v1"
    assert error_types(invalid(type_, birth_date="1950-01-01")) == ["value_error"]
    assert error_types(invalid(type_, sex="male")) == ["value_error"]
    assert error_types(invalid(type_, entry_method="bribe")) == ["enum"]


def test_update_person_needs_a_change_and_refuses_name_birth_date_and_slot() -> None:
    type_ = "bianzhi.roster.UpdatePerson.v1"
    with pytest.raises(ValidationError) as caught:
        registry()[type_].model_validate({"citizen_id": CITIZEN_ID})
    assert error_types(caught.value) == ["value_error"]
    with pytest.raises(ValidationError):
        registry()[type_].model_validate({"citizen_id": CITIZEN_ID, "phone": None})
    for field, value in [
        ("name", "王秀英"),
        ("birth_date", "1950-01-01"),
        ("org_id", EXAMPLES["bianzhi.quota.OccupySlot.v1"]["org_id"]),
        ("category", "support"),
        ("leader_post", "principal"),
    ]:
        assert error_types(invalid(type_, **{field: value})) == ["extra_forbidden"], field


@pytest.mark.parametrize(
    "pattern",
    ["bianzhi.roster.*", "bianzhi.*", "bianzhi.quota.QuotaApproved.v1", "bianzhi.orgs.Org*.v1"],
)
def test_subscribe_accepts_event_type_patterns(pattern: str) -> None:
    type_ = "bianzhi.notify.Subscribe.v1"
    assert registry()[type_].model_validate({**EXAMPLES[type_], "event_types": [pattern]})


@pytest.mark.parametrize(
    "pattern", ["roster.*", "bianzhi.", "bianzhi.roster.$", "bianzhi roster", "Bianzhi.orgs.*"]
)
def test_subscribe_rejects_bad_event_type_patterns(pattern: str) -> None:
    error = invalid("bianzhi.notify.Subscribe.v1", event_types=[pattern])
    assert set(error_types(error)) <= {"string_pattern_mismatch", "string_too_short"}


def test_subscribe_needs_at_least_one_event_type() -> None:
    assert error_types(invalid("bianzhi.notify.Subscribe.v1", event_types=[])) == ["too_short"]


@pytest.mark.parametrize(
    "channel",
    [
        {"kind": "webhook", "url": "ftp://hr.example.gov.cn/x", "secret": "0123456789abcdef"},
        {"kind": "webhook", "url": "https://", "secret": "0123456789abcdef"},
        {"kind": "webhook", "url": "https://u:p@hr.example.gov.cn/", "secret": "0123456789abcdef"},
        {"kind": "webhook", "url": "https://hr.example.gov.cn/hook", "secret": "short"},
        {"kind": "email", "address": "not-an-address"},
        {"kind": "sms", "number": "13800138000"},
        {"kind": "email", "address": "ops@example.gov.cn", "secret": "0123456789abcdef"},
    ],
)
def test_subscribe_rejects_bad_channels(channel: dict[str, Any]) -> None:
    invalid("bianzhi.notify.Subscribe.v1", channel=channel)


def test_subscribe_accepts_an_email_channel_and_http_webhooks() -> None:
    type_ = "bianzhi.notify.Subscribe.v1"
    model = registry()[type_]
    mail = model.model_validate(
        {**EXAMPLES[type_], "channel": {"kind": "email", "address": "ops@example.gov.cn"}}
    )
    assert isinstance(mail.channel, EmailChannel)
    hook = {"kind": "webhook", "url": "http://10.0.0.5:8080/hook", "secret": "0123456789abcdef"}
    assert isinstance(
        model.model_validate({**EXAMPLES[type_], "channel": hook}).channel, WebhookChannel
    )


def test_subscription_events_never_carry_the_webhook_secret() -> None:
    type_ = "bianzhi.notify.Subscribe.v1"
    command = registry()[type_].model_validate(EXAMPLES[type_])
    secret = EXAMPLES[type_]["channel"]["secret"]
    assert secret not in repr(command)
    published = SubscriptionChannel.of(command.channel)
    assert published.model_dump(exclude_none=True) == {
        "kind": "webhook",
        "url": EXAMPLES[type_]["channel"]["url"],
    }
    created = registry()["bianzhi.notify.SubscriptionCreated.v1"].model_validate(
        {
            **EVENT_EXAMPLES["bianzhi.notify.SubscriptionCreated.v1"],
            "channel": EXAMPLES[type_]["channel"],
        }
    )
    assert secret not in created.model_dump_json()


def test_masked_example_matches_the_identifiers_masking() -> None:
    from contracts.identifiers import mask_citizen_id

    assert EVENT_EXAMPLES[PersonEnrolled.TYPE]["citizen_id_masked"] == mask_citizen_id(CITIZEN_ID)


def test_enrol_person_example_is_the_enrol_model() -> None:
    assert registry()[EnrolPerson.TYPE] is EnrolPerson


def test_a_change_takes_effect_as_stated_else_on_its_document_date() -> None:
    doc = Document(title="批复", number="冀编〔2026〕1号", date=date(2026, 1, 5))
    assert effective_date(date(2026, 3, 1), doc) == date(2026, 3, 1)
    assert effective_date(None, doc) == date(2026, 1, 5)
    assert effective_date(None, None) == office_today()
