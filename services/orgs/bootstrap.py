"""The composition root of the orgs service; nothing connects at import time."""

from __future__ import annotations

from pathlib import Path

from contracts.topics import ORGS_ANSWERS
from services.orgs.adapters.orm import messaging, metadata
from services.orgs.entrypoints.queries import register_queries
from services.orgs.service_layer.handlers import COMMANDS
from services.orgs.service_layer.sagas import (
    RESULT_ROUTES,
    SAGA_COMMANDS,
    resend_unanswered_steps,
)
from services.orgs.service_layer.unit_of_work import OrgsUnitOfWork
from services.orgs.settings import OrgsSettings
from services.runtime.app import (
    EventSubscription,
    ServiceDefinition,
    ServiceRuntime,
    build_runtime,
)
from services.runtime.settings import Settings

SERVICE = "orgs"


def definition(uow_class: type[OrgsUnitOfWork] = OrgsUnitOfWork) -> ServiceDefinition:
    return ServiceDefinition(
        name=SERVICE,
        metadata=metadata,
        tables=messaging,
        uow_class=uow_class,
        command_routes=[*COMMANDS, *SAGA_COMMANDS],
        migrations_dir=Path(__file__).parent / "migrations",
        register_queries=register_queries,
        # Quota's answers to the merge and abolish sagas' steps.
        event_subscriptions=(EventSubscription(ORGS_ANSWERS, RESULT_ROUTES),),
        # A step quota has not answered in time is sent again.
        background=(resend_unanswered_steps,),
    )


def configured_uow(orgs: OrgsSettings) -> type[OrgsUnitOfWork]:
    """The unit of work of a running orgs service: its saga timings."""
    return OrgsUnitOfWork.configured(
        saga_step_resend_after_s=orgs.saga_step_resend_after_s,
        saga_sweep_interval_s=orgs.saga_sweep_interval_s,
    )


def build(settings: Settings | None = None, orgs: OrgsSettings | None = None) -> ServiceRuntime:
    return build_runtime(definition(configured_uow(orgs or OrgsSettings())), settings)
