"""Settings of the roster service, from ``BIANZHI_ROSTER_*`` variables (or mounted files)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class RosterSettings(BaseSettings):
    """The roster's own settings; broker and database are the runtime's."""

    model_config = SettingsConfigDict(env_prefix="BIANZHI_ROSTER_", extra="ignore")

    # The personal-data master key (32 bytes, base64): citizen ID numbers and phone numbers are
    # encrypted with a key derived from it (AES-256-GCM) and looked up by a keyed hash derived
    # from it (HMAC-SHA256). From the variable, else from a mounted file; without either, the
    # embedded profile (SQLite) generates ``<data dir>/roster-personal-data.key`` once, and any
    # other database refuses to start. Losing the key makes the stored numbers unreadable.
    personal_data_key: SecretStr | None = None
    personal_data_key_file: Path | None = None
    # The id stored beside every ciphertext, so that the key can be rotated: a new key gets a
    # new id, and the old one goes into the retired keys directory.
    personal_data_key_id: str = Field(default="k1", min_length=1, max_length=16, pattern=r"^\w+$")
    # Keys that no longer encrypt but still open what they encrypted: a directory of files
    # ``<key id>.key`` (base64, as the key file), e.g. a Secret mounted as a directory. While
    # any is given, the roster re-encrypts under the current key, at start, whatever is under
    # another, until nothing is (docs/deploy.md, "Rotating credentials").
    personal_data_retired_keys_dir: Path | None = None

    # A saga step (a slot request to quota) unanswered for this long times out: an enrolment
    # is refused with ``timeout`` and its slot request cancelled (or undone, when it took
    # effect after all).
    saga_timeout_s: float = Field(default=60.0, gt=0)
    # How often overdue saga steps are looked for.
    saga_sweep_interval_s: float = Field(default=2.0, gt=0)
