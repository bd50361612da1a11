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
    key_id_of,
    load_master_key,
    load_retired_keys,
)

KEY = bytes(range(32))
NEW_KEY = bytes(range(32, 64))
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


def test_after_a_rotation_the_new_key_encrypts_and_the_retired_one_still_decrypts() -> None:
    old = PersonalDataCipher(KEY, "k1")
    stored = old.encrypt(NUMBER, context="person-1")
    dead_letter, label = old.seal(b"a command", "bianzhi.roster.commands.v1")
    assert label == "roster-personal-data:k1"
    rotated = PersonalDataCipher(NEW_KEY, "k2", retired={"k1": KEY})
    assert (rotated.key_id, rotated.retired_key_ids) == ("k2", frozenset({"k1"}))
    fresh = rotated.encrypt(NUMBER, context="person-1")
    assert key_id_of(fresh) == "k2" and rotated.is_current(fresh)
    assert key_id_of(stored) == "k1" and not rotated.is_current(stored)
    assert rotated.decrypt(stored, context="person-1") == NUMBER
    assert rotated.unseal(dead_letter, "bianzhi.roster.commands.v1") == b"a command"
    assert rotated.seal(b"x", "t")[1] == "roster-personal-data:k2"
    # Re-encrypted under the new key, bound to the same person; the old key no longer opens it.
    moved = rotated.reencrypt(stored, context="person-1")
    assert key_id_of(moved) == "k2" and rotated.reencrypt(moved, context="person-1") == moved
    assert PersonalDataCipher(NEW_KEY, "k2").decrypt(moved, context="person-1") == NUMBER
    with pytest.raises(InvalidTag):
        rotated.decrypt(moved, context="person-2")
    with pytest.raises(PersonalDataKeyError, match="key k2, which is not configured"):
        old.decrypt(moved, context="person-1")


def test_the_blind_index_stays_with_the_key_that_computed_the_stored_one() -> None:
    old = PersonalDataCipher(KEY, "k1")
    rotated = PersonalDataCipher(NEW_KEY, "k2", retired={"k1": KEY})
    assert rotated.index_key_id == "k2"  # until the stored index's key is known
    assert rotated.blind_index(NUMBER) != old.blind_index(NUMBER)
    rotated.use_index_key("k1")
    assert rotated.index_key_id == "k1" and rotated.blind_index(NUMBER) == old.blind_index(NUMBER)
    with pytest.raises(PersonalDataKeyError, match="computed with personal-data key k0"):
        rotated.use_index_key("k0")


def test_a_retired_key_under_the_current_id_must_be_the_current_key() -> None:
    assert PersonalDataCipher(KEY, "k1", retired={"k1": KEY}).retired_key_ids == frozenset()
    with pytest.raises(PersonalDataKeyError, match="another key"):
        PersonalDataCipher(KEY, "k1", retired={"k1": NEW_KEY})


def test_key_ids_are_read_only_from_the_format() -> None:
    assert key_id_of(b"v1:k_2025:" + bytes(28)) == "k_2025"
    assert key_id_of(b"v2:k1:" + bytes(28)) is None
    assert key_id_of(b"v1:" + b"x" * 40) is None  # no end of the id within 16 characters
    with pytest.raises(PersonalDataKeyError, match="not in the personal-data format"):
        PersonalDataCipher(KEY).decrypt(b"plain 130102198503071235", context="p")


def test_retired_keys_come_from_a_directory_of_key_files(tmp_path: Path) -> None:
    assert load_retired_keys(None) == {}
    directory = tmp_path / "retired"
    directory.mkdir()
    (directory / "k1.key").write_text(base64.b64encode(KEY).decode() + "\n")
    (directory / "k0.key").write_text(base64.b64encode(NEW_KEY).decode())
    # What a mounted Secret also holds, and anything not named <id>.key, is passed over.
    (directory / "..data").mkdir()
    (directory / "README").write_text("old keys")
    assert load_retired_keys(directory) == {"k0": NEW_KEY, "k1": KEY}
    (directory / "bad-id.key").write_text(base64.b64encode(KEY).decode())
    with pytest.raises(PersonalDataKeyError, match=r"named <key id>\.key"):
        load_retired_keys(directory)
    (directory / "bad-id.key").unlink()
    (directory / "k3.key").write_text("not base64!")
    with pytest.raises(PersonalDataKeyError, match=r"k3\.key: the key is not base64"):
        load_retired_keys(directory)
    with pytest.raises(PersonalDataKeyError, match="is missing"):
        load_retired_keys(tmp_path / "nowhere")


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
