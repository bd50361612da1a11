"""What every consumer shares: raw records, handler context, routes, retries, dead letters.

The consumers themselves: ``services.runtime.commands`` (a service's own command topic) and
``services.runtime.events`` (projections of other services' events).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog
from pydantic import ValidationError

from contracts import identifiers
from contracts.base import Command, Event, Message
from contracts.codes import ReasonCode, Role
from contracts.envelope import Envelope, now
from contracts.topics import dlq
from services.runtime import metrics
from services.runtime.db import is_transient
from services.runtime.logging import mask_citizen_ids
from services.runtime.rules import Rejection
from services.runtime.sealing import Sealer, seal_dead_letter
from services.runtime.uow import UnitOfWork

log = structlog.get_logger("bianzhi.messaging")

_ROLE_RANK = {Role.CLERK: 1, Role.APPROVER: 2, Role.ADMIN: 3}
_IDENTIFIER_CODES = {
    ReasonCode.INVALID_CITIZEN_ID.value,
    ReasonCode.INVALID_USCC.value,
    ReasonCode.UNKNOWN_DIVISION.value,
}

U = TypeVar("U", bound=UnitOfWork)
T = TypeVar("T")


@dataclass(frozen=True)
class RawMessage:
    """One Kafka record as it arrived."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None

    @classmethod
    def from_record(cls, record: Any) -> RawMessage:
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            headers=tuple((k, v or b"") for k, v in (record.headers or ())),
            timestamp_ms=getattr(record, "timestamp", None),
        )

    def age_s(self) -> float | None:
        """Seconds since the record was produced (its Kafka timestamp), if known."""
        if not self.timestamp_ms or self.timestamp_ms < 0:
            return None
        return max(0.0, time.time() - self.timestamp_ms / 1000)


@dataclass
class HandlerContext:
    """What a handler knows about the message it handles, and how it emits events."""

    envelope: Envelope
    source: str
    emitted: list[tuple[Envelope, str]] = field(default_factory=list)
    # A saga's first step: the command's result is written when the saga ends, not now.
    deferred: bool = False
    # The ``subject`` of the command's result, when not the command's own subject (a roster
    # command's subject is a citizen ID number, which results must not carry).
    result_subject: str | None = None

    @property
    def actor_region(self) -> str:
        return self.envelope.actorregion or ""

    def emit(self, event: Event, *, subject: str | None = None, id: str | None = None) -> Envelope:
        """Queue ``event``; it is written to the outbox with the handler's transaction. ``id``:
        the event's id when the handler chose it beforehand (a new one otherwise)."""
        env = caused_envelope(event, self.envelope, source=self.source, subject=subject, id=id)
        self.emitted.append((env, event.TOPIC))
        return env

    def send(self, command: Command, *, id: str) -> Envelope:
        """Queue an internal command to another service (a saga step), written to the outbox
        with the handler's transaction. It carries the actor and correlation of the handled
        message; ``id`` should be derived from the saga so a step sent again is a duplicate."""
        env = caused_envelope(command, self.envelope, source=self.source, id=id)
        self.emitted.append((env, command.TOPIC))
        return env

    def defer_result(self) -> None:
        """The command starts a saga: no result now; the saga writes it when it ends
        (``services.runtime.commands.finish_command``)."""
        self.deferred = True

    def require_region(self, division_code: str, *, what: str = "target") -> None:
        """Refuse unless ``division_code`` lies inside the actor's region (WIRE-CONTRACT §2)."""
        region = self.actor_region
        try:
            inside = bool(region) and identifiers.is_within(division_code, region)
        except identifiers.IdentifierError:  # a malformed region contains nothing
            inside = False
        if not inside:
            raise Rejection(
                ReasonCode.FORBIDDEN,
                f"{what} in division {division_code} lies outside the actor's region {region} / "
                f"目标不在操作人所属区划 {region} 范围内",
                {"division_code": division_code, "actor_region": region},
            )


def caused_envelope(
    message: Message,
    on_behalf_of: Envelope,
    *,
    source: str,
    cause: str | None = None,
    id: str | None = None,
    subject: str | None = None,
) -> Envelope:
    """The envelope of a message written on behalf of the command or event ``on_behalf_of``:
    its correlation and actor, caused by it (or by ``cause``, the message that made it due)."""
    return message.envelope(
        source=source,
        id=id,
        correlationid=on_behalf_of.effective_correlation_id,
        causationid=cause or on_behalf_of.id,
        actorid=on_behalf_of.actorid,
        actorregion=on_behalf_of.actorregion,
        actorroles=on_behalf_of.actorroles,
        subject=subject,
    )


def emit_caused(uow: UnitOfWork, event: Event, command: Envelope, cause: str) -> Envelope:
    """Stage ``event`` for the outbox on behalf of ``command`` (its correlation and actor), as
    caused by the message ``cause``: how a saga writes the events of a command it ends."""
    env = caused_envelope(event, command, source=uow.source, cause=cause)
    uow.stage(env, event.TOPIC, env.subject)
    return env


def send_caused(uow: UnitOfWork, step: Command, command: Envelope, *, id: str) -> Envelope:
    """Stage a saga step (an internal command to another service) on behalf of ``command``,
    outside its handler: a compensation or a cancellation sent by a timer."""
    env = caused_envelope(step, command, source=uow.source, id=id)
    uow.stage(env, step.TOPIC, env.subject)
    return env


CommandHandler = Callable[[Any, Any, HandlerContext], Awaitable[None]]
EventHandler = Callable[[Any, Any, Envelope], Awaitable[None]]
# Run once per fetch applied as one transaction, before its handlers, with its new events in
# order (unit of work, [(envelope, event)]): it may do in a few statements what the handlers
# would do one event at a time, and leave the rows where they look for them. It must change
# nothing the handlers would not: the same events applied one by one (a fetch of one, or after
# a failed batch) must end in the same state. A command route's is given commands instead
# (``CommandRoute.prepare``).
BatchPreparer = Callable[[Any, Sequence[tuple[Envelope, Any]]], Awaitable[None]]


@dataclass(frozen=True)
class CommandRoute:
    model: type[Command]
    handler: CommandHandler
    role: Role
    # Statements serving many commands of this route at once (see ``BatchPreparer``), in a
    # fetch handled as one transaction: run just before the handlers of each run of two or more
    # of its commands that follow one another in the fetch (a command refused before its
    # handler, or a duplicate, changes no state and does not break a run), with those commands
    # in order. So nothing another handler does comes between the prepared work and the
    # handlers it serves. A fetch of one command, or one handled one by one, never calls it.
    prepare: BatchPreparer | None = None


@dataclass(frozen=True)
class EventRoute:
    model: type[Event]
    handler: EventHandler
    # A cheap filter run before any database work: events it refuses are acknowledged and
    # ignored (a saga applies only the results of its own steps' types).
    accept: Callable[[Any], bool] | None = None


class DeadLetterPublisher(Protocol):
    async def __call__(
        self, topic: str, value: bytes, key: bytes | None, headers: dict[str, str]
    ) -> None: ...


def has_role(roles: frozenset[str], required: Role) -> bool:
    """Whether any of ``roles`` includes the powers of ``required``."""
    need = _ROLE_RANK[required]
    return any(_ROLE_RANK.get(Role(r), 0) >= need for r in roles if r in Role._value2member_map_)


def rejection_from_validation(exc: ValidationError) -> Rejection:
    """The reason code for a payload that failed validation, with its field errors."""
    errors = [
        {"field": ".".join(str(p) for p in err["loc"]), "error": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]
    code = next(
        (ReasonCode(e["type"]) for e in errors if e["type"] in _IDENTIFIER_CODES),
        ReasonCode.INVALID_MESSAGE,
    )
    return Rejection(
        code,
        f"the command's data does not match its schema / 指令数据不符合格式: "
        f"{'; '.join(e['field'] + ': ' + e['error'] for e in errors[:5])}",
        {"errors": errors},
    )


def salvage(value: bytes | None) -> tuple[str | None, str | None, dict[str, Any]]:
    """The id, type and raw object of an envelope that failed to parse, if they can be read."""
    try:
        obj = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError):
        return None, None, {}
    if not isinstance(obj, dict):
        return None, None, {}
    msg_id, msg_type = obj.get("id"), obj.get("type")
    ok_id = msg_id if salvageable(msg_id, 1, 200) else None
    ok_type = msg_type if salvageable(msg_type, 0, 200) else None
    return ok_id, ok_type, obj


def salvageable(value: Any, shortest: int, longest: int) -> bool:
    """Whether ``value``, read from an envelope that failed to parse, can be written into its
    result: a string of ``shortest`` to ``longest`` characters that UTF-8 can carry. Python's
    JSON reader accepts a lone surrogate escape (``"\\ud800"``) that no result could be
    written with."""
    if not isinstance(value, str) or not shortest <= len(value) <= longest:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _header_value(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(raw).decode()


class Consumer:
    """The part shared by command and event consumers: retries, dead letters, metrics."""

    def __init__(
        self,
        *,
        service: str,
        consumer: str,
        uow_factory: Callable[[], UnitOfWork],
        dead_letter: DeadLetterPublisher,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 5.0,
        unexpected_attempts: int = 3,
        seal_dead_letter: Sealer | None = None,
    ) -> None:
        self.service = service
        # A service whose topic carries personal data seals what it dead-letters
        # (``runtime.sealing``); the DLQ is then no more readable than the topic it comes from.
        self.seal_dead_letter = seal_dead_letter
        self.consumer = consumer
        self.uow_factory = uow_factory
        self.dead_letter = dead_letter
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.unexpected_attempts = unexpected_attempts

    async def handle_in(self, uow: UnitOfWork, items: Any) -> list[str]:
        """Handle a fetch's ``items`` in ``uow``'s transaction, which the caller commits; an
        outcome per item."""
        raise NotImplementedError

    async def in_transaction(self, items: Any) -> list[str]:
        """``handle_in`` in a transaction of its own, committed."""
        async with self.uow_factory() as uow:
            outcomes = await self.handle_in(uow, items)
            await uow.commit()
        return outcomes

    async def with_retry(
        self,
        op: Callable[[], Awaitable[T]],
        *,
        passthrough: tuple[type[Exception], ...] = (),
    ) -> T:
        """Run ``op``; transient failures are retried with backoff for as long as it takes."""
        delay = self.retry_initial_s
        unexpected = 0
        while True:
            try:
                return await op()
            except (Rejection, *passthrough):
                raise
            except Exception as exc:
                if is_transient(exc):
                    metrics.TRANSIENT_RETRIES.labels(self.service).inc()
                    log.warning("transient failure, retrying", error=repr(exc), retry_in=delay)
                else:
                    unexpected += 1
                    if unexpected >= self.unexpected_attempts:
                        raise
                    log.warning("handler failed, retrying", error=repr(exc), attempt=unexpected)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)

    async def send_to_dlq(self, raw: RawMessage, error: str) -> None:
        headers = {k: _header_value(v) for k, v in raw.headers}
        headers.update(
            {
                "x-dlq-error": mask_citizen_ids(error)[:4000],
                "x-dlq-topic": raw.topic,
                "x-dlq-partition": str(raw.partition),
                "x-dlq-offset": str(raw.offset),
                "x-dlq-consumer": self.consumer,
                "x-dlq-at": now().isoformat(),
            }
        )
        value, key = raw.value or b"", raw.key
        if self.seal_dead_letter is not None:
            value, sealed = seal_dead_letter(self.seal_dead_letter, raw.topic, value, key)
            headers.update(sealed)
            key = None
        await self.dead_letter(dlq(raw.topic), value, key, headers)
        metrics.DEAD_LETTERED.labels(self.service, raw.topic).inc()
        log.error("message sent to the dead-letter topic", dlq=dlq(raw.topic), error=error)


def validation_errors(exc: Exception) -> list[dict[str, Any]]:
    if isinstance(exc, ValidationError):
        return [
            {"field": ".".join(str(p) for p in e["loc"]), "error": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
    return [{"field": "", "error": str(exc), "type": "value_error"}]


def command_routes(routes: Sequence[CommandRoute]) -> dict[str, CommandRoute]:
    """The routing table of a command topic, by the stable ``type`` string."""
    return {r.model.TYPE: r for r in routes}


def event_routes(routes: Sequence[EventRoute]) -> dict[str, EventRoute]:
    """The routing table of an events subscription, by the stable ``type`` string."""
    return {r.model.TYPE: r for r in routes}
