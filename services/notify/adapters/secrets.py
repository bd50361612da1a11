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
import secrets as random_bytes
from pathlib import Path

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.notify.settings import NotifySettings

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


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (ValueError, binascii.Error):
        raise SecretKeyError(f"{where}: the secrets key must be 32 bytes in base64") from None
    if len(key) != 32:
        raise SecretKeyError(f"{where}: the secrets key must be 32 bytes, got {len(key)}")
    return key


def load_key(settings: NotifySettings, *, data_dir: Path, embedded: bool) -> bytes:
    """The key from ``BIANZHI_NOTIFY_SECRETS_KEY`` or ``…_KEY_FILE``; in the embedded profile,
    from (or into) ``<data dir>/notify-secrets.key``."""
    if settings.secrets_key is not None:
        return _decode_key(settings.secrets_key.get_secret_value(), "BIANZHI_NOTIFY_SECRETS_KEY")
    if settings.secrets_key_file is not None:
        path = settings.secrets_key_file
        try:
            return _decode_key(path.read_text(), str(path))
        except OSError as exc:
            raise SecretKeyError(f"cannot read the secrets key file {path}: {exc}") from None
    if not embedded:
        raise SecretKeyError(
            "no key for subscription secrets: set BIANZHI_NOTIFY_SECRETS_KEY_FILE (a mounted "
            "file holding 32 random bytes in base64) or BIANZHI_NOTIFY_SECRETS_KEY"
        )
    return _embedded_key(data_dir / KEY_FILE)


def _embedded_key(path: Path) -> bytes:
    if path.exists():
        return _decode_key(path.read_text(), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    text = base64.b64encode(random_bytes.token_bytes(32)).decode() + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    try:
        os.link(tmp, path)  # never replaces a key another process wrote meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    log.info("generated the key of subscription secrets", path=str(path))
    return _decode_key(path.read_text(), str(path))
