"""The composition root of the notify service; nothing connects at import time.

Besides what the runtime runs for every service, notify runs its delivery worker: started after
the broker connects and stopped on shutdown, through the FastStream app's hooks.
"""

from __future__ import annotations

from pathlib import Path

from services.notify.adapters.orm import messaging, metadata
from services.notify.adapters.webhook import WebhookSender
from services.notify.entrypoints.queries import register_queries
from services.notify.service_layer import fanout
from services.notify.service_layer.delivery import DeliveryWorker
from services.notify.service_layer.handlers import COMMANDS
from services.notify.service_layer.unit_of_work import NotifyUnitOfWork, Waker
from services.notify.settings import NotifySettings
from services.runtime.app import (
    EventSubscription,
    ServiceDefinition,
    ServiceRuntime,
    build_runtime,
)
from services.runtime.settings import Settings

SERVICE = "notify"


def definition(uow_class: type[NotifyUnitOfWork] = NotifyUnitOfWork) -> ServiceDefinition:
    return ServiceDefinition(
        name=SERVICE,
        metadata=metadata,
        tables=messaging,
        uow_class=uow_class,
        command_routes=COMMANDS,
        migrations_dir=Path(__file__).parent / "migrations",
        register_queries=register_queries,
        event_subscriptions=tuple(
            EventSubscription(topic, fanout.routes_for(topic)) for topic in fanout.FOLLOWED_TOPICS
        ),
    )


def build(
    settings: Settings | None = None, notify_settings: NotifySettings | None = None
) -> ServiceRuntime:
    """The runtime, with its delivery worker as ``runtime.worker``."""
    notify_settings = notify_settings or NotifySettings()
    waker = Waker()
    runtime = build_runtime(definition(NotifyUnitOfWork.bound_to(waker)), settings)
    worker = DeliveryWorker(
        uow_factory=runtime.uow,  # type: ignore[arg-type]
        sender=WebhookSender(
            timeout_s=notify_settings.webhook_timeout_s,
            max_connections=notify_settings.concurrency,
        ),
        settings=notify_settings,
        source=f"{runtime.settings.source.rstrip('/')}/{SERVICE}",
    )
    waker.callback = worker.wake
    runtime.worker = worker  # type: ignore[attr-defined]

    async def start_worker() -> None:
        await worker.start()

    async def stop_worker() -> None:
        await worker.stop()

    runtime.app.after_startup(start_worker)
    runtime.app.on_shutdown(stop_worker)
    return runtime
