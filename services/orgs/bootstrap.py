"""The composition root of the orgs service; nothing connects at import time."""

from __future__ import annotations

from pathlib import Path

from contracts.topics import ORGS_ANSWERS
from services.orgs.adapters.orm import messaging, metadata
from services.orgs.entrypoints.queries import register_queries
from services.orgs.service_layer.handlers import COMMANDS
from services.orgs.service_layer.sagas import RESULT_ROUTES, SAGA_COMMANDS
from services.orgs.service_layer.unit_of_work import OrgsUnitOfWork
from services.runtime.app import (
    EventSubscription,
    ServiceDefinition,
    ServiceRuntime,
    build_runtime,
)
from services.runtime.settings import Settings

SERVICE = "orgs"


def definition() -> ServiceDefinition:
    return ServiceDefinition(
        name=SERVICE,
        metadata=metadata,
        tables=messaging,
        uow_class=OrgsUnitOfWork,
        command_routes=[*COMMANDS, *SAGA_COMMANDS],
        migrations_dir=Path(__file__).parent / "migrations",
        register_queries=register_queries,
        # Quota's answers to the merge and abolish sagas' steps.
        event_subscriptions=(EventSubscription(ORGS_ANSWERS, RESULT_ROUTES),),
    )


def build(settings: Settings | None = None) -> ServiceRuntime:
    return build_runtime(definition(), settings)
