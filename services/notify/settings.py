"""Settings of the notify service's delivery worker, from ``BIANZHI_NOTIFY_*`` variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class NotifySettings(BaseSettings):
    """How webhooks are delivered. The shared settings (broker, database) are the runtime's."""

    model_config = SettingsConfigDict(env_prefix="BIANZHI_NOTIFY_", extra="ignore")

    # One HTTP request may take this long (connect, write, read) before it counts as a timeout.
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # Attempts per delivery, the first included; after the last, the delivery fails.
    max_attempts: int = Field(default=8, ge=1, le=100)
    # Backoff before attempt n+1: min(max, initial * 2**(n-1)), of which a random half is jitter.
    backoff_initial_s: float = Field(default=2.0, gt=0)
    backoff_max_s: float = Field(default=600.0, gt=0)
    # Requests in flight at once, and at most this many of them to any one subscription, so
    # that a slow or dead receiver holds only its own share.
    concurrency: int = Field(default=32, ge=1, le=1000)
    per_subscription_concurrency: int = Field(default=4, ge=1, le=1000)
    # How often the worker looks for due deliveries when it has nothing to do.
    poll_interval_s: float = Field(default=0.5, gt=0)
