"""Settings of the notify service's delivery worker, from ``BIANZHI_NOTIFY_*`` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

SmtpSecurity = Literal["none", "starttls", "tls"]


class NotifySettings(BaseSettings):
    """How notifications are delivered. The shared settings (broker, database) are the runtime's."""

    model_config = SettingsConfigDict(env_prefix="BIANZHI_NOTIFY_", extra="ignore")

    # One HTTP request may take this long (connect, write, read) before it counts as a timeout.
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # Attempts per delivery, the first included; after the last, the delivery fails.
    max_attempts: int = Field(default=8, ge=1, le=100)
    # Backoff before attempt n+1: min(max, initial * 2**(n-1)), of which a random half is jitter.
    backoff_initial_s: float = Field(default=2.0, gt=0)
    backoff_max_s: float = Field(default=600.0, gt=0)
    # Attempts in flight at once, and at most this many of them to any one subscription, so
    # that a slow or dead receiver holds only its own share.
    concurrency: int = Field(default=32, ge=1, le=1000)
    per_subscription_concurrency: int = Field(default=4, ge=1, le=1000)
    # How often the worker looks for due deliveries when it has nothing to do.
    poll_interval_s: float = Field(default=0.5, gt=0)

    # E-mail channel (SMTP). ``security``: "starttls" upgrades a plain connection (port 587),
    # "tls" connects with TLS from the start (port 465), "none" only on a trusted network.
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_security: SmtpSecurity = "none"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_password_file: Path | None = None
    # CA bundle to verify the SMTP server's certificate (default: the system's).
    smtp_ca_file: Path | None = None
    # Like the webhook timeout, it bounds how long shutdown waits for an attempt in flight.
    smtp_timeout_s: float = Field(default=10.0, gt=0, le=600)
    # The From of every message (an address the SMTP server lets notify send as).
    mail_from: str = "bianzhi-notify@localhost"

    # Key of the subscription secrets at rest (AES-256-GCM, 32 bytes, base64). From the
    # variable, else from a mounted file; without either, the embedded profile (SQLite)
    # generates ``<data dir>/notify-secrets.key`` once, and any other database refuses to start.
    secrets_key: SecretStr | None = None
    secrets_key_file: Path | None = None

    def smtp_secret(self) -> str | None:
        """The SMTP password, from the variable or from a mounted file."""
        if self.smtp_password is not None:
            return self.smtp_password.get_secret_value()
        if self.smtp_password_file is not None:
            return self.smtp_password_file.read_text().strip()
        return None
