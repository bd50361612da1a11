"""The command consumer: parse, authorize, handle once, answer once — or dead-letter.

Every command gets exactly one result on ``bianzhi.command-results.v1`` (a saga step also on
the answers topic its sender names, ``UnitOfWork.stage_result``). The handler's state
changes, its events, the result and the inbox record commit in one transaction; a re-sent command
id re-emits the stored result and changes nothing. The commands of one fetch share a
transaction unless a handler refuses one of them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError

from contracts.base import Command, Message
from contracts.codes import ReasonCode
from contracts.envelope import Envelope, now
from contracts.results import CommandCompleted, CommandRejected
from services.runtime import metrics
from services.runtime.messaging import (
    CommandRoute,
    Consumer,
    HandlerContext,
    RawMessage,
    caused_envelope,
    has_role,
    rejection_from_validation,
    salvage,
    salvageable,
    validation_errors,
)
from services.runtime.rules import Rejection
from services.runtime.signing import CommandVerifier
from services.runtime.uow import UnitOfWork

log = structlog.get_logger("bianzhi.commands")


@dataclass
class _Prepared:
    """One command record after parsing and the checks that need no database."""

    raw: RawMessage
    env: Envelope | None = None
    route: CommandRoute | None = None
    command: Command | None = None
    rejection: Rejection | None = None
    dlq_error: str | None = None

    @property
    def type(self) -> str:
        return self.env.type if self.env is not None else "unparseable"


def _prepared_runs(
    items: Sequence[_Prepared], fresh: set[str]
) -> dict[int, list[tuple[Envelope, Command]]]:
    """The runs of a fetch's commands for their route's ``prepare``, by the index of the
    first: two or more new commands of one route with a ``prepare`` whose handlers run one after
    another (commands refused before their handler and duplicates between them change no state
    and do not break a run), as (envelope, command) in order."""
    runs: dict[int, list[tuple[Envelope, Command]]] = {}
    seen: set[str] = set()
    start, route = -1, None
    for index, p in enumerate(items):
        assert p.env is not None
        if p.env.id in seen or p.env.id not in fresh:
            continue
        seen.add(p.env.id)
        if p.rejection is not None:
            continue
        assert p.route is not None and p.command is not None
        if p.route is not route:
            start, route = index, p.route
            runs[start] = []
        runs[start].append((p.env, p.command))
    return {
        index: run
        for index, run in runs.items()
        if len(run) > 1 and (r := items[index].route) is not None and r.prepare is not None
    }


class _SinglesNeeded(Exception):
    """A batch that cannot be one transaction (a handler refused a command mid-batch)."""


class CommandConsumer(Consumer):
    """Consumes one command topic. ``process`` never raises but for cancellation."""

    def __init__(
        self,
        *,
        routes: dict[str, CommandRoute],
        source: str,
        verifier: CommandVerifier | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.routes = routes
        self.source = source
        # When signatures are required: a command without a valid token is refused first.
        self.verifier = verifier

    async def process(self, raw: RawMessage) -> None:
        await self._run_one(self._prepare(raw))

    async def process_batch(self, raws: Sequence[RawMessage]) -> None:
        """Handle one fetch: in one transaction when every command in it succeeds or was
        refused before its handler ran; otherwise one by one."""
        await self.handle_items(await self.read_fetch(raws))

    async def read_fetch(self, raws: Sequence[RawMessage]) -> list[_Prepared]:
        """A fetch's commands, read and checked; those that cannot be read at all are
        dead-lettered here, once. The rest are handled by ``handle_items``, or by
        ``handle_in`` in a transaction the caller opens."""
        for raw in raws:
            if (age := raw.age_s()) is not None:
                metrics.MESSAGE_AGE.labels(self.service).observe(age)
        metrics.BATCH_SIZE.labels(self.service).observe(len(raws))
        prepared = [self._prepare(raw) for raw in raws]
        for p in prepared:
            if p.dlq_error is not None:
                await self._run_one(p)
        return [p for p in prepared if p.dlq_error is None]

    async def handle_items(self, batchable: list[_Prepared]) -> None:
        """Handle what ``read_fetch`` returned, in a transaction of their own."""
        if len(batchable) < 2:
            for p in batchable:
                await self._run_one(p)
            return
        started = time.perf_counter()
        try:
            outcomes = await self.with_retry(
                lambda: self.in_transaction(batchable), passthrough=(_SinglesNeeded,)
            )
        except _SinglesNeeded:
            for p in batchable:
                await self._run_one(p)
            return
        except Exception:
            log.exception("batch could not be handled as one; handling one by one")
            for p in batchable:
                await self._run_one(p)
            return
        self.handled(batchable, outcomes, time.perf_counter() - started)

    def handled(self, batchable: list[_Prepared], outcomes: list[str], elapsed: float) -> None:
        """Count what a committed transaction did with ``batchable``."""
        for p, outcome in zip(batchable, outcomes, strict=True):
            if outcome == "rejected":
                assert p.rejection is not None
                metrics.COMMANDS_REJECTED.labels(self.service, p.rejection.code.value).inc()
            metrics.MESSAGES_HANDLED.labels(self.service, p.type, outcome).inc()
            metrics.HANDLER_LATENCY.labels(self.service, p.type).observe(elapsed)
        log.info("command batch handled", commands=len(batchable))

    async def _run_one(self, p: _Prepared) -> None:
        started = time.perf_counter()
        raw = p.raw
        structlog.contextvars.bind_contextvars(
            topic=raw.topic, partition=raw.partition, offset=raw.offset
        )
        if p.env is not None:
            structlog.contextvars.bind_contextvars(
                correlation_id=p.env.effective_correlation_id, message_id=p.env.id, type=p.type
            )
        type_ = p.type
        try:
            outcome = await self._process_prepared(p)
        except Exception as exc:  # a bug or a permanent failure: keep the message, move on
            log.exception("command could not be handled")
            await self.send_to_dlq(raw, f"{type(exc).__name__}: {exc}")
            outcome = "dead_lettered"
        finally:
            structlog.contextvars.unbind_contextvars(
                "topic", "partition", "offset", "correlation_id", "message_id", "type"
            )
        metrics.MESSAGES_HANDLED.labels(self.service, type_, outcome).inc()
        metrics.HANDLER_LATENCY.labels(self.service, type_).observe(time.perf_counter() - started)

    async def _process_prepared(self, p: _Prepared) -> str:
        if p.dlq_error is not None:
            await self.send_to_dlq(p.raw, p.dlq_error)
            return "dead_lettered"
        env = p.env
        assert env is not None
        if p.rejection is not None:
            rejection = p.rejection
            return await self.with_retry(lambda: self._finish_rejected(env, rejection))
        route, command = p.route, p.command
        assert route is not None and command is not None
        return await self.with_retry(lambda: self._handle(env, route, command))

    def _prepare(self, raw: RawMessage) -> _Prepared:
        try:
            env = Envelope.from_bytes(raw.value or b"")
        except (ValidationError, ValueError) as exc:
            msg_id, msg_type, obj = salvage(raw.value)
            if msg_id is None:
                return _Prepared(raw=raw, dlq_error=f"not a CloudEvents envelope: {exc}")
            salvaged = Envelope.model_construct(
                id=msg_id,
                type=msg_type or "unknown",
                source=str(obj.get("source", "unknown")),
                time=now(),
                # Kept only when it could be sent on: the result carries it.
                correlationid=correlation
                if salvageable(correlation := obj.get("correlationid"), 1, 200)
                else None,
                data={},
            )
            rej = Rejection(
                ReasonCode.INVALID_MESSAGE,
                f"the envelope is malformed / 消息信封格式错误: {exc.errors()[0]['msg']}"
                if isinstance(exc, ValidationError)
                else f"the envelope is malformed / 消息信封格式错误: {exc}",
                {"errors": validation_errors(exc)},
            )
            return _Prepared(raw=raw, env=salvaged, rejection=rej)

        if self.verifier is not None and (refusal := self.verifier.verify(env)) is not None:
            metrics.SIGNATURES_REFUSED.labels(self.service, refusal.details["reason"]).inc()
            return _Prepared(raw=raw, env=env, rejection=refusal)
        route = self.routes.get(env.type)
        if route is None:
            return _Prepared(
                raw=raw,
                env=env,
                rejection=Rejection(
                    ReasonCode.UNKNOWN_TYPE,
                    f"this service does not handle {env.type!r} / 不支持的指令类型",
                    {"type": env.type, "known": sorted(self.routes)},
                ),
            )
        if missing := env.missing_actor_fields():
            return _Prepared(
                raw=raw,
                env=env,
                rejection=Rejection(
                    ReasonCode.FORBIDDEN,
                    f"the command carries no {', '.join(missing)} / 指令缺少操作人信息",
                    {"missing": missing},
                ),
            )
        if not has_role(env.roles, route.role):
            return _Prepared(
                raw=raw,
                env=env,
                rejection=Rejection(
                    ReasonCode.FORBIDDEN,
                    f"role {route.role.value} is required / 需要 {route.role.value} 角色",
                    {"required_role": route.role.value, "actor_roles": sorted(env.roles)},
                ),
            )
        try:
            command = route.model.model_validate(env.data)
        except ValidationError as exc:
            return _Prepared(raw=raw, env=env, rejection=rejection_from_validation(exc))
        return _Prepared(raw=raw, env=env, route=route, command=command)

    async def handle_in(self, uow: UnitOfWork, items: list[_Prepared]) -> list[str]:
        """Handle ``items`` in ``uow``'s transaction, which the caller commits; raises
        ``_SinglesNeeded`` when they cannot be handled together (a handler refused one)."""
        outcomes: list[str] = []
        envs: dict[str, Envelope] = {}
        for p in items:
            assert p.env is not None
            envs.setdefault(p.env.id, p.env)
        fresh = await uow.claim_many(self.consumer, list(envs.values()))
        stored = await uow.stored_results([i for i in envs if i not in fresh])
        prepares = _prepared_runs(items, fresh)
        results: dict[str, Envelope] = {}
        handled: set[str] = set()
        to_store: list[tuple[Envelope, Envelope, str | None]] = []
        for index, p in enumerate(items):
            env = p.env
            assert env is not None
            if env.id in handled or env.id not in fresh:
                again = results.get(env.id)
                if again is None and env.id in stored:
                    again = Envelope.from_bytes(stored[env.id])
                if again is not None:
                    uow.stage_result(env, again)
                outcomes.append("duplicate")
                continue
            if p.rejection is not None:
                result_env = self._rejected_envelope(env, p.rejection)
                code: str | None = p.rejection.code.value
                log.warning(
                    "command rejected",
                    message_id=env.id,
                    type=env.type,
                    code=code,
                    reason=p.rejection.message,
                )
            else:
                assert p.route is not None and p.command is not None
                if (run := prepares.get(index)) is not None:
                    assert p.route.prepare is not None
                    await p.route.prepare(uow, run)
                ctx = HandlerContext(envelope=env, source=self.source)
                try:
                    await p.route.handler(p.command, uow, ctx)
                except Rejection:
                    raise _SinglesNeeded from None
                for event_env, topic in ctx.emitted:
                    uow.stage(event_env, topic, event_env.subject)
                handled.add(env.id)
                if ctx.deferred:
                    outcomes.append("accepted")
                    continue
                result_env = self._completed_envelope(env, p.command, ctx)
                code = None
            handled.add(env.id)
            results[env.id] = result_env
            to_store.append((env, result_env, code))
            uow.stage_result(env, result_env)
            outcomes.append("rejected" if code else "completed")
        await uow.store_results(to_store)
        return outcomes

    def _completed_envelope(self, env: Envelope, command: Command, ctx: HandlerContext) -> Envelope:
        return self._result_envelope(
            env,
            CommandCompleted(
                command_id=env.id,
                command_type=env.type,
                subject=ctx.result_subject or command.subject_value(),
                events=[e.id for e, _ in ctx.emitted],
            ),
        )

    def _rejected_envelope(self, env: Envelope, rej: Rejection) -> Envelope:
        return self._result_envelope(
            env,
            CommandRejected(
                command_id=env.id,
                command_type=env.type,
                code=rej.code,
                message=rej.message,
                details=rej.details,
            ),
        )

    # Units of work never nest (on SQLite each one holds the single write lock until it is
    # closed): a duplicate or a rejection is answered in a unit of work of its own, after the
    # one that found it out has been left.

    async def _handle(self, env: Envelope, route: CommandRoute, command: Command) -> str:
        rejection: Rejection | None = None
        async with self.uow_factory() as uow:
            duplicate = not await uow.claim(self.consumer, env)
            if not duplicate:
                ctx = HandlerContext(envelope=env, source=self.source)
                try:
                    await route.handler(command, uow, ctx)
                except Rejection as rej:
                    await uow.rollback()
                    rejection = rej
                else:
                    for event_env, topic in ctx.emitted:
                        uow.stage(event_env, topic, event_env.subject)
                    if not ctx.deferred:
                        result_env = self._completed_envelope(env, command, ctx)
                        await uow.store_result(env, result_env, None)
                        uow.stage_result(env, result_env)
                    await uow.commit()
        if duplicate:
            return await self._reemit(env)
        if rejection is not None:
            return await self._finish_rejected(env, rejection)
        if ctx.deferred:
            log.info("command accepted, saga started", messages=len(ctx.emitted))
            return "accepted"
        log.info("command completed", events=len(ctx.emitted))
        return "completed"

    async def _finish_rejected(self, env: Envelope, rej: Rejection) -> str:
        async with self.uow_factory() as uow:
            duplicate = not await uow.claim(self.consumer, env)
            if not duplicate:
                result_env = self._rejected_envelope(env, rej)
                await uow.store_result(env, result_env, rej.code.value)
                uow.stage_result(env, result_env)
                await uow.commit()
        if duplicate:
            return await self._reemit(env)
        metrics.COMMANDS_REJECTED.labels(self.service, rej.code.value).inc()
        log.warning("command rejected", code=rej.code.value, reason=rej.message)
        return "rejected"

    async def _reemit(self, env: Envelope) -> str:
        """A re-sent command: publish its stored result again, change nothing. A command
        whose saga is still running has no result yet; it gets one when the saga ends."""
        async with self.uow_factory() as uow:
            stored = await uow.stored_result(env.id)
            if stored is not None:
                uow.stage_result(env, Envelope.from_bytes(stored))
                await uow.commit()
        log.info("duplicate command, stored result re-emitted", had_result=stored is not None)
        return "duplicate"

    def _result_envelope(self, env: Envelope, result: Message) -> Envelope:
        return result_envelope(env, result, self.source)


def result_envelope(command: Envelope, result: Message, source: str) -> Envelope:
    """The envelope of ``command``'s result: its correlation and actor, caused by it."""
    return caused_envelope(result, command, source=source)


async def finish_command(
    uow: UnitOfWork,
    command: Envelope,
    source: str,
    *,
    subject: str | None = None,
    events: Sequence[Envelope] = (),
    rejection: Rejection | None = None,
) -> Envelope:
    """Write the one result of a command whose saga has ended, in ``uow``'s transaction:
    ``CommandCompleted`` with ``events``, or ``CommandRejected`` for ``rejection``."""
    result: Message
    if rejection is None:
        result = CommandCompleted(
            command_id=command.id,
            command_type=command.type,
            subject=subject,
            events=[e.id for e in events],
        )
    else:
        result = CommandRejected(
            command_id=command.id,
            command_type=command.type,
            code=rejection.code,
            message=rejection.message,
            details=rejection.details,
        )
        metrics.COMMANDS_REJECTED.labels(source.rsplit("/", 1)[-1], rejection.code.value).inc()
    env = result_envelope(command, result, source)
    await uow.store_result(command, env, rejection.code.value if rejection else None)
    uow.stage_result(command, env)
    return env
