"""Builds one service process: engine, broker, consumers, relay, HTTP routes and lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from faststream.asgi import AsgiFastStream, AsyncAPIRoute
from faststream.asgi.types import Receive, Scope, Send
from faststream.kafka import KafkaBroker
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from contracts.topics import answers, commands
from services.runtime import metrics
from services.runtime.audit import command_auditor
from services.runtime.broker import (
    dead_letter_publisher,
    make_broker,
    outbox_publisher,
    subscribe,
)
from services.runtime.commands import CommandConsumer
from services.runtime.db import create_engine, is_sqlite, ping, session_factory
from services.runtime.events import EventConsumer
from services.runtime.http import Router, json_bytes, send_response
from services.runtime.logging import configure_logging
from services.runtime.messaging import (
    BatchPreparer,
    CommandRoute,
    EventRoute,
    RawMessage,
    command_routes,
    event_routes,
)
from services.runtime.migrate import upgrade
from services.runtime.relay import OutboxRelay
from services.runtime.sealing import Sealer, opening_publisher
from services.runtime.security_settings import SecuritySettings
from services.runtime.settings import Settings
from services.runtime.signing import command_verifier, envelope_signer
from services.runtime.tables import MessagingTables
from services.runtime.uow import UnitOfWork

log = structlog.get_logger("bianzhi.app")


@dataclass(frozen=True)
class EventSubscription:
    """A projection fed by another service's events topic."""

    topic: str
    routes: Sequence[EventRoute]
    # The answers to this service's saga steps come on it: a saga waits for them as a command
    # waits to be handled, so the commands' consumer (group ``<prefix>-<service>``) fetches
    # them with the commands; other subscriptions share the projection consumer
    # (``<prefix>-<service>-projection``), which can wait longer between fetches.
    saga_answers: bool = False
    # Statements serving a whole fetch of these events before their handlers run (see
    # ``BatchPreparer``).
    prepare: BatchPreparer | None = None


@dataclass(frozen=True)
class ServiceDefinition:
    """What one service contributes; the runtime supplies everything else."""

    name: str
    metadata: MetaData
    tables: MessagingTables
    uow_class: type[UnitOfWork]
    command_routes: Sequence[CommandRoute]
    migrations_dir: Path
    register_queries: Callable[[Router, async_sessionmaker[AsyncSession]], None]
    event_subscriptions: Sequence[EventSubscription] = field(default_factory=tuple)
    # Long-running work of the service's own (sweeps, timers): each is started once the
    # service is up and cancelled first at shutdown, before consumers drain.
    background: Sequence[Callable[[ServiceRuntime], Awaitable[None]]] = field(default_factory=tuple)
    # Checks run as the service starts, after its migrations and before it reads a message:
    # one that raises stops the start (a key that does not fit the stored data, say).
    startup: Sequence[Callable[[ServiceRuntime], Awaitable[None]]] = field(default_factory=tuple)
    # A service whose messages carry personal data in full: the key its dead-lettered commands
    # and its outbox rows for ``sealed_topics`` are sealed with (``runtime.sealing``).
    sealer: Sealer | None = None
    sealed_topics: frozenset[str] = frozenset()


class ServiceApp(AsgiFastStream):
    """AsgiFastStream matches exact paths only; the query router takes everything else."""

    def __init__(self, *args: Any, router: Router, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.router = router

    async def not_found(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.router(scope, receive, send)
            return
        await super().not_found(scope, receive, send)


class ServiceRuntime:
    """One running service. ``app`` is what uvicorn serves."""

    def __init__(
        self,
        definition: ServiceDefinition,
        settings: Settings,
        security: SecuritySettings | None = None,
    ) -> None:
        self.definition = definition
        self.settings = settings
        self.security = security if security is not None else SecuritySettings()
        self.name = definition.name
        self.database_url = settings.database_url(definition.name)
        self.engine: AsyncEngine = create_engine(self.database_url, inline=settings.sqlite_inline)
        self.sessions = session_factory(self.engine)
        self.read_engine: AsyncEngine = (
            create_engine(self.database_url, read_only=True)
            if is_sqlite(self.database_url)
            else self.engine
        )
        self.read_sessions = session_factory(self.read_engine)
        # SQLite has one writer at a time; queueing writers here is far cheaper than letting
        # them meet SQLite's busy handler, which sleeps for milliseconds at a time.
        self.write_lock: asyncio.Lock | None = (
            asyncio.Lock() if is_sqlite(self.database_url) else None
        )
        self.broker: KafkaBroker = make_broker(settings, client_id=f"bianzhi-{self.name}")
        self.relay = OutboxRelay(
            service=self.name,
            engine=self.engine,
            sessions=self.sessions,
            tables=definition.tables,
            publish=opening_publisher(outbox_publisher(self.broker), definition.sealer),
            batch_size=settings.relay_batch_size,
            poll_interval_s=settings.relay_poll_interval_s,
            retention=timedelta(hours=settings.outbox_retention_hours),
            write_lock=self.write_lock,
            read_sessions=self.read_sessions,
        )
        source = f"{settings.source.rstrip('/')}/{self.name}"
        self.source = source
        # The service reads the answers to its saga steps on its answers topic, which the steps
        # it sends name (``replyto``), when it subscribes to that topic.
        self.reply_to: str | None = (
            answers(self.name)
            if any(sub.topic == answers(self.name) for sub in definition.event_subscriptions)
            else None
        )
        # Signed commands and the audit chain (docs/security.md).
        self.verifier = command_verifier(self.security)
        self.auditor = command_auditor(self.name, definition.tables.audit, source, self.security)
        self.signer = envelope_signer(self.security)
        common: dict[str, Any] = {
            "service": self.name,
            "uow_factory": self.uow,
            "dead_letter": dead_letter_publisher(self.broker),
            "retry_initial_s": settings.retry_initial_s,
            "retry_max_s": settings.retry_max_s,
        }
        self.command_consumer = CommandConsumer(
            routes=command_routes(definition.command_routes),
            source=source,
            verifier=self.verifier,
            consumer=f"{self.name}.commands",
            # Commands are what carries personal data in; other services' events do not.
            seal_dead_letter=definition.sealer,
            **common,
        )
        self.projections = {
            sub.topic: EventConsumer(
                routes=event_routes(sub.routes),
                prepare=sub.prepare,
                consumer=f"{self.name}<-{sub.topic}",
                **common,
            )
            for sub in definition.event_subscriptions
        }
        # Every fetch costs the broker and the client about the same whether it brings records
        # or not, and a short fetch wait means many of them: a service's hot paths (its
        # commands and the answers its sagas wait for) share one consumer with the short wait,
        # its projections another with a longer one (measured on the embedded broker: a
        # 12-partition consumer at 10 ms costs it 8-10 % of a core idle, two cost 16-20 %, one
        # over both topics 10-14 %). One group member reads all of a consumer's topics: a
        # member per topic in one group would make them rebalance each other.
        answer_topics = [sub.topic for sub in definition.event_subscriptions if sub.saga_answers]
        cold = [sub.topic for sub in definition.event_subscriptions if not sub.saga_answers]
        self.subscribers: list[Any] = [
            subscribe(
                self.broker,
                [commands(self.name), *answer_topics],
                group_id=f"{settings.kafka_group_prefix}-{self.name}",
                process=self._consume,
                settings=settings,
                fetch_max_wait_ms=settings.kafka_command_fetch_max_wait_ms,
                max_records=settings.kafka_command_batch_size,
                description=f"Commands of the {self.name} service"
                + (" and the answers to its saga steps" if answer_topics else ""),
            )
        ]
        if cold:
            self.subscribers.append(
                subscribe(
                    self.broker,
                    cold,
                    group_id=f"{settings.kafka_group_prefix}-{self.name}-projection",
                    process=self._consume,
                    settings=settings,
                    fetch_max_wait_ms=settings.kafka_event_fetch_max_wait_ms,
                    max_records=settings.kafka_event_batch_size,
                    description=f"Projections kept by {self.name}",
                )
            )
        self._background: list[asyncio.Task[None]] = []
        self._freeze_after_startup = False
        self.router = Router()
        definition.register_queries(self.router, self.read_sessions)
        self.app = ServiceApp(
            self.broker,
            router=self.router,
            asgi_routes=[
                ("/health/live", self._live),
                ("/health/ready", self._ready),
                ("/metrics", self._metrics),
            ],
            asyncapi_path=AsyncAPIRoute("/docs/asyncapi", try_it_out_path=None),
            on_startup=[self._on_startup],
            after_startup=[self._after_startup],
            on_shutdown=[self._on_shutdown],
            after_shutdown=[self._after_shutdown],
            logger=logging.getLogger("bianzhi.faststream"),
        )

    async def _consume(self, raws: Sequence[RawMessage]) -> None:
        """Handle one fetch. It may hold records of several topics: each topic's records are
        one batch, in their order (Kafka orders nothing across topics), of the command consumer
        or of the topic's projection. Records that cannot be read are dead-lettered first, once.

        The batches of several topics (the roster's commands and the answers to its saga steps
        come in the same fetches) are handled in one transaction: one BEGIN, one commit, one
        outbox insert and one audit append instead of one of each per topic. Should it fail (a
        handler refused a command mid-batch, anything else), nothing of it was committed, and
        each batch is handled as it would be alone: in a transaction of its own, one by one
        where that fails. ``fetch_one_transaction`` off: each batch alone, always."""
        by_topic: dict[str, list[RawMessage]] = {}
        for raw in raws:
            by_topic.setdefault(raw.topic, []).append(raw)
        parts: list[tuple[CommandConsumer | EventConsumer, list[Any]]] = []
        for topic, batch in by_topic.items():
            consumer = self.projections.get(topic, self.command_consumer)
            if items := await consumer.read_fetch(batch):
                parts.append((consumer, items))
        together = len(parts) > 1 and self.settings.fetch_one_transaction
        if together and await self._handled_together(parts):
            return
        for consumer, items in parts:
            await consumer.handle_items(items)

    async def _handled_together(
        self, parts: list[tuple[CommandConsumer | EventConsumer, list[Any]]]
    ) -> bool:
        """Handle ``parts`` in one transaction; whether it committed."""
        started = time.perf_counter()
        try:
            async with self.uow() as uow:
                outcomes = [await consumer.handle_in(uow, items) for consumer, items in parts]
                await uow.commit()
        except Exception as exc:
            metrics.FETCH_TRANSACTIONS.labels(self.name, "apart").inc()
            log.debug("fetch handled topic by topic", error=repr(exc))
            return False
        metrics.FETCH_TRANSACTIONS.labels(self.name, "together").inc()
        elapsed = time.perf_counter() - started
        for (consumer, items), done in zip(parts, outcomes, strict=True):
            consumer.handled(items, done, elapsed)
        return True

    def uow(self) -> UnitOfWork:
        return self.definition.uow_class(
            self.sessions,
            self.definition.tables,
            on_commit=self.relay.wake,
            hand_over=self.relay.hand_over if self.relay.takes_hand_over else None,
            write_lock=self.write_lock,
            source=self.source,
            auditor=self.auditor,
            signer=self.signer,
            sealer=self.definition.sealer,
            sealed_topics=self.definition.sealed_topics,
            reply_to=self.reply_to,
        )

    async def migrate(self) -> None:
        await upgrade(self.name, self.definition.migrations_dir, self.database_url)

    # lifecycle -----------------------------------------------------------------------------

    async def _on_startup(self) -> None:
        if self.settings.migrate_on_start:
            await self.migrate()
        for check in self.definition.startup:
            await check(self)

    def process_app(self) -> AsgiFastStream:
        """The app of a process of its own (what uvicorn's factory returns).

        Once it has started, what startup built (modules, schemas, statements, clients) is
        moved out of the garbage collector's sight (``gc.freeze``): a full collection then
        walks only what handling made since. Measured on the orgs service under load, a full
        collection paused the event loop for 70 ms without it (every command in flight waited
        that out) and for 4-9 ms with it.
        """
        self._freeze_after_startup = True
        return self.app

    async def _after_startup(self) -> None:
        self.relay.start()
        if self._freeze_after_startup:
            gc.collect()
            gc.freeze()
        self._background = [
            asyncio.create_task(job(self), name=f"{self.name}-{getattr(job, '__name__', 'job')}")
            for job in self.definition.background
        ]
        log.info("service started", database=self.engine.url.render_as_string(hide_password=True))

    async def _on_shutdown(self) -> None:
        # Drain: stop the service's own background work, stop taking messages and let
        # in-flight handlers finish and commit, then publish what they wrote, then let
        # FastStream close the producer.
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background = []
        await asyncio.gather(*(sub.stop() for sub in self.broker.subscribers))
        await self.relay.stop(drain_timeout_s=self.settings.kafka_graceful_timeout_s)
        log.info("service drained")

    async def _after_shutdown(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()

    # probes --------------------------------------------------------------------------------

    async def _live(self, scope: Scope, receive: Receive, send: Send) -> None:
        ok = bool(self.broker.running)
        await send_response(send, 200 if ok else 503, json_bytes({"live": ok}))

    async def _ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        broker_ok = bool(self.broker.running)
        db_ok = await ping(self.engine)
        relay_ok = self.relay.running
        ok = broker_ok and db_ok and relay_ok
        body = {"ready": ok, "broker": broker_ok, "database": db_ok, "relay": relay_ok}
        await send_response(send, 200 if ok else 503, json_bytes(body))

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The backlog gauge is refreshed on scrape; a database that is down leaves it as it was.
        with contextlib.suppress(Exception):
            await self.relay.backlog()
        body, content_type = metrics.render()
        await send_response(send, 200, body, content_type)


def build_runtime(
    definition: ServiceDefinition, settings: Settings | None = None
) -> ServiceRuntime:
    """The composition root shared by every service; nothing connects until the app starts."""
    settings = settings or Settings()
    configure_logging(definition.name, settings.log_level, settings.log_format)
    return ServiceRuntime(definition, settings)
