"""Send many commands and collect their results: the engine of `bianzhi import` and `bianzhi demo`.

Commands go out with a bounded number in flight; results are read from the command-results topic
(listening starts before the first command is sent, so a fast result cannot slip past). When no
result at all arrives for ``stall_timeout_s`` while commands are waiting, the batch stops: the
waiting commands are reported as without result and the rest as not sent. It never hangs on a
service that is not running.

Command ids should be deterministic (`command_id`): a re-sent id has no second effect on the
service and gets its stored result again, so re-running a batch is harmless.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from contracts.envelope import CONTENT_TYPE, Envelope
from contracts.results import CommandCompleted, CommandRejected
from contracts.topics import COMMAND_RESULTS
from services.cli.common import (
    command_signer,
    kafka_errors,
    make_consumer,
    make_producer,
    topic_partitions,
)
from services.runtime.gaps import OffsetGapGuard
from services.runtime.settings import Settings

log = logging.getLogger("bianzhi.cli.batch")

NAMESPACE = uuid.UUID("6c0b2f4e-3f55-5d8e-9a43-2f0d6c1b7a10")
"""The uuid5 namespace of every command id the batch commands derive."""

DEFAULT_IN_FLIGHT = 200
DEFAULT_STALL_TIMEOUT_S = 30.0


def command_id(*parts: str) -> str:
    """A deterministic command id (UUID 5) from the parts that make a command what it is."""
    return str(uuid.uuid5(NAMESPACE, "\x1f".join(parts)))


def retry_id(original: str, attempt: int) -> str:
    """The id of retry ``attempt`` (1, 2, …) of a command: new, but the same on every run."""
    return command_id(original, "retry", str(attempt))


class Status(StrEnum):
    COMPLETED = "completed"
    REJECTED = "rejected"
    NO_RESULT = "no_result"  # sent, but no result came in time
    NOT_SENT = "not_sent"  # the batch stopped before sending it


@dataclass(frozen=True)
class Outgoing:
    """One command to send: its envelope and its topic."""

    envelope: Envelope
    topic: str


@dataclass(frozen=True)
class Outcome:
    """What became of one command (keyed by its original id, whatever retries it took)."""

    command_id: str
    status: Status
    code: str | None = None
    message: str | None = None
    subject: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0


@dataclass(frozen=True)
class RetryPolicy:
    """Re-send a command rejected with one of ``codes`` (under a new id, `retry_id`) after
    ``delay_s``, at most ``attempts`` times. Meant for ``not_found`` while a service's projection
    of another service's events catches up."""

    codes: frozenset[str]
    attempts: int = 20
    delay_s: float = 0.5


@dataclass
class BatchReport:
    """Every command's outcome, in the order given, and how long the batch took."""

    label: str
    outcomes: dict[str, Outcome]
    elapsed_s: float
    error: str | None = None  # why the batch stopped early (the broker went away), if it did

    def count(self, status: Status) -> int:
        return sum(1 for o in self.outcomes.values() if o.status is status)

    @property
    def sent(self) -> int:
        return len(self.outcomes) - self.count(Status.NOT_SENT)

    @property
    def rejected_by_code(self) -> Counter[str]:
        return Counter(o.code or "?" for o in self.outcomes.values() if o.status is Status.REJECTED)

    @property
    def complete(self) -> bool:
        """Every command got a result (completed or rejected)."""
        return self.count(Status.NO_RESULT) == 0 and self.count(Status.NOT_SENT) == 0

    def summary(self) -> str:
        rejected = self.count(Status.REJECTED)
        codes = ", ".join(f"{code} {n}" for code, n in sorted(self.rejected_by_code.items()))
        parts = [
            f"{self.label}: {len(self.outcomes)} commands",
            f"sent {self.sent}",
            f"completed {self.count(Status.COMPLETED)}",
            f"rejected {rejected}" + (f" ({codes})" if codes else ""),
        ]
        if missing := self.count(Status.NO_RESULT):
            parts.append(f"without result {missing}")
        if unsent := self.count(Status.NOT_SENT):
            parts.append(f"not sent {unsent}")
        stopped = f"; stopped: {self.error}" if self.error else ""
        return ", ".join(parts) + f" in {self.elapsed_s:.1f} s{stopped}"


class Progress:
    """A progress line on stderr: rewritten in place on a terminal, a line every few seconds
    otherwise (logs and pipes stay readable)."""

    def __init__(
        self, label: str, total: int, stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.last = 0.0
        self.interval_s = 0.2 if self.tty else 5.0

    def update(self, *, done: int, completed: int, rejected: int, in_flight: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < self.interval_s:
            return
        self.last = now
        self._write(self._line(done, completed, rejected, in_flight, now), final=False)

    def finish(self, *, done: int, completed: int, rejected: int) -> None:
        if self.enabled:
            line = self._line(done, completed, rejected, 0, time.monotonic())
            self._write(line, final=True)

    def _line(self, done: int, completed: int, rejected: int, in_flight: int, now: float) -> str:
        elapsed = max(now - self.started, 1e-6)
        width = 24
        filled = width * done // self.total if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        return (
            f"bianzhi: {self.label} [{bar}] {done}/{self.total} completed {completed} "
            f"rejected {rejected} in flight {in_flight} ({done / elapsed:.0f}/s)"
        )

    def _write(self, line: str, *, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


@dataclass
class _Pending:
    original: Outgoing
    attempt: int  # 0 for the original id, n for retry n


def _with_id(original: Envelope, new_id: str) -> Envelope:
    return original.model_copy(update={"id": new_id, "correlationid": new_id})


class _Batch:
    """The state of one batch run; `run` is the loop."""

    def __init__(
        self,
        commands: Sequence[Outgoing],
        *,
        label: str,
        max_in_flight: int,
        stall_timeout_s: float,
        retry: RetryPolicy | None,
        progress: Progress,
        signer: Callable[[Envelope], Envelope] | None = None,
    ) -> None:
        # Each id sent (a retry has its own) is signed when it is sent.
        self.signer = signer
        unique = {c.envelope.id: c for c in commands}
        self.order = list(unique)
        self.queue: deque[_Pending] = deque(_Pending(c, 0) for c in unique.values())
        self.label = label
        self.max_in_flight = max_in_flight
        self.stall_timeout_s = stall_timeout_s
        self.retry = retry
        self.progress = progress
        self.waiting: dict[str, _Pending] = {}  # by the id sent
        self.delayed: list[tuple[float, _Pending]] = []
        self.outcomes: dict[str, Outcome] = {}
        self.completed = 0
        self.rejected = 0
        self.error: str | None = None

    async def run(self, producer: AIOKafkaProducer, consumer: AIOKafkaConsumer) -> None:
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        # A result handed out past an earlier one of its partition is read again in order
        # (the embedded broker's out-of-order answers, docs/BROKER.md).
        guard = OffsetGapGuard()
        while self.queue or self.waiting or self.delayed:
            now = loop.time()
            self._release_due(now)
            if not self.waiting:
                last_progress = now  # nothing outstanding: the stall clock starts at the send
            try:
                await self._send_more(producer)
                if not self.waiting:
                    if self.delayed:
                        await asyncio.sleep(max(0.0, min(d for d, _ in self.delayed) - now))
                    continue
                batches = guard.in_order(consumer, await consumer.getmany(timeout_ms=100))
            except KafkaError as exc:
                # What was answered stays answered; the rest is reported, not lost.
                self.error = f"the broker failed: {type(exc).__name__}: {exc}"
                self._give_up(f"{self.error} / 与消息服务器的连接中断")
                break
            for records in batches.values():
                for record in records:
                    if self._take(record.value, loop.time()):
                        last_progress = loop.time()
            self.progress.update(
                done=len(self.outcomes),
                completed=self.completed,
                rejected=self.rejected,
                in_flight=len(self.waiting),
            )
            if self.waiting and loop.time() - last_progress > self.stall_timeout_s:
                self._give_up(f"no result within {self.stall_timeout_s:g} s / 未收到处理结果")
        self.progress.finish(
            done=len(self.outcomes), completed=self.completed, rejected=self.rejected
        )

    def _release_due(self, now: float) -> None:
        due = [item for item in self.delayed if item[0] <= now]
        if due:
            self.delayed = [item for item in self.delayed if item[0] > now]
            self.queue.extendleft(pending for _, pending in reversed(due))

    async def _send_more(self, producer: AIOKafkaProducer) -> None:
        futures = []
        while self.queue and len(self.waiting) < self.max_in_flight:
            pending = self.queue.popleft()
            original = pending.original.envelope
            env = (
                original
                if pending.attempt == 0
                else _with_id(original, retry_id(original.id, pending.attempt))
            )
            if self.signer is not None:
                env = self.signer(env)
            self.waiting[env.id] = pending
            futures.append(
                await producer.send(
                    pending.original.topic,
                    env.to_bytes(),
                    key=(env.subject or env.id).encode(),
                    headers=[("content-type", CONTENT_TYPE.encode())],
                )
            )
        if futures:
            await asyncio.gather(*futures)

    def _take(self, raw: bytes | None, now: float) -> bool:
        """Handle one result record; true when it answered one of our commands."""
        try:
            value = json.loads(raw or b"")
        except ValueError:
            return False
        data = value.get("data") if isinstance(value, dict) else None
        if not isinstance(data, dict):
            return False
        pending = self.waiting.pop(str(data.get("command_id")), None)
        if pending is None:
            return False
        original_id = pending.original.envelope.id
        attempts = pending.attempt + 1
        if value.get("type") == CommandCompleted.TYPE:
            subject = data.get("subject")
            self._settle(
                Outcome(
                    original_id,
                    Status.COMPLETED,
                    subject=None if subject is None else str(subject),
                    attempts=attempts,
                )
            )
            return True
        code = str(data.get("code") or "unknown_result")
        if (
            self.retry is not None
            and value.get("type") == CommandRejected.TYPE
            and code in self.retry.codes
            and pending.attempt < self.retry.attempts
        ):
            self.delayed.append((now + self.retry.delay_s, _Pending(pending.original, attempts)))
            return True
        details = data.get("details")
        self._settle(
            Outcome(
                original_id,
                Status.REJECTED,
                code=code,
                message=str(data.get("message") or value.get("type") or ""),
                details=details if isinstance(details, dict) else {},
                attempts=attempts,
            )
        )
        return True

    def _settle(self, outcome: Outcome) -> None:
        self.outcomes[outcome.command_id] = outcome
        if outcome.status is Status.COMPLETED:
            self.completed += 1
        elif outcome.status is Status.REJECTED:
            self.rejected += 1

    def _give_up(self, reason: str) -> None:
        for pending in self.waiting.values():
            self._settle(
                Outcome(
                    pending.original.envelope.id,
                    Status.NO_RESULT,
                    code=Status.NO_RESULT.value,
                    message=reason,
                    attempts=pending.attempt + 1,
                )
            )
        for pending in [*self.queue, *(p for _, p in self.delayed)]:
            self._settle(
                Outcome(
                    pending.original.envelope.id,
                    Status.NOT_SENT,
                    code=Status.NOT_SENT.value,
                    message="not sent: the batch stopped waiting for results / 未发送",
                    attempts=pending.attempt,
                )
            )
        self.waiting.clear()
        self.queue.clear()
        self.delayed.clear()

    def report(self, elapsed_s: float) -> BatchReport:
        outcomes = {cid: self.outcomes[cid] for cid in self.order}
        return BatchReport(self.label, outcomes, elapsed_s, self.error)


async def send_batch(
    commands: Sequence[Outgoing],
    settings: Settings,
    *,
    label: str,
    max_in_flight: int = DEFAULT_IN_FLIGHT,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    retry: RetryPolicy | None = None,
    progress: bool = True,
    stream: TextIO | None = None,
) -> BatchReport:
    """Send ``commands`` (duplicated ids once) over the broker of ``settings`` and return every
    command's outcome."""
    if not commands:
        return BatchReport(label, {}, 0.0)
    signer = command_signer(settings)
    topics: Iterable[str] = {c.topic for c in commands}
    partitions = await topic_partitions(settings, [*sorted(topics), COMMAND_RESULTS])
    bootstrap = settings.kafka_bootstrap
    consumer = make_consumer(settings, fetch_max_wait_ms=20)
    producer = make_producer(settings)
    async with kafka_errors(bootstrap):
        await consumer.start()
        try:
            tps = [TopicPartition(COMMAND_RESULTS, p) for p in partitions[COMMAND_RESULTS]]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:
                await consumer.position(tp)  # pins the end offsets before anything is sent
            await producer.start()
            try:
                return await exchange(
                    commands,
                    producer,
                    consumer,
                    label=label,
                    max_in_flight=max_in_flight,
                    stall_timeout_s=stall_timeout_s,
                    retry=retry,
                    progress=progress,
                    stream=stream,
                    signer=signer,
                )
            finally:
                await _stop(producer)
        finally:
            await _stop(consumer)


async def _stop(client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    """Stop a client, keeping the batch's outcomes whatever the broker does meanwhile. With the
    broker gone, aiokafka's consumer lets the cancellation of its own fetch task escape from
    ``stop``; that is not a cancellation of ours and is not passed on."""
    try:
        await client.stop()
    except KafkaError as exc:
        log.debug("stopping %s: %s", type(client).__name__, exc)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


async def exchange(
    commands: Sequence[Outgoing],
    producer: AIOKafkaProducer,
    consumer: AIOKafkaConsumer,
    *,
    label: str,
    max_in_flight: int = DEFAULT_IN_FLIGHT,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    retry: RetryPolicy | None = None,
    progress: bool = True,
    stream: TextIO | None = None,
    signer: Callable[[Envelope], Envelope] | None = None,
) -> BatchReport:
    """The batch over started clients: ``consumer`` must already read the command-results topic
    from before the first command is sent."""
    started = time.monotonic()
    batch = _Batch(
        commands,
        label=label,
        max_in_flight=max_in_flight,
        stall_timeout_s=stall_timeout_s,
        retry=retry,
        progress=Progress(label, len({c.envelope.id for c in commands}), stream, progress),
        signer=signer,
    )
    await batch.run(producer, consumer)
    return batch.report(time.monotonic() - started)


async def send_in_waves(
    waves: Sequence[Sequence[Outgoing]], settings: Settings, *, label: str, **options: Any
) -> BatchReport:
    """Send each wave once the one before it has every answer (``send_batch``), and report
    them as one batch. After a wave that stopped early (the broker went away), the rest is not
    sent."""
    outcomes: dict[str, Outcome] = {}
    elapsed, error = 0.0, None
    for wave in waves:
        if not wave:
            continue
        if error is not None:
            for outgoing in wave:
                outcomes[outgoing.envelope.id] = Outcome(
                    outgoing.envelope.id,
                    Status.NOT_SENT,
                    code=Status.NOT_SENT.value,
                    message="not sent: the batch stopped before it / 未发送",
                )
            continue
        report = await send_batch(wave, settings, label=label, **options)
        outcomes.update(report.outcomes)
        elapsed += report.elapsed_s
        error = report.error
    return BatchReport(label, outcomes, elapsed, error)
