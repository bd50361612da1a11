"""The composition root of the quota service; nothing connects at import time."""

from __future__ import annotations

from pathlib import Path

from contracts.topics import ORGS_EVENTS
from services.quota.adapters.orm import messaging, metadata
from services.quota.entrypoints.queries import register_queries
from services.quota.service_layer.expiry import sweep_expired_notices
from services.quota.service_layer.handlers import COMMANDS
from services.quota.service_layer.merging import MERGE_COMMANDS
from services.quota.service_layer.projection import ORG_EVENTS
from services.quota.service_layer.unit_of_work import QuotaUnitOfWork
from services.runtime.app import (
    EventSubscription,
    ServiceDefinition,
    ServiceRuntime,
    build_runtime,
)
from services.runtime.settings import Settings

SERVICE = "quota"


def definition() -> ServiceDefinition:
    return ServiceDefinition(
        name=SERVICE,
        metadata=metadata,
        tables=messaging,
        uow_class=QuotaUnitOfWork,
        command_routes=[*COMMANDS, *MERGE_COMMANDS],
        migrations_dir=Path(__file__).parent / "migrations",
        register_queries=register_queries,
        event_subscriptions=(EventSubscription(ORGS_EVENTS, ORG_EVENTS),),
        background=(sweep_expired_notices,),
    )


def build(settings: Settings | None = None) -> ServiceRuntime:
    return build_runtime(definition(), settings)
