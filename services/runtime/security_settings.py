"""Security settings: signed commands and the audit chain, read from ``BIANZHI_*`` variables.

Kept apart from ``services.runtime.settings`` so a deployment can read them on their own (the
command consumer, the checkpoint signer, ``bianzhi send``). Keys are files, never values in the
environment: a mounted secret (Kubernetes) or a directory written by ``bianzhi keys create``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SecuritySettings(BaseSettings):
    """Signed commands (``docs/security.md``) and the audit chain of every service."""

    model_config = SettingsConfigDict(env_prefix="BIANZHI_", extra="ignore")

    # Verifying commands. When required, a command without a valid `authorization` token is
    # refused with `forbidden` (the production default is set in the deployment manifests).
    require_signatures: bool = False
    # A public key file (PEM, JWK or JWK set) or a directory of them; kids name the keys.
    signing_public_keys: Path | None = None
    # The longest lifetime (exp - iat) a command token may claim, and the clock skew allowed.
    signing_max_ttl_s: int = Field(default=900, ge=1, le=86_400)
    signing_leeway_s: int = Field(default=60, ge=0, le=3_600)

    # Signing (the CLI's own commands; `bianzhi up --require-signatures` generates a dev key).
    signing_private_key: Path | None = None
    signing_kid: str | None = None
    signing_ttl_s: int = Field(default=300, ge=1, le=86_400)

    # The audit chain: a signed checkpoint of the chain head every N entries.
    audit_checkpoint_every: int = Field(default=1_000, ge=1, le=1_000_000)
    audit_signing_private_key: Path | None = None
    audit_signing_kid: str | None = None

    @model_validator(mode="after")
    def _keys_when_required(self) -> SecuritySettings:
        if self.require_signatures and self.signing_public_keys is None:
            raise ValueError(
                "BIANZHI_REQUIRE_SIGNATURES is on but BIANZHI_SIGNING_PUBLIC_KEYS names no keys"
            )
        if (self.signing_private_key is None) != (self.signing_kid is None):
            raise ValueError("BIANZHI_SIGNING_PRIVATE_KEY and BIANZHI_SIGNING_KID go together")
        if (self.audit_signing_private_key is None) != (self.audit_signing_kid is None):
            raise ValueError(
                "BIANZHI_AUDIT_SIGNING_PRIVATE_KEY and BIANZHI_AUDIT_SIGNING_KID go together"
            )
        return self
