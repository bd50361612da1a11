"""The batch engine of `bianzhi import` and `bianzhi demo` (`services.cli.batch.exchange`) against
an in-memory broker: every command gets one outcome, in-flight is bounded, `not_found` is retried
under deterministic ids, and a service that never answers ends the batch instead of hanging."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

from contracts.envelope import Envelope, new_id, now
from contracts.results import CommandCompleted, CommandRejected
from services.cli import batch
from services.cli.batch import (
    BatchReport,
    Outcome,
    Outgoing,
    RetryPolicy,
    Status,
    command_id,
    exchange,
    retry_id,
)

TOPIC = "bianzhi.roster.commands.v1"
Answer = Callable[[Envelope, int], dict[str, Any] | None]


@dataclass
class Record:
    value: bytes
    offset: int = 0


class FakeBroker:
    """Producer and consumer in one: each sent command is answered by ``answer(envelope, n)``
    (n counts the sends of that id) on the next fetch, or never when it returns None."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.sent: list[Envelope] = []
        self.unanswered: list[Envelope] = []
        self.outstanding = 0
        self.max_outstanding = 0
        self.sends_of: dict[str, int] = {}
        self.next_offset = 0  # the results come on one partition, numbered as a broker would

    async def send(self, topic: str, value: bytes, **_: Any) -> asyncio.Future[None]:
        assert topic == TOPIC
        env = Envelope.from_bytes(value)
        self.sent.append(env)
        self.unanswered.append(env)
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def getmany(self, timeout_ms: int = 0) -> dict[str, list[Record]]:
        records = [Record(b"not json"), Record(json.dumps(result("someone-else", "c")).encode())]
        still: list[Envelope] = []
        for env in self.unanswered:
            self.sends_of[env.id] = self.sends_of.get(env.id, 0) + 1
            data = self.answer(env, self.sends_of[env.id])
            if data is None:
                still.append(env)
                continue
            self.outstanding -= 1
            records.append(Record(json.dumps(data).encode()))
        self.unanswered = still
        if len(records) == 2:
            await asyncio.sleep(timeout_ms / 1000)
        for record in records:
            record.offset, self.next_offset = self.next_offset, self.next_offset + 1
        return {"results": records}


def result(cid: str, outcome: str, code: str = "", subject: str = "") -> dict[str, Any]:
    if outcome == "c":
        return {
            "type": CommandCompleted.TYPE,
            "data": {"command_id": cid, "command_type": "x", "subject": subject, "events": []},
        }
    return {
        "type": CommandRejected.TYPE,
        "data": {"command_id": cid, "command_type": "x", "code": code, "message": f"no: {code}"},
    }


def commands(n: int, *, prefix: str = "c") -> list[Outgoing]:
    out = []
    for i in range(n):
        env = Envelope(
            id=command_id(prefix, str(i)),
            source="/tests",
            type="bianzhi.roster.EnrolPerson.v1",
            time=now(),
            subject=f"subject-{i}",
            data={"i": i},
        )
        out.append(Outgoing(env, TOPIC))
    return out


async def run(broker: FakeBroker, items: list[Outgoing], **options: Any) -> BatchReport:
    stream = io.StringIO()
    options.setdefault("stall_timeout_s", 5.0)
    report = await exchange(items, broker, broker, label="t", stream=stream, **options)  # type: ignore[arg-type]
    assert stream.getvalue().splitlines()[-1].startswith("bianzhi: t [")
    return report


async def test_every_command_gets_one_outcome_in_order_and_in_flight_is_bounded() -> None:
    items = commands(50)

    def answer(env: Envelope, _: int) -> dict[str, Any]:
        i = env.data["i"]
        if i % 5 == 0:
            return result(env.id, "r", "no_vacancy" if i % 10 else "notice_exhausted")
        return result(env.id, "c", subject=f"person-{i}")

    broker = FakeBroker(answer)
    report = await run(broker, [*items, items[3]], max_in_flight=7)  # a duplicate id: sent once
    assert len(broker.sent) == 50
    assert broker.max_outstanding == 7
    assert list(report.outcomes) == [c.envelope.id for c in items]
    assert report.count(Status.COMPLETED) == 40
    assert report.rejected_by_code == {"no_vacancy": 5, "notice_exhausted": 5}
    assert report.complete and report.sent == 50
    assert report.outcomes[items[1].envelope.id].subject == "person-1"
    rejected = report.outcomes[items[5].envelope.id]
    assert (rejected.status, rejected.code, rejected.message) == (
        Status.REJECTED,
        "no_vacancy",
        "no: no_vacancy",
    )
    assert "completed 40, rejected 10 (no_vacancy 5, notice_exhausted 5)" in report.summary()


async def test_not_found_is_retried_under_deterministic_new_ids_until_it_completes() -> None:
    items = commands(4)
    first_ids = {c.envelope.id for c in items}

    def answer(env: Envelope, _: int) -> dict[str, Any]:
        # The projection catches up after two refusals of the same original command.
        if env.id in first_ids or env.id in {retry_id(i, 1) for i in first_ids}:
            return result(env.id, "r", "not_found")
        return result(env.id, "c")

    broker = FakeBroker(answer)
    retry = RetryPolicy(frozenset({"not_found"}), attempts=5, delay_s=0.01)
    report = await run(broker, items, retry=retry)
    assert report.count(Status.COMPLETED) == 4
    assert {o.attempts for o in report.outcomes.values()} == {3}
    assert {e.id for e in broker.sent} == first_ids | {
        retry_id(i, n) for i in first_ids for n in (1, 2)
    }
    assert all(e.correlationid == e.id for e in broker.sent if e.id not in first_ids)


async def test_retries_end_with_the_last_rejection() -> None:
    broker = FakeBroker(lambda env, _: result(env.id, "r", "not_found"))
    retry = RetryPolicy(frozenset({"not_found"}), attempts=2, delay_s=0.01)
    report = await run(broker, commands(3), retry=retry)
    assert report.rejected_by_code == {"not_found": 3}
    assert len(broker.sent) == 9


async def test_a_service_that_never_answers_ends_the_batch_with_what_is_missing() -> None:
    items = commands(30)

    def answer(env: Envelope, _: int) -> dict[str, Any] | None:
        return result(env.id, "c") if env.data["i"] < 4 else None

    broker = FakeBroker(answer)
    report = await run(broker, items, max_in_flight=10, stall_timeout_s=0.3)
    assert report.count(Status.COMPLETED) == 4
    assert report.count(Status.NO_RESULT) == 10  # the ones in flight when it gave up
    assert report.count(Status.NOT_SENT) == 16
    assert report.sent == 14 and not report.complete
    assert "without result 10, not sent 16" in report.summary()


async def test_the_ids_of_commands_and_retries_are_stable() -> None:
    assert command_id("a", "b") == command_id("a", "b") != command_id("a", "b", "")
    assert command_id("ab") != command_id("a", "b")
    original = new_id()
    assert retry_id(original, 1) == retry_id(original, 1) != retry_id(original, 2)


async def test_a_broker_failure_keeps_the_answers_and_reports_the_rest() -> None:
    class FailingBroker(FakeBroker):
        async def send(self, topic: str, value: bytes, **extra: Any) -> asyncio.Future[None]:
            if len(self.sent) == 6:
                raise KafkaConnectionError("connection closed")
            return await super().send(topic, value, **extra)

    broker = FailingBroker(lambda env, _: result(env.id, "c"))
    report = await run(broker, commands(20), max_in_flight=3)
    assert report.count(Status.COMPLETED) == 6
    assert report.count(Status.NO_RESULT) == 1  # the failed send: maybe written, maybe not
    assert report.count(Status.NOT_SENT) == 13
    assert report.error is not None and "KafkaConnectionError" in report.error
    assert "stopped: the broker failed" in report.summary()


async def test_waves_go_one_after_the_other_and_stop_where_the_broker_went_away(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[list[str]] = []

    async def send_batch(wave: list[Outgoing], settings: object, **_: object) -> BatchReport:
        ids = [o.envelope.id for o in wave]
        sent.append(ids)
        outcomes = {i: Outcome(i, Status.COMPLETED) for i in ids}
        return BatchReport(
            "import", outcomes, 1.5, "the broker went away" if len(sent) == 2 else None
        )

    monkeypatch.setattr(batch, "send_batch", send_batch)
    items = commands(4)
    waves = [[item] for item in items[:3]] + [[], [items[3]]]
    report = await batch.send_in_waves(waves, object(), label="import")  # type: ignore[arg-type]
    ids = [item.envelope.id for item in items]
    assert sent == [[ids[0]], [ids[1]]]  # the third and later waves were not sent
    assert [o.status for o in report.outcomes.values()] == [
        Status.COMPLETED,
        Status.COMPLETED,
        Status.NOT_SENT,
        Status.NOT_SENT,
    ]
    assert list(report.outcomes) == ids
    assert (report.elapsed_s, report.error) == (3.0, "the broker went away")
