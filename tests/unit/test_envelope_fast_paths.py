"""Message ids and envelope bytes: new ids are UUIDs version 7 of the time they are made (RFC
9562); the cheaper ways of making derived ids and envelope bytes agree with the ways they
replaced, ``str(uuid.uuid5(...))`` and ``model_dump_json(exclude_none=True).encode()``.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from contracts.envelope import Envelope, derived_id, derived_id_after, new_id
from services.roster.domain.model import step_id

# --- ids ------------------------------------------------------------------------------------


def test_new_id_is_the_text_of_a_uuid7_of_now() -> None:
    seen = set()
    for _ in range(2000):
        before = time.time_ns() // 1_000_000
        text = new_id()
        after = time.time_ns() // 1_000_000
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert before <= parsed.int >> 80 <= after  # its first 48 bits: the Unix time in ms
        seen.add(text)
    assert len(seen) == 2000


def test_new_ids_sort_in_the_order_they_were_made() -> None:
    # Each id's time goes to 1/4,096 ms: ids of different ticks sort by time, whatever their
    # random bits (this loop takes more than a tick per id only now and then; the ids of
    # one tick differ in their random bits, in no order).
    made = [new_id() for _ in range(5000)]
    ticks = [uuid.UUID(text).int >> 64 & ~(0xF << 12) for text in made]  # time bits only
    assert ticks == sorted(ticks)
    assert len(set(ticks)) > 100
    assert sorted(made) == sorted(made, key=lambda t: (uuid.UUID(t).int >> 64, t))


def test_new_id_puts_the_time_and_random_bits_where_rfc_9562_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(11643)
    draws = [bytes([b]) * 8 for b in (0, 0x3F, 0x40, 0x7F, 0x80, 0xBF, 0xC0, 0xFF)]
    draws += [rng.randbytes(8) for _ in range(3000)]
    for raw in draws:
        ns = rng.randrange(0, 2**48 * 1_000_000)
        monkeypatch.setattr(os, "urandom", lambda n, raw=raw: raw[:n])
        monkeypatch.setattr(time, "time_ns", lambda ns=ns: ns)
        ms, within = divmod(ns, 1_000_000)
        expected = uuid.UUID(
            int=ms << 80
            | 7 << 76
            | (within * 4096 // 1_000_000) << 64
            | 0b10 << 62
            | int.from_bytes(raw) & (2**62 - 1)
        )
        assert new_id() == str(expected)
        assert expected.version == 7


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


SAGA_NAMESPACE = uuid.UUID("6d1f3c1e-2b9a-4f57-9a36-0b6f5d1c7e21")


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.uuids(version=4), st.text(max_size=30))
def test_an_id_derived_after_an_id_not_of_version_7_is_the_uuid5(
    parent: uuid.UUID, name: str
) -> None:
    for parent_id in (str(parent), str(parent).upper(), f"cli-{name}", ""):
        assert derived_id_after(parent_id, SAGA_NAMESPACE, name) == derived_id(SAGA_NAMESPACE, name)
    upper_v7 = new_id().upper()  # not the text new_id writes
    assert derived_id_after(upper_v7, SAGA_NAMESPACE, name) == derived_id(SAGA_NAMESPACE, name)


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(st.integers(0, 2**48 - 1), st.integers(0, 4095), st.integers(0, 2**62 - 1), st.text())
def test_an_id_derived_after_a_version_7_id_keeps_its_time_and_hashes_the_name(
    ms: int, within: int, rand: int, name: str
) -> None:
    parent = uuid.UUID(int=ms << 80 | 7 << 76 | within << 64 | 0b10 << 62 | rand)
    digest = hashlib.sha1(SAGA_NAMESPACE.bytes + name.encode("utf-8", "surrogatepass")).digest()
    try:
        derived = derived_id_after(str(parent), SAGA_NAMESPACE, name)
    except UnicodeEncodeError:  # a lone surrogate: refused as derived_id refuses it
        with pytest.raises(UnicodeEncodeError):
            derived_id(SAGA_NAMESPACE, name)
        return
    expected = uuid.UUID(
        int=ms << 80
        | 8 << 76
        | within << 64
        | 0b10 << 62
        | int.from_bytes(digest[8:16]) & (2**62 - 1)
    )
    assert derived == str(expected)
    assert expected.version == 8 and expected.variant == uuid.RFC_4122
    assert derived_id_after(str(parent), SAGA_NAMESPACE, name) == derived  # the same again


def test_step_ids_of_new_commands_sort_as_the_commands_do_and_differ_by_step() -> None:
    commands = [new_id() for _ in range(3000)]
    steps = {step: [step_id(c, step) for c in commands] for step in ("occupy", "compensate")}
    for ids in steps.values():
        ticks = [uuid.UUID(i).int >> 64 & ~(0xF << 12) for i in ids]
        assert ticks == [uuid.UUID(c).int >> 64 & ~(0xF << 12) for c in commands]
        assert len(set(ids)) == len(commands)
    assert not set(steps["occupy"]) & set(steps["compensate"])
    assert not set(steps["occupy"]) & set(commands)


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
