"""The cheaper ways of making message ids and envelope bytes agree with the ways they replaced:
``str(uuid.uuid4())``, ``str(uuid.uuid5(...))`` and
``model_dump_json(exclude_none=True).encode()``.
"""

from __future__ import annotations

import os
import random
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from contracts.envelope import Envelope, derived_id, new_id
from services.roster.domain.model import step_id

# --- ids ------------------------------------------------------------------------------------


def test_new_id_is_the_text_of_a_random_uuid4() -> None:
    seen = set()
    for _ in range(2000):
        text = new_id()
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        seen.add(text)
    assert len(seen) == 2000


def test_new_id_sets_the_bits_uuid4_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(11643)
    draws = [bytes([b]) * 16 for b in range(256)]  # every value of the variant's hex digit
    draws += [rng.randbytes(16) for _ in range(5000)]
    for raw in draws:
        monkeypatch.setattr(os, "urandom", lambda n, raw=raw: raw[:n])
        assert new_id() == str(uuid.UUID(bytes=raw, version=4))
        assert new_id() == str(uuid.uuid4())


@settings(max_examples=2000, deadline=None, derandomize=True)
@given(st.uuids(), st.text(max_size=60))
def test_derived_id_is_the_text_of_uuid5(namespace: uuid.UUID, name: str) -> None:
    try:
        expected = str(uuid.uuid5(namespace, name))
    except UnicodeEncodeError:  # a lone surrogate: refused alike
        with pytest.raises(UnicodeEncodeError):
            derived_id(namespace, name)
        return
    assert derived_id(namespace, name) == expected


def test_saga_step_ids_are_unchanged() -> None:
    # Stored sagas and sent steps carry these ids: the derivation must never change.
    namespace = uuid.UUID("6d1f3c1e-2b9a-4f57-9a36-0b6f5d1c7e21")
    for command_id in ["0b6f5d1c-7e21-4f57-9a36-6d1f3c1e2b9a", "cli-张伟-1", ""]:
        for step in ("occupy", "move", "release", "compensate"):
            assert step_id(command_id, step) == str(uuid.uuid5(namespace, f"{command_id}/{step}"))
    assert step_id("0b6f5d1c-7e21-4f57-9a36-6d1f3c1e2b9a", "occupy") == str(
        uuid.uuid5(namespace, "0b6f5d1c-7e21-4f57-9a36-6d1f3c1e2b9a/occupy")
    )


# --- envelope bytes -------------------------------------------------------------------------

AT = datetime(2026, 3, 1, 8, 30, 15, 123456, tzinfo=UTC)


def envelopes() -> list[Envelope]:
    cst = datetime(2026, 3, 1, 16, 30, tzinfo=timezone(timedelta(hours=8)))
    return [
        Envelope(id="a", source="/s", type="t", time=AT),
        Envelope(
            id=new_id(),
            source="/bianzhi/roster",
            type="bianzhi.roster.PersonEnrolled.v1",
            time=cst,
            subject="张伟",
            correlationid="c",
            causationid="d",
            actorid="wang.fang",
            actorregion="130000",
            actorroles="clerk,approver",
            authorization="x.y.z",
            data={
                "name": "张伟",
                "notice_no": "冀编用〔2026〕7号",
                "nested": {"list": [1, 2.5, None, True, '\u2028"\\'], "empty": {}},
                "none": None,
                "big": 2**60,
            },
        ),
        Envelope.model_validate_json(
            '{"id":"x","source":"/y","type":"z","time":"2026-03-01T00:00:00Z",'
            '"ext":"kept","extnull":null,"data":{"a":"\\ud83d\\ude00"}}'
        ),
    ]


@pytest.mark.parametrize("env", envelopes())
def test_to_bytes_is_model_dump_json_encoded(env: Envelope) -> None:
    assert env.to_bytes() == env.model_dump_json(exclude_none=True).encode()


def test_to_bytes_refuses_what_model_dump_json_refused() -> None:
    env = Envelope(id="a", source="/s", type="t", time=AT, data={"bad": "\ud800"})
    errors: list[type[Exception]] = []
    for dump in (lambda: env.model_dump_json(exclude_none=True).encode(), env.to_bytes):
        with pytest.raises(Exception) as caught:
            dump()
        errors.append(type(caught.value))
    assert errors[0] is errors[1]


def test_envelopes_from_outside_are_still_validated() -> None:
    with pytest.raises(ValidationError):
        Envelope.from_bytes(b'{"id":"","source":"/s","type":"t","time":"2026-03-01T00:00:00Z"}')
    with pytest.raises(ValidationError):
        Envelope.from_bytes(
            b'{"id":"a","source":"/s","type":"t","time":"2026-03-01T00:00:00Z",'
            b'"actorregion":"1300000000000"}'
        )
