"""``OffsetCommitter``: a consumer's offsets committed once their records are handled, together
and a little later rather than one request after every fetch.

A record's offset may be committed only once its transaction has committed (state change, inbox
and outbox rows together): a service killed before that must get the record again. It may be
committed later than that at no risk: a record delivered again after a crash or a rebalance
finds its id in the inbox and changes nothing (docs/BROKER.md, "Offsets committed together").
So a consumer need not ask the broker to commit after every fetch, and wait for the answer
before it handles the next one:

- the offsets a fetch's handling finished are noted (``done``), and one commit request, at most
  ``interval_ms`` later, carries every partition's latest; the consume loop never waits for it;
- commits go one after another, so an older one never lands after a newer one;
- when the group takes partitions away, what was handled of them is committed first
  (``on_partitions_revoked``), so the member that gets them does not handle it again;
- a consumer that stops commits what it handled before it leaves (``flush``);
- ``interval_ms = 0`` commits after every fetch, before the next is handled.

Under load the consumers of the hot path (a service's commands and its sagas' answers) fetch
80-100 times a second; each commit was a request to the broker and a wait of the consume loop for
its answer (on the embedded broker, about a sixth of its CPU per enrolment at 200/s).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from services.runtime import metrics

log = structlog.get_logger("bianzhi.broker")


class OffsetCommitter(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits the offsets of the records a group consumer has handled (see the module)."""

    def __init__(self, *, interval_ms: int, name: str) -> None:
        self.interval_s = interval_ms / 1000
        self.name = name
        self.consumer: Any = None
        self._pending: dict[TopicPartition, int] = {}
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, consumer: Any) -> None:
        """The consumer whose offsets these are (a restarted subscriber has a new one)."""
        if consumer is not self.consumer:
            self.consumer = consumer
            self._pending.clear()

    async def done(self, records: Iterable[Any]) -> None:
        """The records of a fetch are handled, their transactions committed: their offsets are
        to be committed (now, with ``interval_ms = 0``; otherwise within it)."""
        pending = self._pending
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offset = record.offset + 1
            if pending.get(tp, -1) < offset:
                pending[tp] = offset
        if not pending:
            return
        if self.interval_s <= 0:
            await self.commit()
        else:
            self._schedule(self.interval_s)

    def _schedule(self, delay_s: float) -> None:
        """A commit in ``delay_s``, unless one is due already."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.commit())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Commit the offsets handled so far (of ``partitions`` only, if given). A commit the
        group refuses (the partition went to another member meanwhile) is dropped: that member
        reads those records again and its inbox ignores them. Any other failure keeps the
        offsets for the next commit."""
        async with self._lock:
            consumer = self.consumer
            if consumer is None or not self._pending:
                return
            wanted = None if partitions is None else set(partitions)
            assigned = consumer.assignment()
            offsets: dict[TopicPartition, int] = {}
            for tp in list(self._pending):
                if wanted is not None and tp not in wanted:
                    continue
                offset = self._pending.pop(tp)
                if tp in assigned:
                    offsets[tp] = offset
            if not offsets:
                return
            try:
                await consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                metrics.OFFSET_COMMITS.labels("refused").inc()
                log.info(
                    "offsets not committed: the partitions went to another member",
                    consumer=self.name,
                    partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in offsets),
                    error=repr(exc),
                )
            except KafkaError as exc:
                metrics.OFFSET_COMMITS.labels("failed").inc()
                log.warning(
                    "offsets not committed: kept for the next commit",
                    consumer=self.name,
                    error=repr(exc),
                )
                for tp, offset in offsets.items():
                    if self._pending.get(tp, -1) < offset:
                        self._pending[tp] = offset
                if self.interval_s > 0:  # else they go with the next fetch's commit
                    self._schedule(max(self.interval_s, 0.5))
            else:
                metrics.OFFSET_COMMITS.labels("committed").inc()

    async def flush(self) -> None:
        """Commit everything handled, now (before the consumer stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        await self.commit()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.commit(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        pass
