"""``signing.canonical_json`` against the writer it replaced: the same bytes, the same refusals.

Every hash of the audit chain and every command signature is computed over these bytes, so the
faster writer must agree with the reference below (the previous implementation, kept verbatim)
on every input: plain JSON values, Chinese and astral-plane text, keys that sort differently by
code point and by UTF-16 code unit, nesting, integral and fractional floats, subclasses of the
plain types (``StrEnum``, ``IntEnum``, ``OrderedDict``, a read-only mapping) and values with no
JSON form at all (a datetime, a set, a non-string key).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, date, datetime
from enum import IntEnum, StrEnum
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.runtime.signing import MAX_SAFE_INTEGER, CanonicalJsonError, canonical_json

# --- the reference: the writer as it was ----------------------------------------------------

_quote = json.encoder.encode_basestring


def reference_canonical_json(value: Any) -> bytes:
    parts: list[str] = []
    _write(value, parts)
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CanonicalJsonError(f"a string holds a lone surrogate: {exc.reason}") from None


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_quote(value))
    elif isinstance(value, int):
        out.append(_integer(value))
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise CanonicalJsonError(f"only integers are allowed, not {value!r}")
        out.append(_integer(int(value)))
    elif isinstance(value, Mapping):
        out.append("{")
        items = sorted(value.items(), key=lambda kv: _utf16_key(kv[0]))
        for i, (key, item) in enumerate(items):
            if i:
                out.append(",")
            out.append(_quote(key))
            out.append(":")
            _write(item, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise CanonicalJsonError(f"not a JSON value: {type(value).__name__}")


def _integer(value: int) -> str:
    if abs(value) > MAX_SAFE_INTEGER:
        raise CanonicalJsonError(f"integer {value} is beyond ±(2**53 - 1)")
    return str(value)


def _utf16_key(key: Any) -> bytes:
    if not isinstance(key, str):
        raise CanonicalJsonError(f"object keys must be strings, not {type(key).__name__}")
    return key.encode("utf-16-be", "surrogatepass")


# --- the comparison -------------------------------------------------------------------------


def outcome(fn: Any, value: Any) -> tuple[str, Any]:
    try:
        return "bytes", fn(value)
    except (CanonicalJsonError, RecursionError) as exc:
        return type(exc).__name__, str(exc)


def assert_same(value: Any) -> None:
    assert outcome(canonical_json, value) == outcome(reference_canonical_json, value)


class Colour(StrEnum):
    RED = "红"
    BLUE = "blue"


class Level(IntEnum):
    ONE = 1
    BIG = 2**60


# Text from every range that matters: ASCII, CJK, the private-use area (sorts after the
# surrogates by code point, before them by UTF-16 unit), astral characters, controls, quotes.
text = st.one_of(
    st.text(max_size=12),
    st.text(alphabet='张伟冀编〔〕号（）\uff61\ue000\U0001f600\U00020000"\\\n\t\x00/', max_size=8),
    st.sampled_from(["", "\ud800", "x\udfff", "\u2028\u2029", "é", "e\u0301"]),
)
keys = st.one_of(text, st.sampled_from(list(Colour)))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53) - 2, max_value=2**53 + 2),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-(2**53), max_value=2**53).map(math.floor).map(float),
    text,
    st.sampled_from([*Colour, *Level]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.lists(inner, max_size=5).map(tuple),
        st.dictionaries(keys, inner, max_size=6),
        st.dictionaries(keys, inner, max_size=4).map(OrderedDict),
        st.dictionaries(keys, inner, max_size=4).map(MappingProxyType),
    ),
    max_leaves=40,
)
odd_values = st.one_of(
    st.sampled_from(
        [datetime(2026, 3, 1, 8, 30, tzinfo=UTC), date(2026, 3, 1), {1, 2}, b"bytes", object()]
    ),
    st.dictionaries(st.one_of(st.integers(), st.none(), text), scalars, min_size=1, max_size=3),
)


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(json_values)
def test_canonical_json_writes_what_the_reference_wrote(value: Any) -> None:
    assert_same(value)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.dictionaries(keys, st.one_of(json_values, odd_values), max_size=5))
def test_canonical_json_refuses_what_the_reference_refused(value: Any) -> None:
    assert_same(value)


@pytest.mark.parametrize(
    "value",
    [
        {"\U0001f600": 1, "\uff61": 2, "\ue000": 3, "a": 4, "": 5},
        {"张": "伟", "冀": ["编", {"号": None, "数": 2**53 - 1}], "z": -(2**53) + 1},
        {"at": datetime(2026, 3, 1, tzinfo=UTC)},
        {"v": 1.5, 1: "key"},
        {1: "key", "v": 1.5},
        {"v": [3.0, -0.0, 1e15, True, False, None]},
        {"k\ud800": 1, "k": 2},
        OrderedDict([("b", 1), ("a", Colour.RED)]),
        [Level.ONE, Level.BIG],
        (),
        {},
        "plain",
    ],
)
def test_canonical_json_matches_the_reference_on_chosen_values(value: Any) -> None:
    assert_same(value)


def test_canonical_json_nests_as_deep_as_the_reference() -> None:
    # The envelope parser refuses JSON nested past 200 levels; the writer takes far more.
    value: Any = "leaf"
    for _ in range(300):
        value = {"a": [value]}
    assert_same(value)
