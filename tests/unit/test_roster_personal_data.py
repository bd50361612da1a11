"""Personal data at rest: encryption, the blind index and where the key comes from."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from services.roster.domain.personal_data import (
    PersonalDataCipher,
    PersonalDataKeyError,
    load_master_key,
)

KEY = bytes(range(32))
NUMBER = "130102198503071235"


def test_encryption_round_trips_and_never_shows_the_number() -> None:
    cipher = PersonalDataCipher(KEY)
    sealed = cipher.encrypt(NUMBER, context="person-1")
    assert NUMBER.encode() not in sealed and sealed.startswith(b"v1:k1:")
    assert cipher.decrypt(sealed, context="person-1") == NUMBER
    assert cipher.encrypt(NUMBER, context="person-1") != sealed  # a fresh nonce each time


def test_a_ciphertext_moved_to_another_person_or_altered_does_not_decrypt() -> None:
    cipher = PersonalDataCipher(KEY)
    sealed = cipher.encrypt(NUMBER, context="person-1")
    with pytest.raises(InvalidTag):
        cipher.decrypt(sealed, context="person-2")
    altered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(InvalidTag):
        cipher.decrypt(altered, context="person-1")
    with pytest.raises(PersonalDataKeyError):
        PersonalDataCipher(KEY, "k2").decrypt(sealed, context="person-1")


def test_the_blind_index_is_keyed_stable_and_normalised() -> None:
    cipher = PersonalDataCipher(KEY)
    x = "13010219850307123X"
    assert cipher.blind_index(x) == cipher.blind_index(" 13010219850307123x ")
    assert cipher.blind_index(NUMBER) != cipher.blind_index(x)
    assert PersonalDataCipher(bytes(32)).blind_index(NUMBER) != cipher.blind_index(NUMBER)
    assert len(cipher.blind_index(NUMBER)) == 64 and NUMBER not in cipher.blind_index(NUMBER)


def test_the_key_comes_from_the_value_the_file_or_is_generated_once(tmp_path: Path) -> None:
    encoded = base64.b64encode(KEY).decode()
    assert load_master_key(value=encoded, path=None, generate_at=None) == KEY
    file = tmp_path / "key"
    file.write_text(encoded + "\n")
    assert load_master_key(value=None, path=file, generate_at=None) == KEY
    generated = tmp_path / "data" / "roster.key"
    first = load_master_key(value=None, path=None, generate_at=generated)
    assert load_master_key(value=None, path=None, generate_at=generated) == first
    assert stat.S_IMODE(generated.stat().st_mode) == 0o600 and len(first) == 32


@pytest.mark.parametrize(
    ("value", "problem"),
    [("not base64!", "not base64"), (base64.b64encode(b"short").decode(), "32 bytes")],
)
def test_a_malformed_key_is_refused_plainly(value: str, problem: str) -> None:
    with pytest.raises(PersonalDataKeyError, match=problem):
        load_master_key(value=value, path=None, generate_at=None)


def test_without_a_key_a_production_database_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(PersonalDataKeyError, match="BIANZHI_ROSTER_PERSONAL_DATA_KEY"):
        load_master_key(value=None, path=None, generate_at=None)
    with pytest.raises(PersonalDataKeyError, match="cannot read"):
        load_master_key(value=None, path=tmp_path / "missing", generate_at=None)


def test_the_service_generates_a_key_only_for_the_embedded_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.roster.bootstrap import KEY_FILE, configured_uow
    from services.roster.settings import RosterSettings
    from tests.conftest import service_settings

    for name in ("PERSONAL_DATA_KEY", "PERSONAL_DATA_KEY_FILE"):
        monkeypatch.delenv(f"BIANZHI_ROSTER_{name}", raising=False)
    settings = service_settings(tmp_path, "localhost:1")
    monkeypatch.setenv("BIANZHI_ROSTER_DATABASE_URL", "postgresql+asyncpg://x@127.0.0.1/roster")
    with pytest.raises(PersonalDataKeyError):
        configured_uow(settings, RosterSettings())
    assert not (tmp_path / KEY_FILE).exists()
    monkeypatch.delenv("BIANZHI_ROSTER_DATABASE_URL")
    uow = configured_uow(settings, RosterSettings())
    assert (tmp_path / KEY_FILE).exists() and uow.cipher is not None
