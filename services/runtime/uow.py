"""The unit of work: state changes, inbox record, audit entries and outbox rows commit in one
transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import cache
from types import TracebackType
from typing import Any, Self, cast

import structlog
from sqlalchemy import Insert, Table, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from contracts.envelope import CONTENT_TYPE, Envelope, now
from contracts.topics import ANSWER_TOPICS, COMMAND_RESULTS, SERVICES, answers, commands
from services.runtime.audit import AuditRecord, CommandAuditor
from services.runtime.db import ignoring_duplicates, insert_rows
from services.runtime.prepared import Kept
from services.runtime.relay import OutboxRecord
from services.runtime.sealing import SEALED_HEADER, Sealer
from services.runtime.tables import MessagingTables

# Commands one service sends another (saga steps) are signed like a front-end's.
COMMAND_TOPICS = frozenset(commands(s) for s in SERVICES)
log = structlog.get_logger("bianzhi.uow")


class UnitOfWork:
    """``async with uow:`` opens a transaction; leaving without ``commit()`` rolls it back.

    A handler never publishes: it stages outgoing messages here and they are written to the
    outbox in the same transaction as its state changes and its inbox record.
    """

    @classmethod
    def configured(cls, **settings: object) -> type[Self]:
        """The unit of work of a running service: a subclass whose class attributes are that
        service's ``settings`` (its saga timings, a cipher), which handlers read from it."""
        return cast(type[Self], type(f"Configured{cls.__name__}", (cls,), settings))

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        tables: MessagingTables,
        *,
        on_commit: Callable[[], None] | None = None,
        hand_over: Callable[[Sequence[OutboxRecord]], None] | None = None,
        write_lock: asyncio.Lock | None = None,
        source: str = "",
        auditor: CommandAuditor | None = None,
        signer: Callable[[Envelope], Envelope] | None = None,
        sealer: Sealer | None = None,
        sealed_topics: frozenset[str] = frozenset(),
        reply_to: str | None = None,
    ) -> None:
        self._sessions = sessions
        # This service's answers topic, named by the commands it sends (its saga steps).
        self.reply_to = reply_to
        # Appends each stored result's command to the audit chain, in this transaction.
        self._auditor = auditor
        # Signs the commands this service sends (when it has a signing key).
        self._signer = signer
        # Rows for these topics carry personal data in full: stored sealed, opened by the relay.
        self._sealer = sealer
        self._sealed_topics = sealed_topics if sealer is not None else frozenset()
        self._audit_pending: list[tuple[Envelope, str | None]] = []
        self._audit_head: AuditRecord | None = None
        # The CloudEvents ``source`` of what this service writes (for work begun outside a
        # command handler: saga answers, timers).
        self.source = source
        self._write_lock = write_lock
        self.tables = tables
        self._on_commit = on_commit
        # Given (SQLite), the outbox rows a commit wrote go straight to the relay with their seq.
        self._hand_over = hand_over
        self._staged: list[dict[str, Any]] = []
        self._session: AsyncSession | None = None
        self.committed = False

    @property
    def session(self) -> AsyncSession:
        if self._session is None:
            raise RuntimeError("unit of work used outside 'async with'")
        return self._session

    async def __aenter__(self) -> Self:
        if self._write_lock is not None:
            await self._write_lock.acquire()
        self._session = self._sessions()
        self._staged = []
        self._audit_pending = []
        self._audit_head = None
        self.committed = False
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self.committed:
                self._forget_deferred()
                self._forget_kept()
                await self.session.rollback()
        finally:
            await self.session.close()
            self._session = None
            if self._write_lock is not None:
                self._write_lock.release()

    async def claim(self, consumer: str, envelope: Envelope) -> bool:
        """Record ``envelope`` as received by ``consumer``; ``False`` if it was already.

        Must be the first statement of the transaction: a duplicate aborts it.
        """
        try:
            await self.session.execute(
                _insert(self.tables.inbox),
                {
                    "consumer": consumer,
                    "message_id": envelope.id,
                    "message_type": envelope.type[:200],
                    "received_at": now(),
                },
            )
        except IntegrityError:
            await self.session.rollback()
            return False
        return True

    async def claim_many(self, consumer: str, envelopes: list[Envelope]) -> set[str]:
        """Record many messages as received in one statement; the ids that were new.

        Duplicates are skipped by the unique key (``ON CONFLICT DO NOTHING``), so the
        transaction goes on; on PostgreSQL a concurrent claim of the same id waits for the
        other transaction and then counts as a duplicate.
        """
        if not envelopes:
            return set()
        inbox = self.tables.inbox
        stamp = now()
        rows = [
            {
                "consumer": consumer,
                "message_id": env.id,
                "message_type": env.type[:200],
                "received_at": stamp,
            }
            for env in envelopes
        ]
        stmt = ignoring_duplicates(
            self.session, inbox, on=["consumer", "message_id"], returning=inbox.c.message_id
        )
        return set((await insert_rows(self.session, stmt, rows)).scalars())

    async def stored_results(self, command_ids: list[str]) -> dict[str, bytes]:
        """The stored result envelopes of these commands (those that have one)."""
        if not command_ids:
            return {}
        t = self.tables.command_results
        rows = await self.session.execute(
            select(t.c.command_id, t.c.envelope).where(t.c.command_id.in_(command_ids))
        )
        return {row.command_id: row.envelope for row in rows}

    async def store_results(self, results: list[tuple[Envelope, Envelope, str | None]]) -> None:
        """Keep many (command, result, code) at once; see ``store_result``."""
        if not results:
            return
        self._audit([(command, code) for command, _, code in results])
        stamp = now()
        await insert_rows(
            self.session,
            self.tables.command_results,
            [
                {
                    "command_id": command.id,
                    "command_type": command.type[:200],
                    "result_type": result.type,
                    "code": code,
                    "actor_id": command.actorid,
                    "actor_region": command.actorregion,
                    "envelope": result.to_bytes(),
                    "created_at": stamp,
                }
                for command, result, code in results
            ],
        )

    def stage(self, envelope: Envelope, topic: str, key: str | None) -> None:
        """Queue ``envelope`` for the outbox; written at ``commit()``. A command for another
        service names this service's answers topic (``replyto``) when it has one, and is
        signed here when this service has a signing key."""
        if topic in COMMAND_TOPICS:
            if self.reply_to is not None and envelope.replyto is None:
                envelope = envelope.model_copy(update={"replyto": self.reply_to})
            if self._signer is not None:
                envelope = self._signer(envelope)
        row = outbox_row(envelope, topic, key)
        if topic in self._sealed_topics:
            assert self._sealer is not None
            row["value"], label = self._sealer.seal(row["value"], topic)
            row["headers"] = {**row["headers"], SEALED_HEADER: label}
        self._staged.append(row)

    def stage_result(self, command: Envelope, result: Envelope) -> None:
        """Queue ``command``'s result: on the results topic, keyed by the command's id, and on
        the answers topic the command names in ``replyto`` (a saga step's sender reads its
        answers there). A ``replyto`` naming anything but an answers topic is not followed.

        A step sent by a service from before ``replyto`` (an upgrade under way) names none;
        its answer also goes to the answers topic of the service its ``source`` names, where
        that service reads its answers once upgraded (docs/deploy.md)."""
        self.stage(result, COMMAND_RESULTS, command.id)
        reply_to = command.replyto
        if reply_to is None:
            sender = answers(command.source.rstrip("/").rsplit("/", 1)[-1])
            if sender in ANSWER_TOPICS:
                self.stage(result, sender, command.id)
            return
        if reply_to in ANSWER_TOPICS:
            self.stage(result, reply_to, command.id)
        else:
            log.warning(
                "reply topic not followed: not an answers topic",
                message_id=command.id,
                replyto=reply_to[:250],
            )

    @property
    def staged(self) -> list[dict[str, Any]]:
        return list(self._staged)

    async def store_result(self, command: Envelope, result: Envelope, code: str | None) -> None:
        """Keep a command's result so a re-sent command id gets the same result again, and
        append the command with its outcome to the audit chain."""
        await self.store_results([(command, result, code)])

    def _audit(self, outcomes: list[tuple[Envelope, str | None]]) -> None:
        # Collected and appended at commit: one read of the chain head and one insert per
        # transaction, however many results it stores (a batch, a fetch of saga answers).
        if self._auditor is not None:
            self._audit_pending.extend(outcomes)

    async def _append_audit(self) -> None:
        if self._auditor is None or not self._audit_pending:
            return
        pending, self._audit_pending = self._audit_pending, []
        checkpoints, self._audit_head = await self._auditor.append(self.session, pending)
        for checkpoint, topic in checkpoints:
            self.stage(checkpoint, topic, checkpoint.subject)

    async def stored_result(self, command_id: str) -> bytes | None:
        """The stored result envelope of a command, if it has one."""
        row = await self.session.execute(
            select(self.tables.command_results.c.envelope).where(
                self.tables.command_results.c.command_id == command_id
            )
        )
        return row.scalar_one_or_none()

    async def _write_deferred(self) -> None:
        """Write what a service keeps for the end of its transaction (rows nothing reads back
        in it, written together, a statement per table); ``commit`` calls it first."""

    def _forget_deferred(self) -> None:
        """Forget what ``_write_deferred`` would have written: the transaction is rolled back
        or left without a commit."""

    def kept(self) -> Sequence[Kept[Any]]:
        """Where a service's repositories keep what a batch ``prepare`` did for its handlers
        (``services.runtime.prepared``)."""
        return ()

    def _forget_kept(self) -> None:
        for kept in self.kept():
            kept.clear()

    async def commit(self) -> None:
        # Whatever a prepare did, a handler asked for: else the transaction would commit a
        # change no message made (it is rolled back and handled one by one instead).
        if left := [key for kept in self.kept() for key in kept.left()]:
            raise RuntimeError(f"prepared for the handlers but never asked for: {left}")
        await self._write_deferred()
        await self._append_audit()
        staged, seqs = self._staged, []
        if staged:
            if self._hand_over is None:
                await insert_rows(self.session, self.tables.outbox, staged)
            else:
                seqs = await self._insert_outbox_numbered(staged)
        await self.session.commit()
        self.committed = True
        self._staged = []
        if self._audit_head is not None and self._auditor is not None:
            self._auditor.committed(self._audit_head)
            self._audit_head = None
        if seqs and self._hand_over is not None:
            self._hand_over(
                [
                    OutboxRecord(
                        seq=seq,
                        topic=row["topic"],
                        key=row["key"],
                        value=row["value"],
                        headers=row["headers"],
                        correlation_id=row["correlation_id"],
                    )
                    for seq, row in zip(seqs, staged, strict=True)
                ]
            )
        if self._on_commit is not None:
            self._on_commit()

    async def _insert_outbox_numbered(self, rows: list[dict[str, Any]]) -> list[int]:
        """Insert outbox rows and return their seqs in the order of ``rows``.

        Only with ``hand_over`` (SQLite, one writer at a time): the rows of one insert are
        numbered in the order given, so the returned numbers sorted are theirs in order.
        """
        stmt = _insert_returning_seq(self.tables.outbox)
        return sorted((await insert_rows(self.session, stmt, rows)).scalars())

    async def rollback(self) -> None:
        self._forget_deferred()
        self._forget_kept()
        self._staged = []
        self._audit_pending = []
        self._audit_head = None
        await self.session.rollback()


# Statements built once, values passed as parameters: building a statement with its values
# (and its cache key from them) in every transaction cost more than running it.
@cache
def _insert(table: Table) -> Insert:
    return insert(table)


@cache
def _insert_returning_seq(table: Table) -> Insert:
    return insert(table).returning(table.c.seq)


def outbox_row(envelope: Envelope, topic: str, key: str | None) -> dict[str, Any]:
    """The outbox row of one message."""
    return {
        "message_id": envelope.id,
        "topic": topic,
        "key": key,
        "value": envelope.to_bytes(),
        "headers": {"content-type": CONTENT_TYPE},
        "message_type": envelope.type,
        "correlation_id": envelope.correlationid,
        "created_at": now(),
        "published_at": None,
    }
