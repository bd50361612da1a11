"""The composition root of the notify service; nothing connects at import time.

Besides what the runtime runs for every service, notify runs its delivery worker as a
background job of the service (``ServiceDefinition.background``): started once the service is
up, and stopped first at shutdown — its attempts in flight settle — before the consumers drain
and the relay publishes what they wrote.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from services.notify.adapters.mail import MailSender
from services.notify.adapters.orm import messaging, metadata
from services.notify.adapters.secrets import SecretBox, load_key
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
from services.runtime.db import is_sqlite
from services.runtime.settings import Settings

SERVICE = "notify"

BackgroundJob = Callable[[ServiceRuntime], Awaitable[None]]


def definition(
    uow_class: type[NotifyUnitOfWork] = NotifyUnitOfWork,
    background: tuple[BackgroundJob, ...] = (),
) -> ServiceDefinition:
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
        background=background,
    )


def build(
    settings: Settings | None = None, notify_settings: NotifySettings | None = None
) -> ServiceRuntime:
    """The runtime, with its delivery worker as ``runtime.worker``."""
    settings = settings or Settings()
    notify_settings = notify_settings or NotifySettings()
    waker = Waker()
    worker: DeliveryWorker | None = None

    async def deliver_notifications(runtime: ServiceRuntime) -> None:
        assert worker is not None
        await worker.serve()

    uow_class = NotifyUnitOfWork.bound_to(waker)
    runtime = build_runtime(definition(uow_class, (deliver_notifications,)), settings)
    # After build_runtime, which configures logging: making the embedded key is logged.
    uow_class.box = SecretBox(
        load_key(
            notify_settings,
            data_dir=settings.data_dir,
            embedded=is_sqlite(settings.database_url(SERVICE)),
        )
    )
    worker = DeliveryWorker(
        uow_factory=runtime.uow,  # type: ignore[arg-type]
        sender=WebhookSender(
            timeout_s=notify_settings.webhook_timeout_s,
            max_connections=notify_settings.concurrency,
        ),
        mailer=MailSender(notify_settings),
        settings=notify_settings,
        source=f"{runtime.settings.source.rstrip('/')}/{SERVICE}",
        service=SERVICE,
    )
    waker.callback = worker.wake
    runtime.worker = worker  # type: ignore[attr-defined]
    return runtime
