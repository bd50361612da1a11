"""Personal data at rest: citizen ID numbers encrypted (AES-256-GCM) and found by a blind index.

One master key yields two keys by HKDF-SHA256: one encrypts, one computes the blind index
(HMAC-SHA256 of the normalised number), so the database can enforce one person, one row with a
unique constraint without ever holding the number in clear. A ciphertext is ``v1:<key id>:``
+ nonce (12 bytes) + AES-GCM output, with the key id and the person bound as associated data.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.runtime.keys import KEY_BYTES, load_key

_NONCE_BYTES = 12
DEAD_LETTER_CONTEXT = "dead-letter:"
# The x-dlq-sealed header of a sealed roster dead letter: "roster-personal-data:<key id>".
SEAL_LABEL = "roster-personal-data"


class PersonalDataKeyError(ValueError):
    """The personal-data key is missing or malformed."""


def _derive(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


class PersonalDataCipher:
    """Encrypts, decrypts and blind-indexes personal data with keys derived from one master key."""

    def __init__(self, master_key: bytes, key_id: str = "k1") -> None:
        if len(master_key) != KEY_BYTES:
            raise PersonalDataKeyError(
                f"the personal-data key must be {KEY_BYTES} bytes, not {len(master_key)}"
            )
        self.key_id = key_id
        self._aead = AESGCM(_derive(master_key, b"bianzhi roster personal data v1 / encrypt"))
        self._index_key = _derive(master_key, b"bianzhi roster personal data v1 / blind index")
        self._prefix = f"v1:{key_id}:".encode()

    def blind_index(self, value: str) -> str:
        """The keyed hash a number is looked up by (hex, 64 characters)."""
        return hmac.new(self._index_key, value.strip().upper().encode(), hashlib.sha256).hexdigest()

    def encrypt(self, value: str, *, context: str) -> bytes:
        """``value`` encrypted; ``context`` (e.g. the person id) must be given again to decrypt."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, value.encode(), self._aad(context))
        return self._prefix + nonce + sealed

    def decrypt(self, blob: bytes, *, context: str) -> str:
        if not blob.startswith(self._prefix):
            raise PersonalDataKeyError("the value was encrypted under another key or format")
        body = blob[len(self._prefix) :]
        nonce, sealed = body[:_NONCE_BYTES], body[_NONCE_BYTES:]
        return self._aead.decrypt(nonce, sealed, self._aad(context)).decode()

    # Dead letters: a roster command that cannot be read goes to the DLQ whole, citizen ID and
    # all, so the DLQ record is sealed with the same key (its topic bound as associated data).

    def seal(self, value: bytes, topic: str) -> tuple[bytes, str]:
        """``value`` sealed for the dead-letter topic of ``topic``, and the key's label."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, value, self._aad(DEAD_LETTER_CONTEXT + topic))
        return self._prefix + nonce + sealed, f"{SEAL_LABEL}:{self.key_id}"

    def unseal(self, blob: bytes, topic: str) -> bytes:
        """The original value of a dead letter sealed by ``seal`` for ``topic``."""
        if not blob.startswith(self._prefix):
            raise PersonalDataKeyError("the value was sealed under another key or format")
        body = blob[len(self._prefix) :]
        nonce, sealed = body[:_NONCE_BYTES], body[_NONCE_BYTES:]
        return self._aead.decrypt(nonce, sealed, self._aad(DEAD_LETTER_CONTEXT + topic))

    def _aad(self, context: str) -> bytes:
        return self._prefix + context.encode()


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
