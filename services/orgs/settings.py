"""Settings of the orgs service, from ``BIANZHI_ORGS_*`` variables (or mounted files)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OrgsSettings(BaseSettings):
    """The orgs service's own settings; broker and database are the runtime's."""

    model_config = SettingsConfigDict(env_prefix="BIANZHI_ORGS_", extra="ignore")

    # A merge's or abolition's step to quota unanswered for this long is sent again, and again
    # as long as no answer comes: quota answers a step it has seen with its stored result, so
    # a lost step or a lost answer costs a wait, never a merge done twice. A merge is not
    # undone for being slow.
    saga_step_resend_after_s: float = Field(default=60.0, gt=0)
    # How often unanswered steps are looked for.
    saga_sweep_interval_s: float = Field(default=10.0, gt=0)
