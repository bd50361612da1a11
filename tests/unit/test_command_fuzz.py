"""Fuzzing the command decoder: whatever arrives, the parsing step answers, it never raises.

For every command type of the contract, at least 10,000 generated Kafka values go through
``CommandConsumer._prepare`` — the parsing, actor and role checks and payload validation that
run before any database work — built with the service's real routing table (its ``COMMANDS``);
the unit of work is never opened. Each must come out as exactly one of: a valid command, a
rejection with a stable reason code whose ``CommandRejected`` result serializes, or a
dead-letter error. Every envelope that parses also goes through the signature check
(``CommandVerifier``), which must answer ``forbidden`` with a documented reason or accept.

Most values are near-valid: the contract's example of the type, signed, then mutated — fields
replaced by wrong types, values from other fields, huge or odd Unicode strings, required fields
removed, actor fields dropped or garbled, the envelope's own attributes broken — plus raw
junk (bytes, non-object JSON, truncated envelopes).

Budget: one Hypothesis example draws a batch of ``BATCH`` envelopes, so per type
``EXAMPLES_PER_TYPE * BATCH >= 10,000`` envelopes cost a few hundred examples' overhead.
``derandomize=True`` fixes the seed (no flaky reds from a new random seed); breadth comes from
the volume. Hypothesis also draws strings and numbers from the constants of the project's modules
the process has imported, so this file run alone meets other inputs than in the whole suite: run
it both ways after changing the decoder (alone, it found the lone surrogate escapes that
``salvageable`` now refuses). The whole file takes about a minute here.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts.base import Command, registry
from contracts.codes import ReasonCode
from contracts.envelope import Envelope
from contracts.results import CommandRejected
from contracts.topics import SERVICES, commands
from services.runtime import signing
from services.runtime.commands import CommandConsumer
from services.runtime.messaging import CommandRoute, RawMessage, command_routes
from services.runtime.signing import CommandVerifier, sign_envelope
from tests.contract.examples import EXAMPLES

ENVELOPES_PER_TYPE = 10_000
MUTATIONS = 12
RAW_JUNK = 4
BATCH = 1 + MUTATIONS + MUTATIONS * (MUTATIONS - 1) // 2 + 1 + 1 + RAW_JUNK  # 85
EXAMPLES_PER_TYPE = math.ceil(ENVELOPES_PER_TYPE / BATCH)
NOW = 1_800_000_000
KEY = Ed25519PrivateKey.generate()
VERIFIER = CommandVerifier({"fe-1": KEY.public_key()}, now_fn=lambda: NOW)
COMMAND_TYPES = sorted(t for t, m in registry().items() if issubclass(m, Command))
STABLE_CODES = {c.value for c in ReasonCode}
HUGE_CHARACTERS = ["x", "长", "\x00", "𝕏", "\u202e", "9", "\ud800"]
ACTOR = {"actorid": "zhang.wei", "actorregion": "130100", "actorroles": "admin"}


def service_routes(service: str) -> dict[str, CommandRoute]:
    """The real routing table of ``service``, as its composition root declares it (empty
    where the service has none yet)."""
    try:
        bootstrap = importlib.import_module(f"services.{service}.bootstrap")
    except ModuleNotFoundError:
        return {}
    return command_routes(bootstrap.definition().command_routes)


def never_called(*_args: Any) -> Any:
    raise AssertionError("the parsing step must not touch the database or the broker")


CONSUMERS = {
    service: CommandConsumer(
        routes=service_routes(service),
        source=f"/bianzhi/{service}",
        service=service,
        consumer=f"{service}.commands",
        uow_factory=never_called,
        dead_letter=never_called,
    )
    for service in SERVICES
}


def leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in leaves(v)]
    return [value]


# Values that are valid somewhere in the contract: the likeliest mistakes of a real sender.
CONTRACT_VALUES = sorted({json.dumps(v) for d in EXAMPLES.values() for v in leaves(d)})

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(CONTRACT_VALUES).map(json.loads),
    st.tuples(st.sampled_from(HUGE_CHARACTERS), st.integers(1, 50_000)).map(
        lambda cn: cn[0] * cn[1]
    ),
)
# Shallow containers: deep nesting costs generation time and finds nothing a flat list does not.
junk = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=8), scalars, max_size=3),
)


def base_envelope(type_: str) -> str:
    """The example of ``type_`` as a signed envelope, in wire form."""
    model = registry()[type_]
    env = model.model_validate(EXAMPLES[type_]).envelope(source="/frontends/fuzz", **ACTOR)
    return sign_envelope(env, KEY, "fe-1", 300, now=NOW).to_bytes().decode()


Mutation = Callable[[dict[str, Any]], None]


@st.composite
def data_mutation(draw: st.DrawFn, fields: list[str]) -> Mutation:
    field = draw(st.sampled_from(fields) | st.text(min_size=1, max_size=12))
    action = draw(st.sampled_from(["set", "delete", "nest"]))
    value = draw(junk)

    def mutate(env: dict[str, Any]) -> None:
        data = env.get("data")
        if not isinstance(data, dict):
            return
        if action == "delete":
            data.pop(field, None)
        elif action == "nest" and isinstance(data.get(field), dict) and data[field]:
            inner = sorted(data[field])[hash(field) % len(data[field])]
            data[field] = {**data[field], inner: value}
        else:
            data[field] = value

    return mutate


ENVELOPE_FIELDS = [
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "subject",
    "datacontenttype",
    "correlationid",
    "causationid",
    "actorid",
    "actorregion",
    "actorroles",
    "authorization",
    "data",
]


@st.composite
def envelope_mutation(draw: st.DrawFn) -> Mutation:
    field = draw(st.sampled_from(ENVELOPE_FIELDS))
    delete = draw(st.booleans())
    value = draw(
        junk
        | st.sampled_from(["clerk", "approver", "admin", "clerk,approver", "", " , ", "root"])
        | st.sampled_from(COMMAND_TYPES)
    )

    def mutate(env: dict[str, Any]) -> None:
        if delete:
            env.pop(field, None)
        else:
            env[field] = value

    return mutate


def encode(env: dict[str, Any], how: int) -> bytes:
    """Wire bytes three ways: escaped ASCII, UTF-8, and UTF-8 with raw surrogates (invalid)."""
    if how == 0:
        return json.dumps(env).encode()
    return json.dumps(env, ensure_ascii=False).encode("utf-8", "surrogatepass")


raw_junk = st.one_of(
    st.binary(max_size=64),
    junk.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b"null", b"{}", b"[]", b'{"id": "x"}']),
)


@st.composite
def envelope_batch(draw: st.DrawFn, type_: str, base: str) -> list[bytes]:
    """About forty envelopes from one draw: the signed example, each of ``MUTATIONS`` drawn
    mutations alone, every pair of them, all of them, all of them cut short, and raw junk."""
    fields = sorted(EXAMPLES[type_])
    mutations = draw(
        st.lists(
            data_mutation(fields) | envelope_mutation(), min_size=MUTATIONS, max_size=MUTATIONS
        )
    )
    cut = draw(st.floats(min_value=0, max_value=1, exclude_max=True))
    combos: list[tuple[Mutation, ...]] = [()]
    combos += [(m,) for m in mutations]
    combos += list(itertools.combinations(mutations, 2))
    combos.append(tuple(mutations))
    batch = []
    for i, combo in enumerate(combos):
        env = json.loads(base)
        for mutate in combo:
            mutate(env)
        batch.append(encode(env, i % 3))
    batch.append(batch[-1][: int(len(batch[-1]) * cut)])
    batch += draw(st.lists(raw_junk, min_size=RAW_JUNK, max_size=RAW_JUNK))
    return batch


def check(consumer: CommandConsumer, value: bytes, seen: Counter[str]) -> None:
    raw = RawMessage(topic=commands(consumer.service), partition=0, offset=0, key=None, value=value)
    p = consumer._prepare(raw)
    if p.dlq_error is not None:
        assert p.command is None and p.rejection is None
        seen["dead_lettered"] += 1
        return
    assert p.env is not None
    if p.rejection is not None:
        assert p.command is None
        assert p.rejection.code.value in STABLE_CODES
        result = consumer._rejected_envelope(p.env, p.rejection)
        assert Envelope.from_bytes(result.to_bytes()).type == CommandRejected.TYPE
        seen[p.rejection.code.value] += 1
    else:
        assert p.route is not None and p.command is not None
        assert p.env.type == p.route.model.TYPE
        seen["valid"] += 1
    refusal = VERIFIER.verify(p.env)
    if refusal is not None:
        assert refusal.code is ReasonCode.FORBIDDEN
        assert refusal.details["reason"] in signing.REASONS
        seen["signature:" + refusal.details["reason"]] += 1


@pytest.mark.parametrize("type_", COMMAND_TYPES)
def test_the_decoder_answers_every_generated_envelope(type_: str) -> None:
    consumer = CONSUMERS[type_.split(".")[1]]
    seen: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES_PER_TYPE,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batch=envelope_batch(type_, base_envelope(type_)))
    def run(batch: list[bytes]) -> None:
        for value in batch:
            check(consumer, value, seen)

    run()
    assert sum(n for k, n in seen.items() if not k.startswith("signature:")) >= ENVELOPES_PER_TYPE
    # The generator must reach every branch, or the run proves little.
    assert seen["dead_lettered"] and seen["invalid_message"]
    if type_ in consumer.routes:
        assert seen["valid"] and seen["forbidden"]
    else:  # a type of the contract its service does not handle yet
        assert seen["unknown_type"]
    assert seen["signature:data_digest_mismatch"] and seen["signature:missing"]
