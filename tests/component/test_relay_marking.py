"""The outbox relay's marks and hand-over, and the SQLite connection under every unit of work.

On SQLite the relay marks published rows lazily (at most once per ``mark_interval_s``, sooner when
many rows wait, always before ``stop()`` returns); on PostgreSQL it marks in the transaction that
holds its advisory lock. Either way: every row is published once per pass in seq order, and every
published row ends up marked. On SQLite, rows a unit of work hands over are published without
reading them back, and a pass goes out before the previous one is acknowledged. The SQLite
connection takes one trip to its thread per statement; its transactions must behave exactly as
the driver's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from contracts.envelope import Envelope, new_id, now
from contracts.topics import ORGS_EVENTS
from services.orgs.adapters.orm import messaging
from services.runtime.app import ServiceRuntime
from services.runtime.relay import OutboxRecord, OutboxRelay, PublishBatch
from services.runtime.uow import UnitOfWork
from tests.component.conftest import orgs_runtime


def _envelope(n: int) -> Envelope:
    return Envelope(
        id=new_id(), source="/tests", type="bianzhi.tests.Probe.v1", time=now(), data={"n": n}
    )


async def _write_rows(runtime: ServiceRuntime, count: int, key: str = "k") -> list[str]:
    envelopes = [_envelope(n) for n in range(count)]
    async with runtime.uow() as uow:
        for env in envelopes:
            uow.stage(env, ORGS_EVENTS, key)
        await uow.commit()
    return [e.id for e in envelopes]


async def _unmarked(runtime: ServiceRuntime) -> int:
    o = messaging.outbox.c
    async with runtime.read_sessions() as session:
        return int(
            (
                await session.execute(select(func.count()).where(o.published_at.is_(None)))
            ).scalar_one()
        )


def _relay(
    runtime: ServiceRuntime,
    sent: list[OutboxRecord],
    publish: PublishBatch | None = None,
    **kwargs: Any,
) -> OutboxRelay:
    async def record(records: Sequence[OutboxRecord]) -> None:
        sent.extend(records)

    options: dict[str, Any] = {"poll_interval_s": 0.05, **kwargs}
    return OutboxRelay(
        service="orgs",
        engine=runtime.engine,
        sessions=runtime.sessions,
        tables=messaging,
        publish=publish or record,
        write_lock=runtime.write_lock,
        read_sessions=runtime.read_sessions,
        **options,
    )


async def _write_handed_over(
    runtime: ServiceRuntime, relay: OutboxRelay, count: int, key: str = "k"
) -> list[str]:
    """Rows committed by a unit of work wired to ``relay`` as a service's are."""
    envelopes = [_envelope(n) for n in range(count)]
    uow = UnitOfWork(
        runtime.sessions,
        messaging,
        on_commit=relay.wake,
        hand_over=relay.hand_over if relay.takes_hand_over else None,
        write_lock=runtime.write_lock,
    )
    async with uow:
        for env in envelopes:
            uow.stage(env, ORGS_EVENTS, key)
        await uow.commit()
    return [e.id for e in envelopes]


@pytest.fixture
async def sqlite_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    async with orgs_runtime(
        f"sqlite+aiosqlite:///{tmp_path / 'orgs.db'}", tmp_path, monkeypatch
    ) as rt:
        yield rt


async def _until(check: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


async def test_published_rows_are_marked_and_stop_marks_the_rest(
    runtime: ServiceRuntime,
) -> None:
    sent: list[OutboxRecord] = []
    # An interval far longer than the test: only stop() can write the last marks.
    relay = _relay(runtime, sent, mark_interval_s=3600)
    ids = await _write_rows(runtime, 5)
    relay.start()
    try:
        await _until(lambda: _count_sent(sent, 5))
        # Published, not yet marked (SQLite), or marked with the pass (PostgreSQL); either
        # way nothing waits to be published any more.
        assert await relay.backlog() == 0
        more = await _write_rows(runtime, 3)
        relay.wake()
        await _until(lambda: _count_sent(sent, 8))
    finally:
        await relay.stop()
    assert [Envelope.from_bytes(r.value).id for r in sent] == ids + more  # once each, in order
    assert [r.seq for r in sent] == sorted(r.seq for r in sent)
    assert await _unmarked(runtime) == 0


async def test_many_waiting_rows_are_marked_without_waiting_for_the_interval(
    runtime: ServiceRuntime,
) -> None:
    sent: list[OutboxRecord] = []
    relay = _relay(runtime, sent, mark_interval_s=3600, mark_batch=10)
    await _write_rows(runtime, 25)
    relay.start()
    try:
        await _until(lambda: _count_sent(sent, 25))
        # 25 rows ≥ mark_batch: marked long before the hour is up, while the relay runs.
        await _until(lambda: _is_zero(_unmarked(runtime)))
    finally:
        await relay.stop()
    assert len(sent) == 25


async def test_a_failed_mark_publishes_the_rows_again_as_after_a_crash(
    runtime: ServiceRuntime,
) -> None:
    sent: list[OutboxRecord] = []
    relay = _relay(runtime, sent, mark_interval_s=0.05)
    failures: list[list[int]] = []
    real_mark = relay._mark

    async def mark(session: Any, seqs: list[int]) -> None:
        if not failures:
            failures.append(seqs)
            raise ConnectionResetError("database went away while marking")
        await real_mark(session, seqs)

    relay._mark = mark  # type: ignore[method-assign]
    ids = await _write_rows(runtime, 3)
    relay.start()
    try:
        await _until(lambda: _is_zero(_unmarked(runtime)))
    finally:
        await relay.stop()
    published = [Envelope.from_bytes(r.value).id for r in sent]
    # Each pass publishes the rows in order; the failed mark makes one more pass of them.
    assert len(failures) == 1
    assert published == ids + ids


async def test_transactions_commit_roll_back_and_return_rows(runtime: ServiceRuntime) -> None:
    inbox = messaging.inbox
    row = {"consumer": "c", "message_id": "m1", "message_type": "t", "received_at": now()}
    # A transaction that begins and ends without a statement, and a rolled-back one.
    async with runtime.sessions() as session, session.begin():
        pass
    async with runtime.sessions() as session, session.begin():
        await session.execute(insert(inbox).values(**row))
        await session.rollback()
    assert await _inbox_count(runtime) == 0
    # Many rows at once, RETURNING, and a unique key that aborts a statement, not the test.
    async with runtime.sessions() as session, session.begin():
        await session.execute(insert(inbox), [{**row, "message_id": f"m{n}"} for n in range(1, 6)])
        got = await session.execute(
            insert(inbox).values(**{**row, "message_id": "m9"}).returning(inbox.c.message_id)
        )
        assert got.scalars().all() == ["m9"]
    with pytest.raises(IntegrityError):
        async with runtime.sessions() as session, session.begin():
            await session.execute(insert(inbox).values(**{**row, "message_id": "m10"}))
            await session.execute(insert(inbox).values(**row))  # m1 again
    assert await _inbox_count(runtime) == 6  # m10 went with its transaction
    async with runtime.read_sessions() as session:
        rows = (await session.execute(text("SELECT message_id FROM inbox ORDER BY 1"))).all()
        first = (await session.execute(select(inbox.c.message_id).limit(1))).first()
    assert [r[0] for r in rows] == ["m1", "m2", "m3", "m4", "m5", "m9"]
    assert first is not None


async def _inbox_count(runtime: ServiceRuntime) -> int:
    async with runtime.read_sessions() as session:
        return int(
            (await session.execute(select(func.count()).select_from(messaging.inbox))).scalar_one()
        )


async def _count_sent(sent: list[OutboxRecord], expected: int) -> bool:
    return len(sent) >= expected


async def _is_zero(value: Any) -> bool:
    return await value == 0


async def test_purge_keeps_the_newest_row_so_numbering_goes_on(runtime: ServiceRuntime) -> None:
    sent: list[OutboxRecord] = []
    # Purged only when asked, so the running relay's own purge cannot race the one tested.
    relay = _relay(runtime, sent, retention=timedelta(hours=1), purge_interval_s=None)
    o = messaging.outbox.c
    relay.start()
    try:
        await _write_rows(runtime, 4)
        relay.wake()
        await _until(lambda: _count_sent(sent, 4))
        async with runtime.sessions() as session, session.begin():  # published long ago
            await session.execute(
                update(messaging.outbox).values(published_at=now() - timedelta(days=30))
            )
        assert await relay.purge() == 3  # all beyond retention; the newest stays
        async with runtime.read_sessions() as session:
            kept = (await session.execute(select(o.seq))).scalars().all()
        # A row written after the purge is numbered after every row ever written, so the
        # running relay, which looks past what it has published, finds it.
        fresh = await _write_rows(runtime, 1)
        relay.wake()
        await _until(lambda: _count_sent(sent, 5))
    finally:
        await relay.stop()
    assert kept == [sent[3].seq]
    assert Envelope.from_bytes(sent[4].value).id == fresh[0]
    assert sent[4].seq > sent[3].seq


async def test_rows_handed_over_are_published_without_reading_them_back(
    runtime: ServiceRuntime,
) -> None:
    sent: list[OutboxRecord] = []
    relay = _relay(runtime, sent, mark_interval_s=0.01)
    reads = 0
    real_reads = runtime.read_sessions

    def counted() -> Any:
        nonlocal reads
        reads += 1
        return real_reads()

    relay.read_sessions = counted  # type: ignore[assignment]
    # Passes run one at a time here, each right after its commit.
    assert await relay.publish_once() == 0  # nothing handed over yet: the table is read
    ids = await _write_handed_over(runtime, relay, 5)
    assert await relay.publish_once() == 5
    more = await _write_handed_over(runtime, relay, 3)
    assert await relay.publish_once() == 3
    await _until(lambda: _is_zero(_unmarked(runtime)))
    assert [Envelope.from_bytes(r.value).id for r in sent] == ids + more
    assert [r.seq for r in sent] == sorted(r.seq for r in sent)
    # SQLite: only the first pass read the table. PostgreSQL takes no hand-over: its relay
    # reads under its advisory lock, not through read sessions.
    assert relay.takes_hand_over == (runtime.write_lock is not None)
    assert reads == (1 if relay.takes_hand_over else 0)


async def test_rows_the_relay_was_not_handed_are_read_and_published_in_order(
    runtime: ServiceRuntime,
) -> None:
    sent: list[OutboxRecord] = []
    relay = _relay(runtime, sent, poll_interval_s=3600)
    relay.start()
    try:
        # Committed by a unit of work wired to another relay (another writer, a CLI): a gap
        # before the rows handed over next, so the relay reads the table.
        first = await _write_rows(runtime, 3)
        then = await _write_handed_over(runtime, relay, 2)
        await _until(lambda: _count_sent(sent, 5))
    finally:
        await relay.stop()
    assert [Envelope.from_bytes(r.value).id for r in sent] == first + then
    assert await _unmarked(runtime) == 0


async def test_a_pass_goes_out_before_the_last_is_acknowledged_and_a_failed_one_goes_again(
    sqlite_runtime: ServiceRuntime,
) -> None:
    runtime = sqlite_runtime
    passes: list[list[str]] = []
    acks: list[asyncio.Future[None]] = []

    async def publish(records: Sequence[OutboxRecord]) -> Awaitable[None]:
        passes.append([Envelope.from_bytes(r.value).id for r in records])
        acks.append(asyncio.get_running_loop().create_future())
        return acks[-1]

    relay = _relay(runtime, [], publish, poll_interval_s=3600, mark_interval_s=0.01)
    relay.start()
    try:
        first = await _write_handed_over(runtime, relay, 3)
        await _until(lambda: _is_true(len(passes) == 1))
        second = await _write_handed_over(runtime, relay, 2)
        # Sent while the first pass still waits for the broker.
        await _until(lambda: _is_true(len(passes) == 2))
        assert not acks[0].done()
        assert passes == [first, second]
        assert await _unmarked(runtime) == 5  # nothing acknowledged, nothing marked
        acks[0].set_exception(ConnectionResetError("broker went away"))
        acks[1].set_result(None)
        # The failed pass goes again from its first row (the second with it, as after a crash).
        await _until(lambda: _is_true(len(passes) == 3))
        assert passes[2] == first + second
        acks[2].set_result(None)
        await _until(lambda: _is_zero(_unmarked(runtime)))
    finally:
        await relay.stop()
    assert len(passes) == 3


async def _is_true(value: bool) -> bool:
    return value
