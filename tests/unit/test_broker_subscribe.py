"""How ``runtime.broker.subscribe`` configures a batch subscriber's poll."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from faststream.kafka import KafkaBroker

from services.runtime.broker import IDLE_POLL_MS, make_broker, subscribe
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


class _Consumer:
    """Answers polls from a script: each poll takes the next answer (records per partition)."""

    def __init__(self, answers: list[dict[str, list[str]]]) -> None:
        self.answers = answers
        self.polls: list[dict[str, int]] = []

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[str, list[str]]:
        self.polls.append({"timeout_ms": timeout_ms, "max_records": max_records})
        return self.answers.pop(0)


async def test_an_empty_poll_is_not_followed_by_a_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    # FastStream's own batch poll sleeps for its whole timeout after an empty poll; a record
    # arriving then would wait up to IDLE_POLL_MS. The subscriber polls again at once instead.
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    import anyio

    monkeypatch.setattr(anyio, "sleep", sleep)
    (subscriber,) = _subscribed().subscribers
    consumer = _Consumer([{}, {"p0": ["a", "b"], "p1": ["c"]}])
    assert await subscriber.get_msg(consumer) == ()
    assert await subscriber.get_msg(consumer) == ("a", "b", "c")
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
