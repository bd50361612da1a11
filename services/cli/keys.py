"""`bianzhi keys`: create and list the Ed25519 key pairs that sign commands and checkpoints.

``create`` writes three files into the key directory: ``<kid>.key.pem`` (the private key, PKCS#8,
mode 0600 — it stays with the front-end system that signs), ``<kid>.pub.pem`` and
``<kid>.pub.json`` (the public key as PEM and as a JWK with its creation time — what services
are given in ``BIANZHI_SIGNING_PUBLIC_KEYS``). ``list`` shows every public key of a directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.cli.common import CliError, add_data_dir_option, load_settings, print_json
from services.runtime.signing import (
    ALLOW_MEMBER,
    KeyFileError,
    fingerprint,
    load_public_keys,
    public_jwk,
)

KID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class KeyInfo:
    kid: str
    fingerprint: str
    created: str
    private: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "fingerprint": self.fingerprint,
            "created": self.created,
            "private": self.private,
        }


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "keys",
        help="create and list signing keys",
        description="Create and list the Ed25519 key pairs that sign commands (see "
        "docs/security.md). The directory defaults to keys/ in the data directory.",
    )
    actions = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = actions.add_parser(
        "create",
        help="create a key pair",
        description="Write KID.key.pem (private, mode 0600), KID.pub.pem and KID.pub.json.",
    )
    create.add_argument("--kid", required=True, help="the key id (letters, digits, . _ -)")
    create.add_argument(
        "--allow",
        action="append",
        metavar="PATTERN",
        help="limit the key to command types matching PATTERN (e.g. 'bianzhi.quota.*'); "
        "repeat for more; default: any type",
    )
    _add_dir(create)
    create.set_defaults(run=run_create)
    listing = actions.add_parser("list", help="list the public keys of a directory")
    _add_dir(listing)
    listing.add_argument("--json", action="store_true", help="one JSON document")
    listing.set_defaults(run=run_list)


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", type=Path, metavar="DIR", help="the key directory (default: DATA/keys)"
    )
    add_data_dir_option(parser)


def key_dir(args: argparse.Namespace) -> Path:
    if args.dir is not None:
        return Path(args.dir)
    return load_settings(data_dir=args.data_dir).data_dir / "keys"


def run_create(args: argparse.Namespace) -> int:
    info = create_key(key_dir(args), args.kid, allow=args.allow)
    print(f"created key {info.kid} {info.fingerprint} in {key_dir(args)}", flush=True)
    return 0


def run_list(args: argparse.Namespace) -> int:
    keys = list_keys(key_dir(args))
    if args.json:
        print_json([k.to_json() for k in keys])
        return 0
    if not keys:
        print(f"no keys in {key_dir(args)}", flush=True)
        return 0
    width = max(len("KID"), *(len(k.kid) for k in keys))
    print(f"{'KID':<{width}}  {'FINGERPRINT':<50}  {'CREATED':<25}  PRIVATE")
    for k in keys:
        private = "yes" if k.private else "no"
        print(f"{k.kid:<{width}}  {k.fingerprint:<50}  {k.created:<25}  {private}")
    return 0


def create_key(
    directory: Path,
    kid: str,
    *,
    now: datetime | None = None,
    allow: Sequence[str] | None = None,
) -> KeyInfo:
    """Generate a key pair and write its files; refuses to overwrite an existing kid. With
    ``allow``, the key may sign only command types matching those patterns (its JWK says so)."""
    if allow is not None and not all(p.strip() for p in allow):
        raise CliError("--allow: a pattern of command types, such as 'bianzhi.quota.*'")
    if not KID_PATTERN.fullmatch(kid):
        raise CliError(
            f"--kid {kid!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    private_path, pem_path, jwk_path = _paths(directory, kid)
    taken = [p for p in (private_path, pem_path, jwk_path) if p.exists()]
    if taken:
        raise CliError(f"--kid {kid}: {taken[0]} exists already; choose a new kid to rotate keys")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--dir {directory}: cannot create it ({exc.strerror})") from None
    key = Ed25519PrivateKey.generate()
    created = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    limits = {ALLOW_MEMBER: list(allow)} if allow else {}
    jwk = public_jwk(kid, key.public_key(), created=created, **limits)
    _write_new(private_path, private_pem, 0o600)
    _write_new(pem_path, public_pem, 0o644)
    _write_new(jwk_path, (json.dumps(jwk, indent=2) + "\n").encode(), 0o644)
    return KeyInfo(kid, fingerprint(key.public_key()), created, True)


def list_keys(directory: Path) -> list[KeyInfo]:
    """Every public key of ``directory`` by kid, with its fingerprint and creation time."""
    if not directory.is_dir():
        raise CliError(f"--dir {directory}: no such directory")
    try:
        keys = load_public_keys(directory)
    except KeyFileError as exc:
        raise CliError(str(exc)) from None
    found = []
    for kid, key in sorted(keys.items()):
        private_path, pem_path, jwk_path = _paths(directory, kid)
        found.append(
            KeyInfo(kid, fingerprint(key), _created(jwk_path, pem_path), private_path.exists())
        )
    return found


def _paths(directory: Path, kid: str) -> tuple[Path, Path, Path]:
    return directory / f"{kid}.key.pem", directory / f"{kid}.pub.pem", directory / f"{kid}.pub.json"


def _created(jwk_path: Path, pem_path: Path) -> str:
    try:
        created = json.loads(jwk_path.read_text()).get("created")
        if isinstance(created, str):
            return created
    except (OSError, ValueError, AttributeError):
        pass
    for path in (jwk_path, pem_path):
        if path.exists():
            stamp = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            return stamp.isoformat(timespec="seconds")
    return "unknown"


def _write_new(path: Path, content: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CliError(f"{path} exists already") from None
    except OSError as exc:
        raise CliError(f"cannot write {path} ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as out:
        out.write(content)
    os.chmod(path, mode)  # the umask narrows O_CREAT's mode; the public files must be readable
