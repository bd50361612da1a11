"""The outbox relay: publishes committed outbox rows in order, marks them, keeps them a while.

A row is marked only after the broker acknowledged it, so a relay killed between publish and mark
publishes the row again on its next pass (consumers' inboxes make that harmless). There is no
"claimed" state to get stuck in: every pass starts from the oldest unpublished row, which is also
the sweep of whatever a crash left behind.

On SQLite the marks are written lazily, by a task of their own, at most once per
``mark_interval_s`` (sooner when many rows wait): each mark is a write transaction, and every
write transaction makes the handlers queue for SQLite's single write lock. A crash leaves at most
that many published rows unmarked; they are published again on the next start, as any row a
crash leaves between publish and mark.

Also on SQLite, a unit of work hands the rows it committed straight to the relay
(``hand_over``), and the relay publishes them without reading them back when they follow the
last row it published (seq order is commit order there); anything else (a gap, rows written
by someone else, a start) is read from the table as before. A pass does not wait for the
broker's acknowledgement of the previous one: the records are queued in order, their
acknowledgements are awaited in order by a task of their own, and only acknowledged rows are
marked. A failed acknowledgement makes the relay publish again from the first row of that
pass, as after a crash.

On PostgreSQL several replicas may run a relay; a transaction-scoped advisory lock lets one of them
publish at a time, so one key's rows never overtake each other, and ``FOR UPDATE SKIP LOCKED``
keeps a stalled lock holder from blocking the rest of the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import bindparam, delete, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from contracts.envelope import now
from services.runtime import metrics
from services.runtime.db import is_sqlite
from services.runtime.tables import MessagingTables

log = structlog.get_logger("bianzhi.relay")


@dataclass(frozen=True)
class OutboxRecord:
    seq: int
    topic: str
    key: str | None
    value: bytes
    headers: dict[str, str]
    correlation_id: str | None = None


PublishBatch = Callable[[Sequence[OutboxRecord]], Awaitable[Awaitable[None] | None]]
"""Queues records for the broker in order and returns once they are queued: with an awaitable
of the broker's acknowledgement of every one, or ``None`` when they are acknowledged already."""


async def publish_acknowledged(publish: PublishBatch, records: Sequence[OutboxRecord]) -> None:
    """Publish ``records`` and return once the broker acknowledged every one."""
    ack = await publish(records)
    if ack is not None:
        await ack


def _retrieve(ack: Awaitable[None] | None) -> None:
    # An acknowledgement nobody will await any more: its failure is handled (the rows are
    # published again), so keep asyncio from reporting it as never retrieved.
    if isinstance(ack, asyncio.Future):
        ack.add_done_callback(lambda f: f.cancelled() or f.exception())


class OutboxRelay:
    def __init__(
        self,
        *,
        service: str,
        engine: AsyncEngine,
        sessions: async_sessionmaker[AsyncSession],
        tables: MessagingTables,
        publish: PublishBatch,
        batch_size: int = 500,
        poll_interval_s: float = 0.5,
        retention: timedelta = timedelta(days=7),
        write_lock: asyncio.Lock | None = None,
        read_sessions: async_sessionmaker[AsyncSession] | None = None,
        mark_interval_s: float = 1.0,
        mark_batch: int = 2000,
        # How often a running relay purges rows past retention (None: only when asked).
        purge_interval_s: float | None = 300.0,
        # SQLite: how many passes may wait for their acknowledgement while the next is sent.
        max_unacknowledged: int = 8,
    ) -> None:
        self.service = service
        self.sessions = sessions
        # Scans go through read-only sessions where there are some (SQLite), so the relay
        # never waits behind handlers for the write lock just to read.
        self.read_sessions = read_sessions or sessions
        self.tables = tables
        self.publish = publish
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.retention = retention
        self.mark_interval_s = mark_interval_s
        self.mark_batch = mark_batch
        self.purge_interval_s = purge_interval_s
        self._write_lock = write_lock or asyncio.Lock()
        self._sqlite = is_sqlite(str(engine.url))
        self._lock_key = zlib.crc32(f"bianzhi-relay-{service}".encode()) & 0x7FFFFFFF
        self._wake = asyncio.Event()
        # SQLite: marking runs beside publishing, so a pass never waits for the write lock.
        # Rows up to _published_upto are published (maybe not yet marked); seq order is commit
        # order there, since SQLite has one writer at a time.
        self._published_upto = 0
        self._rewind_to: int | None = None
        self._marks: list[int] = []
        self._marker: asyncio.Task[None] | None = None
        # Rows handed over by the transactions that committed them, in commit order.
        self._handed: deque[OutboxRecord] = deque()
        self._handed_limit = 4 * batch_size
        # Passes sent and not yet acknowledged, oldest first: (seqs, acknowledgement).
        self.max_unacknowledged = max_unacknowledged
        self._unacked: deque[tuple[list[int], Awaitable[None] | None]] = deque()
        self._acker: asyncio.Task[None] | None = None
        self._acked = asyncio.Event()
        self._failure: BaseException | None = None
        self._mark_now = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._last_purge = 0.0
        # Built once: a pass runs it with the last seq published (building it with its values
        # each pass cost more than running it).
        self._select_after = self._select_unpublished().where(
            tables.outbox.c.seq > bindparam("after")
        )

    def wake(self) -> None:
        """Tell the relay new rows were committed (it also polls)."""
        self._wake.set()

    @property
    def takes_hand_over(self) -> bool:
        """Whether committed rows may be handed over (SQLite: seq order is commit order)."""
        return self._sqlite

    def hand_over(self, records: Sequence[OutboxRecord]) -> None:
        """Rows a transaction just committed, in seq order; called in commit order."""
        if len(self._handed) + len(records) > self._handed_limit:
            # The relay is behind (a slow broker): it reads the table until it catches up.
            self._handed.clear()
        else:
            self._handed.extend(records)
        self._wake.set()

    def _take_handed(self) -> list[OutboxRecord]:
        """The handed-over rows that follow the last one published, up to ``batch_size``."""
        handed, upto = self._handed, self._published_upto
        while handed and handed[0].seq <= upto:
            handed.popleft()
        taken: list[OutboxRecord] = []
        while handed and len(taken) < self.batch_size and handed[0].seq == upto + 1:
            taken.append(handed.popleft())
            upto += 1
        return taken

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=f"outbox-relay-{self.service}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Publish what is left (bounded by ``drain_timeout_s``), then stop."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), drain_timeout_s)
            if self._acker is not None:
                await asyncio.wait_for(asyncio.shield(self._acker), drain_timeout_s)
            self._mark_now.set()
            if self._marker is not None:
                await asyncio.wait_for(asyncio.shield(self._marker), drain_timeout_s)
        except TimeoutError:
            log.warning("outbox relay did not drain in time; rows stay for the next start")
            for task in (self._task, self._acker, self._marker):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        self._task = None

    async def _run(self) -> None:
        delay = 0.1
        while True:
            # Only a pass that began after stop() was asked for is the last one: a pass already
            # under way may have read the table before the final handlers committed.
            last_pass = self._stopping
            # Cleared before the pass, so that a commit made during it wakes the next one.
            self._wake.clear()
            try:
                published = await self.publish_once()
                delay = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox relay pass failed; will retry", error=repr(exc), retry_in=delay)
                if self._stopping:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if published >= self.batch_size:
                continue
            if last_pass:
                return
            if self._stopping:
                continue  # stop() came during this pass: one more, at once
            await self._maybe_purge()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)

    async def publish_once(self) -> int:
        """One pass: publish up to ``batch_size`` of the oldest unpublished rows."""
        if self._sqlite:
            return await self._publish_once_sqlite()
        return await self._publish_once_locked()

    def _select_unpublished(self) -> Any:
        o = self.tables.outbox.c
        return (
            select(o.seq, o.topic, o.key, o.value, o.headers, o.correlation_id)
            .where(o.published_at.is_(None))
            .order_by(o.seq)
            .limit(self.batch_size)
        )

    async def _publish_once_sqlite(self) -> int:
        # One process owns a SQLite file; handlers never wait on the broker, and the relay
        # never waits on the write lock: marks are written by a task of their own.
        if self._rewind_to is not None:
            self._published_upto, self._rewind_to = self._rewind_to, None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure  # the pass "failed": the run loop retries after its delay
        records = self._take_handed()
        if not records:
            async with self.read_sessions() as session:
                rows = (
                    await session.execute(self._select_after, {"after": self._published_upto})
                ).all()
            if not rows:
                metrics.OUTBOX_BACKLOG.labels(self.service).set(0)
                return 0
            records = [_record(r) for r in rows]
        while len(self._unacked) >= self.max_unacknowledged:
            self._acked.clear()
            await self._acked.wait()
            if self._rewind_to is not None:
                return 0  # an acknowledgement failed: the next pass starts from there
        ack = await self.publish(records)
        self._published_upto = records[-1].seq
        self._unacked.append(([r.seq for r in records], ack))
        if self._acker is None or self._acker.done():
            self._acker = asyncio.create_task(self._await_acks())
        self._published(len(records))
        return len(records)

    async def _await_acks(self) -> None:
        """Await the passes' acknowledgements in order; acknowledged rows are marked."""
        while self._unacked:
            seqs, ack = self._unacked[0]
            try:
                if ack is not None:
                    await ack
            except Exception as exc:
                # Some of these rows may not have reached the broker: publish again from the
                # first of them, as after a crash (consumers' inboxes make repeats harmless).
                log.warning("outbox rows were not acknowledged; publishing again", error=repr(exc))
                for _, later in self._unacked:
                    _retrieve(later)
                self._unacked.clear()
                self._rewind_to = min(seqs) - 1
                self._failure = exc
                self._acked.set()
                self._wake.set()
                return
            self._unacked.popleft()
            self._acked.set()
            self._marks.extend(seqs)
            if len(self._marks) >= self.mark_batch:
                self._mark_now.set()
            if self._marker is None or self._marker.done():
                self._marker = asyncio.create_task(self._mark_pending())

    async def _mark_pending(self) -> None:
        while self._marks:
            if not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._mark_now.wait(), self.mark_interval_s)
            self._mark_now.clear()
            if not self._marks:
                return
            seqs, self._marks = self._marks, []
            try:
                async with self._write_lock, self.sessions() as session, session.begin():
                    await self._mark(session, seqs)
            except Exception as exc:
                # Published but not marked: publish them again, as after a crash (consumers'
                # inboxes make the repeat harmless).
                log.warning("marking published outbox rows failed", error=repr(exc))
                self._rewind_to = min(seqs) - 1
                self._marks = []
                self._wake.set()
                return

    async def _publish_once_locked(self) -> int:
        async with self.sessions() as session, session.begin():
            got = await session.execute(
                text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": self._lock_key}
            )
            if not got.scalar():
                return 0
            stmt = self._select_unpublished().with_for_update(skip_locked=True)
            rows = (await session.execute(stmt)).all()
            if not rows:
                metrics.OUTBOX_BACKLOG.labels(self.service).set(0)
                return 0
            records = [_record(r) for r in rows]
            await publish_acknowledged(self.publish, records)
            await self._mark(session, [r.seq for r in records])
        self._published(len(records))
        return len(records)

    async def _mark(self, session: AsyncSession, seqs: list[int]) -> None:
        o = self.tables.outbox.c
        if self._sqlite:
            # Every unmarked row from the first to the last of ``seqs`` was published: seq
            # order is commit order there, and the relay publishes a gapless run of them.
            which = o.seq.between(min(seqs), max(seqs)) & o.published_at.is_(None)
        else:
            which = o.seq.in_(seqs)
        await session.execute(update(self.tables.outbox).where(which).values(published_at=now()))

    def _published(self, count: int) -> None:
        metrics.OUTBOX_PUBLISHED.labels(self.service).inc(count)
        log.debug("outbox rows published", count=count)

    async def backlog(self) -> int:
        """How many rows wait to be published."""
        o = self.tables.outbox.c
        waiting = o.published_at.is_(None)
        if self._sqlite:
            # Published rows wait a moment for their mark; they do not wait to be published.
            upto = self._published_upto if self._rewind_to is None else self._rewind_to
            waiting = waiting & (o.seq > upto)
        async with self.read_sessions() as session:
            count = (await session.execute(select(func.count()).where(waiting))).scalar_one()
        metrics.OUTBOX_BACKLOG.labels(self.service).set(count)
        return int(count)

    async def _maybe_purge(self) -> None:
        loop = asyncio.get_running_loop()
        if self.purge_interval_s is None or loop.time() - self._last_purge < self.purge_interval_s:
            return
        self._last_purge = loop.time()
        try:
            await self.purge()
        except Exception as exc:
            log.warning("outbox purge failed", error=repr(exc))

    async def purge(self) -> int:
        """Delete published rows older than the retention window, but for the newest row.

        The newest row stays because SQLite numbers a new row one above the highest it holds:
        with every row gone, numbering would start again below the rows already published,
        where a running relay no longer looks.
        """
        o = self.tables.outbox.c
        cutoff = now() - self.retention
        newest = select(func.max(o.seq)).scalar_subquery()
        async with self._write_lock, self.sessions() as session, session.begin():
            result = await session.execute(
                delete(self.tables.outbox).where(
                    o.published_at.is_not(None), o.published_at < cutoff, o.seq < newest
                )
            )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def replay(
        self, since: datetime, *, progress: Callable[[int, int], None] | None = None
    ) -> int:
        """Publish again every retained row created at or after ``since``, in order."""
        o = self.tables.outbox.c
        # Stored times are UTC; SQLite drops the offset of a bound value, so convert first.
        since = since.astimezone(UTC) if since.tzinfo else since.replace(tzinfo=UTC)
        async with self.read_sessions() as session:
            total = (
                await session.execute(select(func.count()).where(o.created_at >= since))
            ).scalar_one()
        done, last_seq = 0, -1
        while True:
            async with self.read_sessions() as session:
                rows = (
                    await session.execute(
                        select(o.seq, o.topic, o.key, o.value, o.headers, o.correlation_id)
                        .where(o.created_at >= since, o.seq > last_seq)
                        .order_by(o.seq)
                        .limit(self.batch_size)
                    )
                ).all()
            if not rows:
                return done
            records = [_record(r) for r in rows]
            await publish_acknowledged(self.publish, records)
            done += len(records)
            last_seq = records[-1].seq
            if progress is not None:
                progress(done, int(total))


def _record(row: Any) -> OutboxRecord:
    return OutboxRecord(
        seq=row.seq,
        topic=row.topic,
        key=row.key,
        value=row.value,
        headers=dict(row.headers),
        correlation_id=row.correlation_id,
    )
