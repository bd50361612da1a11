"""``OffsetCommitter``: which offsets a consumer commits, when, and what a failed commit does."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, KafkaConnectionError

from services.runtime.offsets import OffsetCommitter

T = "bianzhi.orgs.commands.v1"
P0, P1, P2 = TopicPartition(T, 0), TopicPartition(T, 1), TopicPartition(T, 2)


@dataclass
class Record:
    topic: str
    partition: int
    offset: int


def records(tp: TopicPartition, *offsets: int) -> list[Record]:
    return [Record(tp.topic, tp.partition, o) for o in offsets]


@dataclass
class FakeConsumer:
    """The part of aiokafka's consumer the committer uses; commits are recorded in order."""

    assigned: set[TopicPartition] = field(default_factory=lambda: {P0, P1, P2})
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)
    fail_with: list[Exception] = field(default_factory=list)
    hold: asyncio.Event | None = None
    in_flight: int = 0
    most_in_flight: int = 0

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hold is not None:
                await self.hold.wait()
            if self.fail_with:
                raise self.fail_with.pop(0)
            self.commits.append(dict(offsets))
        finally:
            self.in_flight -= 1


def committer(consumer: Any, interval_ms: int) -> OffsetCommitter:
    c = OffsetCommitter(interval_ms=interval_ms, name="test")
    c.attach(consumer)
    return c


async def test_interval_zero_commits_each_fetch_before_done_returns() -> None:
    consumer = FakeConsumer()
    c = committer(consumer, 0)
    await c.done(records(P0, 4, 5, 6) + records(P1, 9))
    assert consumer.commits == [{P0: 7, P1: 10}]
    await c.done(records(P0, 7))
    assert consumer.commits[-1] == {P0: 8}


async def test_fetches_within_the_interval_share_one_commit_of_the_latest_offsets() -> None:
    consumer = FakeConsumer()
    c = committer(consumer, 50)
    await c.done(records(P0, 1, 2))
    await c.done(records(P1, 5))
    await c.done(records(P0, 3))
    assert consumer.commits == []  # the consume loop did not wait for a commit
    await asyncio.sleep(0.15)
    assert consumer.commits == [{P0: 4, P1: 6}]
    await asyncio.sleep(0.1)
    assert len(consumer.commits) == 1  # nothing new handled: no request


async def test_commits_go_one_after_another_so_an_older_never_lands_last() -> None:
    consumer = FakeConsumer(hold=asyncio.Event())
    c = committer(consumer, 10)
    await c.done(records(P0, 1))
    await asyncio.sleep(0.05)  # the first commit is waiting on the broker
    await c.done(records(P0, 2))
    await asyncio.sleep(0.05)  # the second one's time has come too
    assert consumer.most_in_flight == 1
    consumer.hold.set()
    await c.flush()
    assert consumer.commits == [{P0: 2}, {P0: 3}]


async def test_revoked_partitions_are_committed_at_once_and_only_they() -> None:
    consumer = FakeConsumer()
    c = committer(consumer, 60_000)
    await c.done(records(P0, 1) + records(P1, 2) + records(P2, 3))
    await c.on_partitions_revoked({P1})
    assert consumer.commits == [{P1: 3}]
    await c.flush()
    assert consumer.commits == [{P1: 3}, {P0: 2, P2: 4}]


async def test_partitions_no_longer_held_are_not_asked_for() -> None:
    consumer = FakeConsumer()
    c = committer(consumer, 60_000)
    await c.done(records(P0, 1) + records(P1, 2))
    consumer.assigned = {P0}
    await c.flush()
    assert consumer.commits == [{P0: 2}]


async def test_a_commit_the_group_refuses_is_dropped() -> None:
    # The partitions went to another member, which reads those records again (its inbox
    # ignores them): sending the old offsets again would be refused again.
    consumer = FakeConsumer(fail_with=[CommitFailedError("rebalanced")])
    c = committer(consumer, 60_000)
    await c.done(records(P0, 1))
    await c.flush()
    await c.flush()
    assert consumer.commits == []
    await c.done(records(P0, 2))
    await c.flush()
    assert consumer.commits == [{P0: 3}]


async def test_a_failed_commit_keeps_its_offsets_for_the_next_one() -> None:
    consumer = FakeConsumer(fail_with=[KafkaConnectionError("broker gone")])
    c = committer(consumer, 20)
    await c.done(records(P0, 1) + records(P1, 1))
    await asyncio.sleep(0.1)
    assert consumer.commits == []
    await c.done(records(P0, 2))
    await asyncio.sleep(0.7)  # retried on its own, after at least 0.5 s
    assert consumer.commits == [{P0: 3, P1: 2}]


async def test_flush_commits_now_and_cancels_the_wait() -> None:
    consumer = FakeConsumer()
    c = committer(consumer, 60_000)
    await c.done(records(P2, 41))
    await c.flush()
    assert consumer.commits == [{P2: 42}]
    await c.flush()
    assert consumer.commits == [{P2: 42}]


async def test_a_new_consumer_starts_with_nothing_to_commit() -> None:
    old, new = FakeConsumer(), FakeConsumer()
    c = committer(old, 60_000)
    await c.done(records(P0, 1))
    c.attach(new)  # a restarted subscriber: the old one's offsets were its own to commit
    await c.flush()
    assert old.commits == [] and new.commits == []


async def test_a_lower_offset_handled_within_the_interval_does_not_pull_the_commit_back() -> None:
    consumer = FakeConsumer()
    c = committer(consumer, 60_000)
    await c.done(records(P0, 10))
    await c.done(records(P0, 4))  # read again: handled before, ignored by the inbox
    await c.flush()
    assert consumer.commits == [{P0: 11}]
