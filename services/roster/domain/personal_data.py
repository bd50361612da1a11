"""Personal data at rest: citizen ID numbers encrypted (AES-256-GCM) and found by a blind index.

One master key yields two keys by HKDF-SHA256: one encrypts, one computes the blind index
(HMAC-SHA256 of the normalised number), so the database can enforce one person, one row with a
unique constraint without ever holding the number in clear. A ciphertext is ``v1:<key id>:``
+ nonce (12 bytes) + AES-GCM output, with the key id and the person bound as associated data.

Keys rotate (docs/deploy.md, "Rotating credentials"): the cipher holds the current key, which
encrypts everything new, and retired keys, which only open what they encrypted; each value
names its key, so both kinds open side by side while the roster re-encrypts the old ones
(``services.roster.service_layer.keys``). The blind index stays with the key that computed
the stored index (the database records which): a number looked up must hash as it did when
it was stored, whatever key encrypts today.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.runtime.keys import KEY_BYTES, decode_key, load_key

_NONCE_BYTES = 12
_FORMAT = b"v1:"
DEAD_LETTER_CONTEXT = "dead-letter:"
# The x-dlq-sealed header of a sealed roster dead letter: "roster-personal-data:<key id>".
SEAL_LABEL = "roster-personal-data"
# A key id: what ``RosterSettings.personal_data_key_id`` allows.
KEY_ID = re.compile(r"^\w{1,16}$")
# A retired key's file in the retired keys directory: ``<key id>.key``.
RETIRED_SUFFIX = ".key"


class PersonalDataKeyError(ValueError):
    """The personal-data key is missing or malformed, or a value names a key not held."""


def _derive(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


@dataclass(frozen=True)
class _Key:
    key_id: str
    aead: AESGCM
    index_key: bytes
    prefix: bytes
    fingerprint: bytes

    @classmethod
    def of(cls, master: bytes, key_id: str) -> _Key:
        if len(master) != KEY_BYTES:
            raise PersonalDataKeyError(
                f"the personal-data key must be {KEY_BYTES} bytes, not {len(master)} (key {key_id})"
            )
        if not KEY_ID.match(key_id):
            raise PersonalDataKeyError(
                f"personal-data key id {key_id!r}: 1-16 letters, digits or underscores"
            )
        return cls(
            key_id=key_id,
            aead=AESGCM(_derive(master, b"bianzhi roster personal data v1 / encrypt")),
            index_key=_derive(master, b"bianzhi roster personal data v1 / blind index"),
            prefix=_FORMAT + key_id.encode() + b":",
            fingerprint=hashlib.sha256(master).digest(),
        )


def key_id_of(blob: bytes) -> str | None:
    """The id of the key ``blob`` (a value this module encrypted or sealed) names, if any."""
    if not blob.startswith(_FORMAT):
        return None
    end = blob.find(b":", len(_FORMAT), len(_FORMAT) + 17)
    if end < 0:
        return None
    key_id = blob[len(_FORMAT) : end].decode("ascii", "replace")
    return key_id if KEY_ID.match(key_id) else None


class PersonalDataCipher:
    """Encrypts, decrypts and blind-indexes personal data with keys derived from master keys:
    ``master_key`` (``key_id``) encrypts; ``retired`` keys (by id) only decrypt."""

    def __init__(
        self,
        master_key: bytes,
        key_id: str = "k1",
        *,
        retired: Mapping[str, bytes] | None = None,
    ) -> None:
        current = _Key.of(master_key, key_id)
        self._current = current
        self._keys: dict[str, _Key] = {key_id: current}
        for kid, master in (retired or {}).items():
            if kid == key_id:
                if hashlib.sha256(master).digest() != current.fingerprint:
                    raise PersonalDataKeyError(
                        f"the retired key {kid} has the current key's id but is another key"
                    )
                continue
            self._keys[kid] = _Key.of(master, kid)
        # Until told otherwise (``use_index_key``), the current key computes the blind index.
        self._index_key = current.index_key
        self.index_key_id = key_id

    @property
    def key_id(self) -> str:
        """The id of the key that encrypts."""
        return self._current.key_id

    @property
    def key_ids(self) -> frozenset[str]:
        """The ids of every key held: the current one and the retired ones."""
        return frozenset(self._keys)

    @property
    def retired_key_ids(self) -> frozenset[str]:
        return frozenset(self._keys) - {self.key_id}

    def use_index_key(self, key_id: str) -> None:
        """Compute the blind index with the key ``key_id`` (the one the stored index was
        computed with); ``PersonalDataKeyError`` when that key is not held."""
        key = self._keys.get(key_id)
        if key is None:
            raise PersonalDataKeyError(
                f"the stored blind index was computed with personal-data key {key_id}, which "
                f"is not configured (held: {', '.join(sorted(self._keys))}); give it as a "
                "retired key (BIANZHI_ROSTER_PERSONAL_DATA_RETIRED_KEYS_DIR)"
            )
        self._index_key = key.index_key
        self.index_key_id = key_id

    def blind_index(self, value: str) -> str:
        """The keyed hash a number is looked up by (hex, 64 characters)."""
        return hmac.new(self._index_key, value.strip().upper().encode(), hashlib.sha256).hexdigest()

    def is_current(self, blob: bytes) -> bool:
        """Whether ``blob`` is encrypted under the current key."""
        return blob.startswith(self._current.prefix)

    def encrypt(self, value: str, *, context: str) -> bytes:
        """``value`` encrypted; ``context`` (e.g. the person id) must be given again to decrypt."""
        return self._seal(self._current, value.encode(), context)

    def decrypt(self, blob: bytes, *, context: str) -> str:
        """What ``encrypt`` encrypted, under whichever key held it named."""
        return self._open(blob, context, "value").decode()

    def reencrypt(self, blob: bytes, *, context: str) -> bytes:
        """``blob`` encrypted under the current key (itself when it already is)."""
        if self.is_current(blob):
            return blob
        return self._seal(self._current, self._open(blob, context, "value"), context)

    # Dead letters: a roster command that cannot be read goes to the DLQ whole, citizen ID and
    # all, so the DLQ record is sealed with the same key (its topic bound as associated data).

    @property
    def seal_label(self) -> str:
        """The label ``seal`` gives what it seals (the current key's)."""
        return f"{SEAL_LABEL}:{self.key_id}"

    def seal(self, value: bytes, topic: str) -> tuple[bytes, str]:
        """``value`` sealed for the dead-letter topic of ``topic``, and the key's label."""
        return self._seal(self._current, value, DEAD_LETTER_CONTEXT + topic), self.seal_label

    def unseal(self, blob: bytes, topic: str) -> bytes:
        """The original value of a dead letter sealed by ``seal`` for ``topic``."""
        return self._open(blob, DEAD_LETTER_CONTEXT + topic, "sealed value")

    def reseal(self, blob: bytes, topic: str) -> bytes:
        """``blob`` (sealed for ``topic``) sealed under the current key (itself when it is)."""
        return self.reencrypt(blob, context=DEAD_LETTER_CONTEXT + topic)

    def _seal(self, key: _Key, value: bytes, context: str) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return key.prefix + nonce + key.aead.encrypt(nonce, value, key.prefix + context.encode())

    def _open(self, blob: bytes, context: str, what: str) -> bytes:
        key = self._current if blob.startswith(self._current.prefix) else self._key_of(blob, what)
        body = blob[len(key.prefix) :]
        nonce, sealed = body[:_NONCE_BYTES], body[_NONCE_BYTES:]
        return key.aead.decrypt(nonce, sealed, key.prefix + context.encode())

    def _key_of(self, blob: bytes, what: str) -> _Key:
        key_id = key_id_of(blob)
        if key_id is None:
            raise PersonalDataKeyError(f"the {what} is not in the personal-data format")
        key = self._keys.get(key_id)
        if key is None:
            raise PersonalDataKeyError(
                f"the {what} was encrypted under personal-data key {key_id}, which is not "
                f"configured (held: {', '.join(sorted(self._keys))})"
            )
        return key


def load_master_key(
    *,
    value: str | None,
    path: Path | None,
    generate_at: Path | None,
) -> bytes:
    """The master key from ``value`` (base64), else the file ``path``, else a key generated once
    into ``generate_at`` (the embedded profile); ``PersonalDataKeyError`` when none applies."""
    return load_key(
        value=value,
        path=path,
        generate_at=generate_at,
        error=PersonalDataKeyError,
        missing=(
            "no personal-data key: set BIANZHI_ROSTER_PERSONAL_DATA_KEY or "
            "BIANZHI_ROSTER_PERSONAL_DATA_KEY_FILE (32 random bytes, base64)"
        ),
    )


def load_retired_keys(directory: Path | None) -> dict[str, bytes]:
    """The retired keys in ``directory``: one file ``<key id>.key`` each (base64 of 32 bytes,
    as the current key's file), e.g. a Kubernetes Secret mounted as a directory. Other files
    (a Secret volume's ``..data`` links among them) are passed over."""
    if directory is None:
        return {}
    if not directory.is_dir():
        raise PersonalDataKeyError(
            f"the retired personal-data keys directory {directory} is missing"
        )
    keys: dict[str, bytes] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(RETIRED_SUFFIX):
            continue
        key_id = path.name[: -len(RETIRED_SUFFIX)]
        if not KEY_ID.match(key_id):
            raise PersonalDataKeyError(
                f"{path}: a retired key's file is named <key id>{RETIRED_SUFFIX}, the id 1-16 "
                "letters, digits or underscores"
            )
        try:
            text = path.read_text()
        except OSError as exc:
            raise PersonalDataKeyError(f"cannot read the retired key file {path}: {exc}") from None
        keys[key_id] = decode_key(text, str(path), PersonalDataKeyError)
    return keys
