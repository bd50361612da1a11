"""Signed commands: an Ed25519 compact JWS in the envelope's ``authorization`` extension.

Kafka does not say who produced a record, so the proof travels with the command. A front-end
system holds an Ed25519 key pair; services hold the public keys by key id (``kid``). The token
binds the actor fields, the envelope ``id`` and ``type``, a lifetime and the SHA-256 of the
canonical JSON of ``data``; a command whose token is missing, malformed, unknown, wrongly signed,
expired, or does not match its envelope is refused with ``forbidden`` (``docs/security.md``).

Token: ``base64url(header) "." base64url(claims) "." base64url(signature)`` (RFC 7515 compact
form, no padding), header ``{"alg": "EdDSA", "kid": KID, "typ": "JWT"}``, claims::

    {"jti": envelope id, "type": envelope type, "actorid": …, "actorregion": …, "actorroles": …,
     "iat": issued (Unix seconds), "exp": expiry (Unix seconds), "data_sha256": hex digest}

Canonical JSON (``canonical_json``) follows RFC 8785 (JCS) for the values a command can hold:
object keys sorted by their UTF-16 code units, no whitespace, UTF-8, strings escaped as
ECMAScript ``JSON.stringify`` does, integers in plain decimal. Numbers must be integers of at
most 2**53 - 1 in magnitude (a float with a fraction, NaN or an infinity is refused, so every
language produces the same bytes); a float with an integral value (``3.0``) is written ``3``.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from contracts.codes import ReasonCode
from contracts.envelope import Envelope
from services.runtime.rules import Rejection
from services.runtime.security_settings import SecuritySettings

log = structlog.get_logger("bianzhi.signing")

ALGORITHM = "EdDSA"
MAX_TOKEN_LENGTH = 4_096
MAX_SAFE_INTEGER = 2**53 - 1

# details["reason"] of each refusal: stable strings, documented in docs/security.md.
MISSING = "missing"
MALFORMED = "malformed"
UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
UNKNOWN_KID = "unknown_kid"
BAD_SIGNATURE = "bad_signature"
TTL_TOO_LONG = "ttl_too_long"
NOT_YET_VALID = "not_yet_valid"
EXPIRED = "expired"
ID_MISMATCH = "id_mismatch"
TYPE_MISMATCH = "type_mismatch"
ACTOR_MISMATCH = "actor_mismatch"
DATA_NOT_CANONICAL = "data_not_canonical"
DATA_DIGEST_MISMATCH = "data_digest_mismatch"
KEY_NOT_ALLOWED = "key_not_allowed"
REASONS = frozenset(
    {
        MISSING,
        MALFORMED,
        UNSUPPORTED_ALGORITHM,
        UNKNOWN_KID,
        BAD_SIGNATURE,
        TTL_TOO_LONG,
        NOT_YET_VALID,
        EXPIRED,
        ID_MISMATCH,
        TYPE_MISMATCH,
        ACTOR_MISMATCH,
        DATA_NOT_CANONICAL,
        DATA_DIGEST_MISMATCH,
        KEY_NOT_ALLOWED,
    }
)

# A JWK member that limits a key to some command types: a list of patterns (``fnmatch``, e.g.
# ``"bianzhi.quota.*"``). A service's saga key is limited to the commands its sagas send.
ALLOW_MEMBER = "bianzhi_allow"

_ACTOR_CLAIMS = ("actorid", "actorregion", "actorroles")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
# json.dumps(s, ensure_ascii=False) without building an encoder per string: the JCS escaping.
_quote = json.encoder.encode_basestring
_first = itemgetter(0)


class KeyFileError(ValueError):
    """A key file or directory that cannot be used; the message names the file."""


class CanonicalJsonError(ValueError):
    """A value that has no canonical JSON form (a fractional float, a lone surrogate, …)."""


# --- canonical JSON -----------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 (JCS) bytes of a JSON value whose numbers are all integers."""
    try:
        return _text(value).encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (from "\ud800" in the JSON)
        raise CanonicalJsonError(f"a string holds a lone surrogate: {exc.reason}") from None


def data_digest(data: Mapping[str, Any]) -> str:
    """The hex SHA-256 of the canonical JSON of a command's ``data``."""
    return hashlib.sha256(canonical_json(dict(data))).hexdigest()


def _text(value: Any) -> str:
    """The canonical JSON text of ``value``, one call per level of nesting.

    The plain types (``str``, ``int``, ``dict``, ``list``, ``tuple``) are told by their exact
    type first, the common case; subclasses and floats then go through ``isinstance`` checks
    in the order that decides between them.
    """
    kind = type(value)
    if kind is str:
        return _quote(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if kind is int:
        return _integer(value)
    if kind is not dict and kind is not list and kind is not tuple:
        if isinstance(value, str):
            return _quote(value)
        if isinstance(value, int):
            return _integer(value)
        if isinstance(value, float):
            if not math.isfinite(value) or not value.is_integer():
                raise CanonicalJsonError(f"only integers are allowed, not {value!r}")
            return _integer(int(value))
        if not isinstance(value, Mapping | list | tuple):
            raise CanonicalJsonError(f"not a JSON value: {type(value).__name__}")
    parts: list[str] = []
    if isinstance(value, Mapping):
        # Plain str keys within the Basic Multilingual Plane sort the same by code point as by
        # UTF-16 code unit (the two differ only for a character past U+FFFF).
        items = sorted(value.items(), key=_first if _bmp_keys(value) else _utf16_item)
        for key, item in items:
            parts.append(_quote(key) + ":" + (_quote(item) if type(item) is str else _text(item)))
        return "{" + ",".join(parts) + "}"
    for item in value:
        parts.append(_quote(item) if type(item) is str else _text(item))
    return "[" + ",".join(parts) + "]"


def _bmp_keys(value: Mapping[Any, Any]) -> bool:
    """Whether every key is a plain ``str`` with no character past U+FFFF."""
    for key in value:
        if type(key) is not str or not (key.isascii() or max(key) <= "\uffff"):
            return False
    return True


def _integer(value: int) -> str:
    if abs(value) > MAX_SAFE_INTEGER:
        raise CanonicalJsonError(f"integer {value} is beyond ±(2**53 - 1)")
    return str(value)


def _utf16_item(item: tuple[Any, Any]) -> bytes:
    return _utf16_key(item[0])


def _utf16_key(key: Any) -> bytes:
    if not isinstance(key, str):
        raise CanonicalJsonError(f"object keys must be strings, not {type(key).__name__}")
    return key.encode("utf-16-be", "surrogatepass")


# --- base64url and keys -------------------------------------------------------------------


def b64url(raw: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """The bytes of canonical unpadded base64url text; ``ValueError`` on anything else."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64url: {exc}") from None
    if b64url(raw) != text:  # stray bits in the last character: one value, one spelling
        raise ValueError("not canonical base64url")
    return raw


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """``SHA256:<base64url>`` of the raw 32-byte public key (the form OpenSSH prints)."""
    return "SHA256:" + b64url(hashlib.sha256(raw_public_key(key)).digest())


def public_jwk(kid: str, key: Ed25519PublicKey, **extra: Any) -> dict[str, Any]:
    """The public key as a JWK (RFC 8037): ``{"kty": "OKP", "crv": "Ed25519", "x", "kid"}``."""
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": ALGORITHM,
        "kid": kid,
        "x": b64url(raw_public_key(key)),
        **extra,
    }


def jwk_public_key(jwk: Mapping[str, Any]) -> Ed25519PublicKey:
    """The Ed25519 public key of a JWK; ``ValueError`` for any other kind of key."""
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise ValueError("not an Ed25519 key (kty OKP, crv Ed25519)")
    x = jwk.get("x")
    if not isinstance(x, str):
        raise ValueError("no x")
    raw = b64url_decode(x)
    if len(raw) != 32:
        raise ValueError("x is not 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An unencrypted Ed25519 private key from a PKCS#8 PEM file."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a readable unencrypted private key PEM ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key")
    return key


def load_public_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    """Public keys by kid from a file or a directory of files.

    ``<kid>.pub.pem`` (or ``<kid>.pem``): a SubjectPublicKeyInfo PEM, the kid is the file name;
    ``*.json``: one JWK with ``kid`` or a JWK set ``{"keys": [...]}``. In a directory, private
    key files (``*.key.pem``) and other files are ignored. One kid naming two different keys is
    an error.
    """
    return {kid: key for kid, (key, _) in _load_keys(path).items()}


def load_key_scopes(path: Path) -> dict[str, tuple[str, ...]]:
    """The command types each limited key may sign (its JWK's ``bianzhi_allow``), by kid."""
    return {kid: allow for kid, (_, allow) in _load_keys(path).items() if allow is not None}


def _load_keys(path: Path) -> dict[str, tuple[Ed25519PublicKey, tuple[str, ...] | None]]:
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file()
            and (p.suffix == ".json" or (p.suffix == ".pem" and not p.name.endswith(".key.pem")))
        )
    elif path.is_file():
        files = [path]
    else:
        raise KeyFileError(f"{path}: no such key file or directory")
    keys: dict[str, tuple[Ed25519PublicKey, tuple[str, ...] | None]] = {}
    for file in files:
        for kid, key, allow in _keys_of_file(file):
            known = keys.get(kid)
            if known is not None:
                if raw_public_key(known[0]) != raw_public_key(key):
                    raise KeyFileError(f"{file}: kid {kid!r} names two different keys")
                # The same key as PEM and as JWK: a limit on either one holds.
                allow = known[1] if allow is None else allow
            keys[kid] = (key, allow)
    return keys


def _keys_of_file(file: Path) -> list[tuple[str, Ed25519PublicKey, tuple[str, ...] | None]]:
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{file}: cannot read ({exc.strerror})") from None
    if file.suffix == ".pem":
        try:
            key = serialization.load_pem_public_key(raw)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{file}: not a public key PEM ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{file}: not an Ed25519 public key")
        return [(file.name.removesuffix(".pem").removesuffix(".pub"), key, None)]
    try:
        doc = json.loads(raw)
        jwks = doc["keys"] if isinstance(doc, dict) and "keys" in doc else [doc]
        found = []
        for jwk in jwks:
            kid = jwk.get("kid")
            if not isinstance(kid, str) or not kid:
                raise ValueError("a key has no kid")
            found.append((kid, jwk_public_key(jwk), _allow(jwk)))
        return found
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise KeyFileError(f"{file}: not a JWK or JWK set of Ed25519 keys ({exc})") from None


def _allow(jwk: Mapping[str, Any]) -> tuple[str, ...] | None:
    allow = jwk.get(ALLOW_MEMBER)
    if allow is None:
        return None
    if not isinstance(allow, list) or not all(isinstance(p, str) and p for p in allow):
        raise ValueError(f"{ALLOW_MEMBER} must be a list of command type patterns")
    return tuple(allow)


# --- signing ------------------------------------------------------------------------------


def token_claims(env: Envelope, *, iat: int, exp: int) -> dict[str, Any]:
    """The claims that bind ``env``: its id, type, actor, lifetime and data digest."""
    return {
        "jti": env.id,
        "type": env.type,
        "actorid": env.actorid,
        "actorregion": env.actorregion,
        "actorroles": env.actorroles,
        "iat": iat,
        "exp": exp,
        "data_sha256": data_digest(env.data),
    }


def sign_token(claims: Mapping[str, Any], private_key: Ed25519PrivateKey, kid: str) -> str:
    """A compact JWS (EdDSA) of ``claims``."""
    header = {"alg": ALGORITHM, "kid": kid, "typ": "JWT"}
    signing_input = f"{b64url(canonical_json(header))}.{b64url(canonical_json(dict(claims)))}"
    signature = private_key.sign(signing_input.encode("ascii"))
    return f"{signing_input}.{b64url(signature)}"


def signed_token(
    env: Envelope,
    private_key: Ed25519PrivateKey,
    kid: str,
    ttl: int,
    *,
    now: float | None = None,
) -> str:
    """The ``authorization`` token of ``env``, valid for ``ttl`` seconds from ``now``."""
    issued = int(time.time() if now is None else now)
    return sign_token(token_claims(env, iat=issued, exp=issued + ttl), private_key, kid)


def sign_envelope(
    env: Envelope,
    private_key: Ed25519PrivateKey,
    kid: str,
    ttl: int,
    *,
    now: float | None = None,
) -> Envelope:
    """A copy of ``env`` carrying its signed ``authorization`` token."""
    token = signed_token(env, private_key, kid, ttl, now=now)
    return env.model_copy(update={"authorization": token})


# --- verifying ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    kid: str
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


class _Refused(Exception):
    def __init__(self, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.details = details


class CommandVerifier:
    """Checks a command's ``authorization`` token; ``verify`` returns a refusal or ``None``.

    Pure and cheap (one Ed25519 verification, one SHA-256): it runs in the consumer's parsing
    step, before any database work.
    """

    def __init__(
        self,
        public_keys_by_kid: Mapping[str, Ed25519PublicKey],
        *,
        now_fn: Callable[[], float] = time.time,
        max_ttl: int = 900,
        leeway: int = 60,
        scopes: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.keys = dict(public_keys_by_kid)
        # kid → the command type patterns that key may sign; a kid not here may sign any.
        self.scopes = {kid: tuple(p) for kid, p in (scopes or {}).items()}
        self.now_fn = now_fn
        self.max_ttl = max_ttl
        self.leeway = leeway

    def verify(self, env: Envelope) -> Rejection | None:
        """``None`` when the token is valid for ``env``; else ``forbidden`` with a reason."""
        try:
            self._check(env)
        except _Refused as refused:
            return Rejection(
                ReasonCode.FORBIDDEN,
                refused.message,
                {"reason": refused.reason, **refused.details},
            )
        return None

    def _check(self, env: Envelope) -> None:
        if not env.authorization:
            raise _Refused(MISSING, "the command carries no signature / 指令未签名")
        token = _parse(env.authorization)
        key = self.keys.get(token.kid)
        if key is None:
            kid = token.kid[:100]
            raise _Refused(
                UNKNOWN_KID,
                f"the command is signed with an unknown key {kid!r} / 签名密钥未知",
                kid=kid,
            )
        try:
            key.verify(token.signature, token.signing_input)
        except InvalidSignature:
            raise _Refused(
                BAD_SIGNATURE, "the command's signature is not valid / 指令签名无效", kid=token.kid
            ) from None
        allowed = self.scopes.get(token.kid)
        if allowed is not None and not any(fnmatch.fnmatchcase(env.type, p) for p in allowed):
            raise _Refused(
                KEY_NOT_ALLOWED,
                f"key {token.kid!r} may not sign {env.type[:200]!r} / 该密钥无权签署此类指令",
                kid=token.kid,
                allowed=list(allowed),
            )
        claims = token.claims
        iat, exp = _int_claim(claims, "iat"), _int_claim(claims, "exp")
        if exp < iat:
            raise _malformed("exp is before iat")
        if exp - iat > self.max_ttl:
            raise _Refused(
                TTL_TOO_LONG,
                f"the signature is valid for {exp - iat} s, more than {self.max_ttl} s / "
                "签名有效期过长",
                ttl=exp - iat,
                max_ttl=self.max_ttl,
            )
        now = int(self.now_fn())
        if iat > now + self.leeway:
            raise _Refused(
                NOT_YET_VALID,
                "the signature is issued in the future / 签名尚未生效",
                iat=iat,
                now=now,
            )
        if exp < now - self.leeway:
            raise _Refused(EXPIRED, "the signature has expired / 签名已过期", exp=exp, now=now)
        if claims.get("jti") != env.id:
            raise _Refused(
                ID_MISMATCH, "the signature is for another command id / 签名与指令编号不符"
            )
        if claims.get("type") != env.type:
            raise _Refused(
                TYPE_MISMATCH, "the signature is for another command type / 签名与指令类型不符"
            )
        if wrong := [n for n in _ACTOR_CLAIMS if claims.get(n) != getattr(env, n)]:
            raise _Refused(
                ACTOR_MISMATCH,
                f"the signature is for another {', '.join(wrong)} / 签名与操作人信息不符",
                fields=wrong,
            )
        try:
            digest = data_digest(env.data)
        except CanonicalJsonError as exc:
            raise _Refused(
                DATA_NOT_CANONICAL,
                f"the command's data has no canonical form: {exc} / 指令数据无法规范化",
            ) from None
        if claims.get("data_sha256") != digest:
            raise _Refused(
                DATA_DIGEST_MISMATCH,
                "the command's data is not the data that was signed / 指令数据与签名不符",
            )


def _malformed(why: str) -> _Refused:
    return _Refused(MALFORMED, f"the signature token is malformed: {why} / 签名格式错误", error=why)


def _parse(token: str) -> _Token:
    if len(token) > MAX_TOKEN_LENGTH:
        raise _malformed(f"longer than {MAX_TOKEN_LENGTH} characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise _malformed("not three dot-separated parts")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
        signature = b64url_decode(parts[2])
    except (ValueError, UnicodeDecodeError) as exc:
        raise _malformed(str(exc)) from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise _malformed("header and claims must be JSON objects")
    if header.get("alg") != ALGORITHM:
        raise _Refused(
            UNSUPPORTED_ALGORITHM,
            f"signature algorithm {str(header.get('alg'))[:20]!r} is not EdDSA / 签名算法不受支持",
        )
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _malformed("the header names no kid")
    if header.get("crit") is not None:
        raise _malformed("critical header parameters are not supported")
    return _Token(kid, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


def _int_claim(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _malformed(f"claim {name} is not a whole number of seconds")
    return value


def command_verifier(
    settings: SecuritySettings, *, now_fn: Callable[[], float] = time.time
) -> CommandVerifier | None:
    """The verifier a service uses: ``None`` unless ``BIANZHI_REQUIRE_SIGNATURES`` is on."""
    if not settings.require_signatures:
        return None
    assert settings.signing_public_keys is not None  # the settings validator requires it
    keys = load_public_keys(settings.signing_public_keys)
    if not keys:
        raise KeyFileError(f"{settings.signing_public_keys}: holds no public keys")
    log.info(
        "command signatures required",
        keys={kid: fingerprint(key) for kid, key in sorted(keys.items())},
    )
    return CommandVerifier(
        keys,
        now_fn=now_fn,
        max_ttl=settings.signing_max_ttl_s,
        leeway=settings.signing_leeway_s,
        scopes=load_key_scopes(settings.signing_public_keys),
    )


def envelope_signer(settings: SecuritySettings) -> Callable[[Envelope], Envelope] | None:
    """What the CLI signs its commands with: ``None`` without a configured private key."""
    if settings.signing_private_key is None or settings.signing_kid is None:
        return None
    key = load_private_key(settings.signing_private_key)
    kid, ttl = settings.signing_kid, settings.signing_ttl_s

    def sign(env: Envelope) -> Envelope:
        return sign_envelope(env, key, kid, ttl)

    return sign
