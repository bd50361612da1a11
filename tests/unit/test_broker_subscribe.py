"""How ``runtime.broker.subscribe`` configures a batch subscriber's poll."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import TopicPartition
from faststream.kafka import KafkaBroker

from services.runtime import metrics
from services.runtime.broker import IDLE_POLL_MS, make_broker, subscribe
from services.runtime.gaps import OffsetGapGuard
from services.runtime.messaging import RawMessage
from services.runtime.settings import Settings


async def _ignore(batch: Sequence[RawMessage]) -> None:
    return None


def _subscribed(
    process: Callable[[Sequence[RawMessage]], Awaitable[None]] = _ignore,
    fetch_max_wait_ms: int = 10,
) -> KafkaBroker:
    """A broker with one subscriber of ``bianzhi.tests.v1`` made by ``subscribe``."""
    settings = Settings()
    broker = make_broker(settings, client_id="test")
    subscribe(
        broker,
        "bianzhi.tests.v1",
        group_id="g",
        process=process,
        settings=settings,
        fetch_max_wait_ms=fetch_max_wait_ms,
        max_records=7,
    )
    return broker


def _poll_of(fetch_max_wait_ms: int) -> dict[str, Any]:
    (subscriber,) = _subscribed(fetch_max_wait_ms=fetch_max_wait_ms).subscribers
    return {"timeout_ms": subscriber.batch_timeout_ms, "max_records": subscriber.max_records}


@pytest.mark.parametrize("fetch_max_wait_ms", [0, 10, 100])
def test_a_short_fetch_wait_does_not_make_a_short_poll(fetch_max_wait_ms: int) -> None:
    # FastStream sleeps for the poll's timeout after a poll that found nothing; a record that
    # arrives meanwhile waits for the sleep. A poll returns as soon as a fetch brought records,
    # so waiting long in it costs no latency.
    assert _poll_of(fetch_max_wait_ms) == {"timeout_ms": IDLE_POLL_MS, "max_records": 7}


def test_a_fetch_wait_longer_than_the_idle_poll_is_kept() -> None:
    assert _poll_of(5_000)["timeout_ms"] == 5_000


@dataclass(frozen=True)
class _Record:
    topic: str
    partition: int
    offset: int


def _records(partition: int, *offsets: int) -> list[_Record]:
    return [_Record("t", partition, o) for o in offsets]


class _Consumer:
    """Answers polls from a script: each poll takes the next answer (records per partition),
    and remembers where it was told to seek."""

    def __init__(self, answers: list[dict[TopicPartition, list[_Record]]]) -> None:
        self.answers = answers
        self.polls: list[dict[str, int]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []

    async def getmany(
        self, *, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[_Record]]:
        self.polls.append({"timeout_ms": timeout_ms, "max_records": max_records})
        return self.answers.pop(0)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


P0, P1 = TopicPartition("t", 0), TopicPartition("t", 1)


def _offsets(records: Sequence[_Record]) -> list[tuple[int, int]]:
    return [(r.partition, r.offset) for r in records]


async def test_an_empty_poll_is_not_followed_by_a_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    # FastStream's own batch poll sleeps for its whole timeout after an empty poll; a record
    # arriving then would wait up to IDLE_POLL_MS. The subscriber polls again at once instead.
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    import anyio

    monkeypatch.setattr(anyio, "sleep", sleep)
    (subscriber,) = _subscribed().subscribers
    consumer = _Consumer([{}, {P0: _records(0, 0, 1), P1: _records(1, 5)}])
    assert await subscriber.get_msg(consumer) == ()
    assert _offsets(await subscriber.get_msg(consumer)) == [(0, 0), (0, 1), (1, 5)]
    assert slept == []
    assert consumer.polls == [{"timeout_ms": IDLE_POLL_MS, "max_records": 7}] * 2


async def test_a_fetch_reaches_the_consumer_without_a_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # FastStream resolves a handler's ``message`` parameter with a plain function, which
    # fast_depends runs in a worker thread: a thread hop per fetch on the hot path. The
    # handler takes the fetch's records as its body instead.
    import anyio.to_thread
    from faststream.kafka import TestKafkaBroker

    hops: list[Any] = []
    real_run_sync = anyio.to_thread.run_sync

    async def run_sync(func: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(func)
        return await real_run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", run_sync)
    got: list[RawMessage] = []

    async def process(batch: Sequence[RawMessage]) -> None:
        got.extend(batch)

    async with TestKafkaBroker(_subscribed(process)) as br:
        await br.publish(b"not even json", topic="bianzhi.tests.v1", key=b"k", headers={"h": "v"})
    assert [(r.value, r.key, r.topic) for r in got] == [
        (b"not even json", b"k", "bianzhi.tests.v1")
    ]
    assert ("h", b"v") in got[0].headers
    assert hops == []


# --- holes in a partition's offsets (the embedded broker's out-of-order answers) ------------


def _holes(outcome: str) -> float:
    return metrics.FETCH_HOLES.labels(outcome)._value.get()


async def test_a_record_past_a_hole_waits_for_the_missing_one() -> None:
    # The embedded broker sometimes answers a fetch with offset 3 while 2, written by another
    # producer and acknowledged, is not readable yet. Taking 3 would lose 2 for good: the
    # consumer seeks back to 2 and hands on 3 only after it.
    (subscriber,) = _subscribed().subscribers
    consumer = _Consumer(
        [
            {P0: _records(0, 0, 1), P1: _records(1, 7)},
            {P0: _records(0, 3, 4), P1: _records(1, 8)},
            {P0: _records(0, 2, 3, 4)},
        ]
    )
    read_again = _holes("read_again")
    assert _offsets(await subscriber.get_msg(consumer)) == [(0, 0), (0, 1), (1, 7)]
    assert _offsets(await subscriber.get_msg(consumer)) == [(1, 8)]
    assert consumer.seeks == [(P0, 2)]
    assert _offsets(await subscriber.get_msg(consumer)) == [(0, 2), (0, 3), (0, 4)]
    assert consumer.seeks == [(P0, 2)]
    assert _holes("read_again") == read_again + 1


def test_a_hole_inside_one_fetch_keeps_what_comes_before_it() -> None:
    guard = OffsetGapGuard()
    consumer = _Consumer([])
    assert _offsets(guard.take(consumer, {P0: _records(0, 10, 11)})) == [(0, 10), (0, 11)]
    assert _offsets(guard.take(consumer, {P0: _records(0, 12, 14, 15)})) == [(0, 12)]
    assert consumer.seeks == [(P0, 13)]
    assert _offsets(guard.take(consumer, {P0: _records(0, 13, 14)})) == [(0, 13), (0, 14)]


def test_the_first_records_of_a_partition_and_records_read_again_pass() -> None:
    # Nothing is expected of a partition before its first records; after a rebalance it may
    # start below what this process handled (the inbox ignores the repeats).
    guard = OffsetGapGuard()
    consumer = _Consumer([])
    assert _offsets(guard.take(consumer, {P0: _records(0, 40, 41)})) == [(0, 40), (0, 41)]
    assert _offsets(guard.take(consumer, {P0: _records(0, 30, 31)})) == [(0, 30), (0, 31)]
    assert _offsets(guard.take(consumer, {P0: _records(0, 32)})) == [(0, 32)]
    assert consumer.seeks == []


def test_a_hole_that_never_fills_is_passed_after_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("services.runtime.gaps.time.monotonic", lambda: clock[0])
    guard = OffsetGapGuard(give_up_s=5.0)
    consumer = _Consumer([])
    passed = _holes("passed")
    assert _offsets(guard.take(consumer, {P0: _records(0, 0)})) == [(0, 0)]
    assert guard.take(consumer, {P0: _records(0, 2)}) == []
    clock[0] += 4.9
    assert guard.take(consumer, {P0: _records(0, 2)}) == []
    assert consumer.seeks == [(P0, 1), (P0, 1)]
    clock[0] += 0.2
    assert _offsets(guard.take(consumer, {P0: _records(0, 2, 3)})) == [(0, 2), (0, 3)]
    assert _holes("passed") == passed + 1
    # A later hole is waited for afresh.
    assert guard.take(consumer, {P0: _records(0, 5)}) == []
    assert consumer.seeks[-1] == (P0, 4)


def test_in_order_keeps_the_fetch_by_partition() -> None:
    # The command-line readers (results of `bianzhi send` and of an import, `bianzhi tail`)
    # take a fetch by partition, as getmany gives it.
    guard = OffsetGapGuard()
    consumer = _Consumer([])
    first = guard.in_order(consumer, {P0: _records(0, 0, 1), P1: _records(1, 3)})
    assert {tp: _offsets(r) for tp, r in first.items()} == {P0: [(0, 0), (0, 1)], P1: [(1, 3)]}
    held = guard.in_order(consumer, {P0: _records(0, 3), P1: _records(1, 4)})
    assert {tp: _offsets(r) for tp, r in held.items()} == {P1: [(1, 4)]}
    assert consumer.seeks == [(P0, 2)]
