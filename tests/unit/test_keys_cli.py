"""`bianzhi keys create` and `bianzhi keys list`: files, modes, rotation and errors."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from contracts.orgs import AbolishOrg
from services.cli.main import main
from services.runtime.signing import (
    CommandVerifier,
    fingerprint,
    load_private_key,
    load_public_keys,
    sign_envelope,
)
from tests.contract.examples import EXAMPLES


def test_create_writes_a_private_key_only_its_owner_reads_and_the_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert main(["keys", "create", "--kid", "portal-2026", "--dir", str(keys)]) == 0
    out = capsys.readouterr().out
    private = keys / "portal-2026.key.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert (keys / "portal-2026.pub.pem").exists()
    jwk = json.loads((keys / "portal-2026.pub.json").read_text())
    assert jwk["kid"] == "portal-2026" and jwk["crv"] == "Ed25519" and jwk["created"]
    public = load_public_keys(keys)
    assert list(public) == ["portal-2026"]
    assert fingerprint(public["portal-2026"]) in out

    # The pair works: what the private key signs, the public key verifies.
    env = AbolishOrg.model_validate(EXAMPLES[AbolishOrg.TYPE]).envelope(
        source="/t", actorid="a", actorregion="130100", actorroles="approver"
    )
    signed = sign_envelope(env, load_private_key(private), "portal-2026", 60)
    assert CommandVerifier(public).verify(signed) is None


def test_list_shows_every_key_with_fingerprint_and_creation_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for kid in ("portal-2026", "portal-2027"):
        assert main(["keys", "create", "--kid", kid, "--dir", str(tmp_path)]) == 0
    (tmp_path / "portal-2026.key.pem").unlink()  # a service holds public keys only
    capsys.readouterr()
    assert main(["keys", "list", "--dir", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    public = load_public_keys(tmp_path)
    assert [k["kid"] for k in listed] == ["portal-2026", "portal-2027"]
    assert [k["fingerprint"] for k in listed] == [fingerprint(public[k["kid"]]) for k in listed]
    assert [k["private"] for k in listed] == [False, True]
    assert all(k["created"].endswith("+00:00") for k in listed)

    assert main(["keys", "list", "--dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["KID", "FINGERPRINT", "CREATED", "PRIVATE"]
    assert table[1].split()[0] == "portal-2026" and table[1].split()[-1] == "no"
    assert len(table) == 3


def test_the_key_directory_defaults_to_keys_in_the_data_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "create", "--kid", "dev", "--data-dir", str(tmp_path)]) == 0
    assert (tmp_path / "keys" / "dev.key.pem").exists()
    capsys.readouterr()
    assert main(["keys", "list", "--data-dir", str(tmp_path)]) == 0
    assert "dev" in capsys.readouterr().out


def test_an_existing_kid_is_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "create", "--kid", "k1", "--dir", str(tmp_path)]) == 0
    before = (tmp_path / "k1.key.pem").read_bytes()
    capsys.readouterr()
    assert main(["keys", "create", "--kid", "k1", "--dir", str(tmp_path)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert (tmp_path / "k1.key.pem").read_bytes() == before


@pytest.mark.parametrize("kid", ["", "../escape", "a b", "-lead", "x" * 65, "密钥"])
def test_a_bad_kid_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], kid: str) -> None:
    assert main(["keys", "create", "--kid", kid, "--dir", str(tmp_path)]) == 2
    assert "--kid" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_list_of_a_missing_or_broken_directory_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "list", "--dir", str(tmp_path / "absent")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "bad.pub.json").write_text("{")
    assert main(["keys", "list", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bianzhi: error:") and "bad.pub.json" in err


def test_an_empty_directory_lists_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "list", "--dir", str(tmp_path)]) == 0
    assert "no keys" in capsys.readouterr().out


def test_keys_needs_an_action(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys"]) == 2
    assert "bianzhi: error:" in capsys.readouterr().err
