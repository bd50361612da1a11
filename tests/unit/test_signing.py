"""Signed commands: canonical JSON, tokens, every refusal, key files and settings."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from contracts.codes import ReasonCode
from contracts.envelope import Envelope
from contracts.orgs import RegisterOrg
from services.runtime import signing
from services.runtime.security_settings import SecuritySettings
from services.runtime.signing import (
    CanonicalJsonError,
    CommandVerifier,
    KeyFileError,
    b64url,
    b64url_decode,
    canonical_json,
    command_verifier,
    data_digest,
    envelope_signer,
    load_public_keys,
    public_jwk,
    sign_envelope,
    sign_token,
    token_claims,
)
from tests.contract.examples import EXAMPLES

NOW = 1_800_000_000
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


def command() -> Any:
    data = EXAMPLES[RegisterOrg.TYPE]
    return RegisterOrg.model_validate(data).envelope(
        source="/frontends/test",
        actorid="zhang.wei",
        actorregion="130100",
        actorroles="approver",
    )


def verifier(**kwargs: Any) -> CommandVerifier:
    options: dict[str, Any] = {"now_fn": lambda: NOW, "max_ttl": 900, "leeway": 60}
    options.update(kwargs)
    return CommandVerifier({"fe-1": KEY.public_key()}, **options)


def reason(env: Any, v: CommandVerifier | None = None) -> str | None:
    rejection = (v or verifier()).verify(env)
    if rejection is None:
        return None
    assert rejection.code is ReasonCode.FORBIDDEN
    assert rejection.message
    return str(rejection.details["reason"])


def with_claims(env: Any, key: Ed25519PrivateKey = KEY, kid: str = "fe-1", **changes: Any) -> Any:
    claims = {**token_claims(env, iat=NOW, exp=NOW + 300), **changes}
    return env.model_copy(update={"authorization": sign_token(claims, key, kid)})


# --- canonical JSON -----------------------------------------------------------------------


def test_canonical_json_sorts_keys_drops_whitespace_and_keeps_unicode() -> None:
    value = {"b": [1, True, None], "a": {"z": "长安区", "y": -0.0}, "": '\n"\\\u0001\u007f'}
    assert (
        canonical_json(value)
        == ('{"":"\\n\\"\\\\\\u0001\u007f","a":{"y":0,"z":"长安区"},"b":[1,true,null]}').encode()
    )


def test_canonical_json_sorts_keys_by_utf16_code_units_like_jcs() -> None:
    # U+1F600 is D83D DE00 in UTF-16, which sorts before U+FF61; code points sort it after.
    value = {"\uff61": 1, "\U0001f600": 2}
    assert canonical_json(value) == '{"\U0001f600":2,"\uff61":1}'.encode()


def test_canonical_json_test_vector_for_other_languages() -> None:
    # docs/security.md quotes this vector: a front-end in any language must produce it.
    data = {"org_id": "3f6c1a52-0b1e-4e8a-9d3a-6c5b2f7e1a01", "name": "长安区", "limit": 12}
    text = '{"limit":12,"name":"长安区","org_id":"3f6c1a52-0b1e-4e8a-9d3a-6c5b2f7e1a01"}'
    assert canonical_json(data) == text.encode()
    assert data_digest(data) == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(
    "bad",
    [1.5, float("nan"), float("inf"), 2**53, -(2**53), 1e20, "\ud800", {1: "x"}, b"x", {1.0}],
)
def test_canonical_json_refuses_what_has_no_portable_form(bad: Any) -> None:
    with pytest.raises(CanonicalJsonError):
        canonical_json({"v": bad})


def test_integral_floats_are_written_as_integers() -> None:
    assert canonical_json([3.0, 2**53 - 1]) == b"[3,9007199254740991]"


def test_base64url_round_trip_and_refusals() -> None:
    assert b64url_decode(b64url(b"\xff\xfe\x00")) == b"\xff\xfe\x00"
    for bad in ("a", "ab=", "ab+c", "é"):
        with pytest.raises(ValueError):
            b64url_decode(bad)


# --- round trip ---------------------------------------------------------------------------


def test_a_signed_command_verifies_and_the_token_is_a_compact_eddsa_jws() -> None:
    env = sign_envelope(command(), KEY, "fe-1", 300, now=NOW)
    assert reason(env) is None
    header_b64, claims_b64, signature_b64 = env.authorization.split(".")
    header = json.loads(b64url_decode(header_b64))
    claims = json.loads(b64url_decode(claims_b64))
    assert header == {"alg": "EdDSA", "kid": "fe-1", "typ": "JWT"}
    assert claims["jti"] == env.id and claims["type"] == env.type
    assert claims["exp"] - claims["iat"] == 300
    assert claims["data_sha256"] == data_digest(env.data)
    assert len(b64url_decode(signature_b64)) == 64


def test_the_token_survives_the_wire() -> None:
    env = sign_envelope(command(), KEY, "fe-1", 300, now=NOW)
    again = type(env).from_bytes(env.to_bytes())
    assert again.authorization == env.authorization
    assert reason(again) is None


def test_leeway_accepts_small_clock_skew() -> None:
    env = sign_envelope(command(), KEY, "fe-1", 300, now=NOW + 50)
    assert reason(env) is None
    late = sign_envelope(command(), KEY, "fe-1", 300, now=NOW - 300 - 50)
    assert reason(late) is None


# --- every refusal ------------------------------------------------------------------------


def test_missing_token() -> None:
    assert reason(command()) == signing.MISSING


@pytest.mark.parametrize(
    "token",
    [
        "not-a-token",
        "a.b",
        "a.b.c.d",
        "!!!.e30.AA",
        b64url(b"[]") + "." + b64url(b"{}") + ".AA",
        b64url(b'{"alg":"EdDSA"}') + "." + b64url(b"{}") + ".AA",
        b64url(b'{"alg":"EdDSA","kid":7}') + "." + b64url(b"{}") + ".AA",
        b64url(b'{"alg":"EdDSA","kid":"fe-1","crit":["x"]}') + "." + b64url(b"{}") + ".AA",
        b64url(b"\xff") + ".e30.AA",
        "x" * 5000,
    ],
)
def test_malformed_token(token: str) -> None:
    assert reason(command().model_copy(update={"authorization": token})) == signing.MALFORMED


def test_a_token_of_another_algorithm_is_refused() -> None:
    header = b64url(json.dumps({"alg": "none", "kid": "fe-1"}).encode())
    env = command().model_copy(update={"authorization": f"{header}.{b64url(b'{}')}."})
    assert reason(env) == signing.UNSUPPORTED_ALGORITHM


def test_an_unknown_kid_is_reported_cut_to_100_characters() -> None:
    rejection = verifier().verify(sign_envelope(command(), KEY, "k" * 1000, 300, now=NOW))
    assert rejection is not None
    assert rejection.details == {"reason": signing.UNKNOWN_KID, "kid": "k" * 100}
    assert len(rejection.message) < 200


def test_unknown_kid() -> None:
    rejection = verifier().verify(sign_envelope(command(), KEY, "fe-9", 300, now=NOW))
    assert rejection is not None
    assert rejection.details == {
        "reason": signing.UNKNOWN_KID,
        "kid": "fe-9",
    }


def test_bad_signature_from_another_key() -> None:
    assert reason(sign_envelope(command(), OTHER, "fe-1", 300, now=NOW)) == signing.BAD_SIGNATURE


def test_bad_signature_when_the_claims_are_edited() -> None:
    env = sign_envelope(command(), KEY, "fe-1", 300, now=NOW)
    header, claims, sig = env.authorization.split(".")
    edited = json.loads(b64url_decode(claims)) | {"actorroles": "admin"}
    forged = f"{header}.{b64url(json.dumps(edited).encode())}.{sig}"
    assert reason(env.model_copy(update={"authorization": forged})) == signing.BAD_SIGNATURE


def test_a_signed_token_with_non_integer_times_is_malformed() -> None:
    assert reason(with_claims(command(), iat="soon")) == signing.MALFORMED
    assert reason(with_claims(command(), exp=True)) == signing.MALFORMED
    assert reason(with_claims(command(), exp=NOW - 1)) == signing.MALFORMED


def test_expired() -> None:
    env = sign_envelope(command(), KEY, "fe-1", 300, now=NOW - 300 - 61)
    assert reason(env) == signing.EXPIRED


def test_not_yet_valid() -> None:
    env = sign_envelope(command(), KEY, "fe-1", 300, now=NOW + 61)
    assert reason(env) == signing.NOT_YET_VALID


def test_ttl_too_long() -> None:
    env = sign_envelope(command(), KEY, "fe-1", 901, now=NOW)
    rejection = verifier().verify(env)
    assert rejection is not None
    assert rejection.details == {"reason": signing.TTL_TOO_LONG, "ttl": 901, "max_ttl": 900}
    assert reason(env, verifier(max_ttl=901)) is None


def test_id_mismatch_a_token_moved_to_another_command() -> None:
    signed = sign_envelope(command(), KEY, "fe-1", 300, now=NOW)
    other = command().model_copy(update={"authorization": signed.authorization})
    assert reason(other) == signing.ID_MISMATCH


def test_type_mismatch() -> None:
    signed = sign_envelope(command(), KEY, "fe-1", 300, now=NOW)
    moved = signed.model_copy(update={"type": "bianzhi.orgs.AbolishOrg.v1"})
    assert reason(moved) == signing.TYPE_MISMATCH


@pytest.mark.parametrize(
    ("field", "value"),
    [("actorid", "li.na"), ("actorregion", "130000"), ("actorroles", "admin"), ("actorid", None)],
)
def test_actor_mismatch(field: str, value: str | None) -> None:
    signed = sign_envelope(command(), KEY, "fe-1", 300, now=NOW)
    rejection = verifier().verify(signed.model_copy(update={field: value}))
    assert rejection is not None
    assert rejection.details == {"reason": signing.ACTOR_MISMATCH, "fields": [field]}


def test_data_digest_mismatch_same_id_different_body() -> None:
    signed = sign_envelope(command(), KEY, "fe-1", 300, now=NOW)
    replayed = signed.model_copy(update={"data": {**signed.data, "name": "另一个机构"}})
    assert reason(replayed) == signing.DATA_DIGEST_MISMATCH


def test_data_key_order_and_whitespace_do_not_matter() -> None:
    signed = sign_envelope(command(), KEY, "fe-1", 300, now=NOW)
    reordered = dict(reversed(list(signed.data.items())))
    assert reason(signed.model_copy(update={"data": reordered})) is None


def test_data_without_a_canonical_form() -> None:
    signed = sign_envelope(command(), KEY, "fe-1", 300, now=NOW)
    fractional = signed.model_copy(update={"data": {**signed.data, "grade": 1.5}})
    assert reason(fractional) == signing.DATA_NOT_CANONICAL


# --- keys ---------------------------------------------------------------------------------


def write_pem(path: Path, key: Ed25519PrivateKey) -> None:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def test_public_keys_from_a_directory_of_pem_and_jwk_files(tmp_path: Path) -> None:
    write_pem(tmp_path / "fe-1.pub.pem", KEY)
    (tmp_path / "fe-2.json").write_text(json.dumps(public_jwk("fe-2", OTHER.public_key())))
    (tmp_path / "fe-1.key.pem").write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "README").write_text("ignored")
    keys = load_public_keys(tmp_path)
    assert sorted(keys) == ["fe-1", "fe-2"]
    v = CommandVerifier(keys, now_fn=lambda: NOW)
    assert v.verify(sign_envelope(command(), OTHER, "fe-2", 300, now=NOW)) is None


def test_public_keys_from_a_jwk_set_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    jwks = [public_jwk("a", KEY.public_key()), public_jwk("b", OTHER.public_key())]
    path.write_text(json.dumps({"keys": jwks}))
    assert sorted(load_public_keys(path)) == ["a", "b"]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("x.json", "{"),
        ("x.json", json.dumps({"kty": "RSA", "kid": "x"})),
        ("x.json", json.dumps({"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "x"})),
        ("x.json", json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519"}]})),
        ("x.pem", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
    ],
)
def test_unusable_key_files_are_named(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(KeyFileError, match=name):
        load_public_keys(tmp_path)


def test_one_kid_for_two_keys_is_an_error(tmp_path: Path) -> None:
    write_pem(tmp_path / "fe-1.pub.pem", KEY)
    (tmp_path / "fe-1.json").write_text(json.dumps(public_jwk("fe-1", OTHER.public_key())))
    with pytest.raises(KeyFileError, match="two different keys"):
        load_public_keys(tmp_path)


def test_a_missing_key_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no such key file"):
        load_public_keys(tmp_path / "absent")


# --- settings -----------------------------------------------------------------------------


def test_signatures_are_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BIANZHI_REQUIRE_SIGNATURES", raising=False)
    assert command_verifier(SecuritySettings()) is None


def test_settings_from_the_environment_build_a_verifier_and_a_signer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_pem(tmp_path / "fe-1.pub.pem", KEY)
    private = tmp_path / "fe-1.key.pem"
    private.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    monkeypatch.setenv("BIANZHI_REQUIRE_SIGNATURES", "true")
    monkeypatch.setenv("BIANZHI_SIGNING_PUBLIC_KEYS", str(tmp_path))
    monkeypatch.setenv("BIANZHI_SIGNING_MAX_TTL_S", "120")
    monkeypatch.setenv("BIANZHI_SIGNING_PRIVATE_KEY", str(private))
    monkeypatch.setenv("BIANZHI_SIGNING_KID", "fe-1")
    monkeypatch.setenv("BIANZHI_SIGNING_TTL_S", "60")
    settings = SecuritySettings()
    v = command_verifier(settings)
    sign = envelope_signer(settings)
    assert v is not None and sign is not None
    assert v.max_ttl == 120
    assert v.verify(sign(command())) is None
    assert v.verify(command()) is not None


def test_required_signatures_need_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIANZHI_REQUIRE_SIGNATURES", "1")
    monkeypatch.delenv("BIANZHI_SIGNING_PUBLIC_KEYS", raising=False)
    with pytest.raises(ValidationError, match="SIGNING_PUBLIC_KEYS"):
        SecuritySettings()


def test_an_empty_key_directory_is_an_error(tmp_path: Path) -> None:
    settings = SecuritySettings(require_signatures=True, signing_public_keys=tmp_path)
    with pytest.raises(KeyFileError, match="no public keys"):
        command_verifier(settings)


def test_the_front_end_example_in_docs_security_md_produces_a_valid_token() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    (snippet,) = re.findall(r"^```python\n(.*?)^```", doc, re.MULTILINE | re.DOTALL)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "docs/security.md", "exec"), namespace)
    pem = KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    wire = json.loads(command().to_bytes())
    signed = Envelope.model_validate(namespace["sign"](wire, pem, "fe-1"))
    assert CommandVerifier({"fe-1": KEY.public_key()}).verify(signed) is None
    tampered = signed.model_copy(update={"data": {**signed.data, "name": "别的机构"}})
    assert reason(tampered, CommandVerifier({"fe-1": KEY.public_key()})) == (
        signing.DATA_DIGEST_MISMATCH
    )


B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
SIGNED = sign_envelope(command(), KEY, "fe-1", 300, now=NOW)


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(
    position=st.integers(min_value=0, max_value=len(SIGNED.authorization or "") - 1),
    replacement=st.sampled_from(B64URL_ALPHABET),
)
def test_any_one_character_change_of_a_valid_token_is_refused(
    position: int, replacement: str
) -> None:
    token = SIGNED.authorization or ""
    assume(token[position] != replacement)
    changed = token[:position] + replacement + token[position + 1 :]
    assert reason(SIGNED.model_copy(update={"authorization": changed})) is not None


def test_base64url_with_stray_bits_is_not_canonical() -> None:
    assert b64url(b"\xff") == "_w"
    with pytest.raises(ValueError, match="canonical"):
        b64url_decode("_x")


def test_docs_security_md_lists_every_refusal_reason() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    table = doc.split("| `details.reason` | meaning |", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE)) == signing.REASONS


def test_a_key_limited_to_some_command_types_signs_only_those(tmp_path: Path) -> None:
    from services.cli.keys import create_key
    from services.runtime.signing import load_key_scopes, load_private_key

    create_key(tmp_path, "roster-saga", allow=["bianzhi.quota.*"])
    create_key(tmp_path, "portal")
    assert load_key_scopes(tmp_path) == {"roster-saga": ("bianzhi.quota.*",)}
    verifier = CommandVerifier(
        load_public_keys(tmp_path), scopes=load_key_scopes(tmp_path), now_fn=lambda: NOW
    )
    saga_key = load_private_key(tmp_path / "roster-saga.key.pem")
    portal_key = load_private_key(tmp_path / "portal.key.pem")
    other = command()  # bianzhi.orgs.RegisterOrg.v1
    step = other.model_copy(update={"type": "bianzhi.quota.OccupySlot.v1"})
    assert verifier.verify(sign_envelope(step, saga_key, "roster-saga", 300, now=NOW)) is None
    refused = verifier.verify(sign_envelope(other, saga_key, "roster-saga", 300, now=NOW))
    assert refused is not None and refused.details["reason"] == "key_not_allowed"
    assert refused.details["allowed"] == ["bianzhi.quota.*"]
    # An unlimited key may sign any type.
    assert verifier.verify(sign_envelope(other, portal_key, "portal", 300, now=NOW)) is None
