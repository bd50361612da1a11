"""Subscription secrets at rest: AES-256-GCM with a key from the environment or a file.

A sealed secret is ``aesgcm1:`` + base64url(nonce ‖ ciphertext ‖ tag); the subscription id is
the associated data, so a sealed value copied onto another subscription does not open. Values
without the prefix are plaintext written before encryption existed: they still open, and the
delivery worker seals them when it starts.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.notify.settings import NotifySettings
from services.runtime import keys

log = structlog.get_logger("bianzhi.notify.secrets")

PREFIX = "aesgcm1:"
KEY_FILE = "notify-secrets.key"
_NONCE_BYTES = 12


class SecretKeyError(Exception):
    """The key is missing or unusable, or a sealed value does not open with it."""


class SecretBox:
    """Seals and opens subscription secrets with one 256-bit key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise SecretKeyError(f"the secrets key must be 32 bytes, got {len(key)}")
        self._aead = AESGCM(key)

    def seal(self, plaintext: str, *, subscription_id: str) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), subscription_id.encode())
        return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, stored: str, *, subscription_id: str) -> str:
        if not is_sealed(stored):
            return stored  # written before encryption; sealed at the worker's next start
        try:
            raw = base64.urlsafe_b64decode(stored[len(PREFIX) :])
            plain = self._aead.decrypt(
                raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], subscription_id.encode()
            )
        except (InvalidTag, ValueError, binascii.Error) as exc:
            raise SecretKeyError(
                f"the secret of subscription {subscription_id} does not open with this key"
            ) from exc
        return plain.decode()


def is_sealed(stored: str) -> bool:
    return stored.startswith(PREFIX)


def load_key(settings: NotifySettings, *, data_dir: Path, embedded: bool) -> bytes:
    """The key from ``BIANZHI_NOTIFY_SECRETS_KEY`` or ``…_KEY_FILE``; in the embedded profile,
    from (or into) ``<data dir>/notify-secrets.key``."""
    return keys.load_key(
        value=settings.secrets_key.get_secret_value() if settings.secrets_key else None,
        path=settings.secrets_key_file,
        generate_at=data_dir / KEY_FILE if embedded else None,
        error=SecretKeyError,
        missing=(
            "no key for subscription secrets: set BIANZHI_NOTIFY_SECRETS_KEY_FILE (a mounted "
            "file holding 32 random bytes in base64) or BIANZHI_NOTIFY_SECRETS_KEY"
        ),
    )
