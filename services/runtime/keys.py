"""Keys of data at rest (the roster's personal data, notify's subscription secrets).

A key is 32 random bytes, written in base64: from a setting, else from a mounted file, else — in
the embedded profile only — from a file generated once in the data directory. A production
database never gets a made-up key: losing the key makes what it sealed unreadable.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

import structlog

log = structlog.get_logger("bianzhi.keys")

KEY_BYTES = 32


def decode_key(text: str, where: str, error: type[Exception]) -> bytes:
    """The key written in ``text`` (base64 of 32 bytes); ``error`` naming ``where`` if not."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (ValueError, binascii.Error):
        raise error(f"{where}: the key is not base64 (32 random bytes, base64)") from None
    if len(key) != KEY_BYTES:
        raise error(f"{where}: the key must be {KEY_BYTES} bytes, not {len(key)}")
    return key


def load_key(
    *,
    value: str | None,
    path: Path | None,
    generate_at: Path | None,
    error: type[Exception],
    missing: str,
) -> bytes:
    """The key from ``value``, else the file ``path``, else generated once into
    ``generate_at`` (the embedded profile); ``error(missing)`` when none applies."""
    if value:
        return decode_key(value, "the key setting", error)
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise error(f"cannot read the key file {path}: {exc}") from None
        return decode_key(text, str(path), error)
    if generate_at is None:
        raise error(missing)
    if not generate_at.exists():
        _generate(generate_at)
    return decode_key(generate_at.read_text(), str(generate_at), error)


def _generate(path: Path) -> None:
    """Write a new key to ``path`` (mode 0600); never replaces one another process wrote
    meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n")
    try:
        os.link(tmp, path)
        log.info("generated a key in the data directory", path=str(path))
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
