"""The ledger of a chaos run: every command sent (and every re-send), every result, event and
dead letter seen on the broker, and every fault injected. Kept in memory for the checker and
written as JSON lines as it goes, so a failed run can be read afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from contracts.topics import COMMAND_RESULTS, commands, dlq, events

COMPLETED = "bianzhi.CommandCompleted.v1"
REJECTED = "bianzhi.CommandRejected.v1"
WATCHED_SERVICES = ("orgs", "quota", "roster")
EVENT_TOPICS = tuple(events(s) for s in WATCHED_SERVICES)
DLQ_TOPICS = tuple(dlq(commands(s)) for s in WATCHED_SERVICES)


@dataclass
class Sent:
    """One command id the generator sent (once, or again as a duplicate)."""

    id: str
    topic: str
    type: str
    kind: str  # valid | malformed | rule
    op: str
    expect: str  # "completed", "rejected", or the reason code a rule-breaking command must get
    key: str
    service: str
    sends: int = 1
    first_sent: float = 0.0


@dataclass
class Poison:
    """Bytes that are no envelope at all: they must land in the topic's DLQ."""

    token: str
    topic: str
    sent_at: float
    partition: int = -1  # where the broker put it: a sealed dead letter is found by this
    offset: int = -1
    broker: int = 0


@dataclass
class ResultSeen:
    result_id: str
    command_id: str
    command_type: str
    type: str
    code: str | None
    events: list[str]
    partition: int
    offset: int
    broker: int


@dataclass
class EventSeen:
    topic: str
    partition: int
    offset: int
    key: str | None
    id: str
    type: str
    correlationid: str | None
    time: str
    data: dict[str, Any]
    broker: int


@dataclass
class DeadLetter:
    topic: str
    original_topic: str | None
    error: str | None
    value: bytes
    key: bytes
    sealed: bool
    broker: int
    original_partition: int = -1
    original_offset: int = -1


@dataclass
class Ledger:
    path: Path | None = None
    sent: dict[str, Sent] = field(default_factory=dict)
    payloads: dict[str, tuple[str, bytes, bytes]] = field(default_factory=dict)
    poison: list[Poison] = field(default_factory=list)
    results: dict[str, list[ResultSeen]] = field(default_factory=dict)
    events: list[EventSeen] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    broker_generation: int = 0
    _file: IO[str] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, record: str, body: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(
                json.dumps({"record": record, "t": time.time(), **body}, default=str) + "\n"
            )

    # --- what the generator records ---------------------------------------------------------

    def record_send(self, sent: Sent, topic: str, key: bytes, value: bytes) -> None:
        known = self.sent.get(sent.id)
        if known is None:
            sent.first_sent = time.time()
            self.sent[sent.id] = sent
            self.payloads[sent.id] = (topic, key, value)
            self._write("sent", asdict(sent))
        else:
            known.sends += 1
            self._write("resent", {"id": sent.id})

    def record_poison(self, poison: Poison) -> None:
        self.poison.append(poison)
        self._write("poison", asdict(poison))

    def record_fault(self, what: str, **details: Any) -> None:
        entry = {"what": what, "at": time.time(), **details}
        self.faults.append(entry)
        self._write("fault", entry)

    # --- what the reader records ------------------------------------------------------------

    def add_result(self, result: ResultSeen) -> bool:
        """Record a result; True when it is the first for its command."""
        seen = self.results.setdefault(result.command_id, [])
        seen.append(result)
        self._write("result", asdict(result))
        self._changed.set()
        return len(seen) == 1

    def add_event(self, event: EventSeen) -> None:
        self.events.append(event)
        self._write("event", {k: v for k, v in asdict(event).items() if k != "data"})

    def add_dead(self, dead: DeadLetter) -> None:
        self.dead.append(dead)
        self._write(
            "dead_letter",
            {
                "topic": dead.topic,
                "original_topic": dead.original_topic,
                "error": dead.error,
                "key": dead.key.decode("utf-8", errors="replace"),
                "sealed": dead.sealed,
                "value": dead.value[:200].decode("utf-8", errors="replace"),
            },
        )

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    # --- queries ----------------------------------------------------------------------------

    def unanswered(self) -> list[str]:
        return [cid for cid in self.sent if cid not in self.results]

    async def wait_changed(self, timeout: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)


ResultHook = Any  # Callable[[ResultSeen], None]


class Reader:
    """Reads the results, events and dead-letter topics of one broker from the beginning into
    the ledger; ``on_first_result`` is called with the first result of every command."""

    def __init__(self, bootstrap: str, ledger: Ledger, on_first_result: ResultHook) -> None:
        self.bootstrap = bootstrap
        self.ledger = ledger
        self.on_first_result = on_first_result
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=20,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self._task: asyncio.Task[None] | None = None
        self.generation = ledger.broker_generation
        self.error: BaseException | None = None

    async def start(self) -> None:
        await self.consumer.start()
        topics = [COMMAND_RESULTS, *EVENT_TOPICS, *DLQ_TOPICS]
        tps: list[TopicPartition] = []
        for topic in topics:
            parts = self.consumer.partitions_for_topic(topic)
            for _ in range(100):
                if parts:
                    break
                await asyncio.sleep(0.05)
                await self.consumer._client.force_metadata_update()
                parts = self.consumer.partitions_for_topic(topic)
            if not parts:
                raise RuntimeError(f"topic {topic} does not exist on {self.bootstrap}")
            tps += [TopicPartition(topic, p) for p in parts]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        """Stop reading and close the consumer for good, even when its broker is gone."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await asyncio.wait_for(self.consumer.stop(), 20)
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except Exception:  # the broker is gone
            pass
        # With the broker gone, a fetch of the consumer is usually in its retry back-off; the
        # consumer's stop cancels it, gets that cancellation back and ends before it closes its
        # client, whose metadata task then retries the dead broker for the rest of the process.
        # A second stop() does nothing (the consumer already counts as closed) and aiokafka has
        # no public way to close the client, hence the private attribute.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.consumer._client.close(), 20)

    async def _read(self) -> None:
        try:
            while True:
                batches = await self.consumer.getmany(timeout_ms=100, max_records=2000)
                for tp, records in batches.items():
                    for rec in records:
                        self._one(tp.topic, rec)
                self.ledger.flush()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced by the scenario
            self.error = exc
            raise

    def _one(self, topic: str, rec: Any) -> None:
        if topic in DLQ_TOPICS:
            headers = {k: v.decode(errors="replace") for k, v in rec.headers or ()}
            self.ledger.add_dead(
                DeadLetter(
                    topic=topic,
                    original_topic=headers.get("x-dlq-topic"),
                    error=headers.get("x-dlq-error"),
                    value=rec.value or b"",
                    key=rec.key or b"",
                    sealed="x-dlq-sealed" in headers,
                    broker=self.generation,
                    original_partition=int(headers.get("x-dlq-partition", -1)),
                    original_offset=int(headers.get("x-dlq-offset", -1)),
                )
            )
            return
        body = json.loads(rec.value)
        if topic == COMMAND_RESULTS:
            data = body.get("data") or {}
            result = ResultSeen(
                result_id=body["id"],
                command_id=str(data.get("command_id")),
                command_type=str(data.get("command_type")),
                type=body["type"],
                code=data.get("code"),
                events=list(data.get("events") or []),
                partition=rec.partition,
                offset=rec.offset,
                broker=self.generation,
            )
            if self.ledger.add_result(result) and result.command_id in self.ledger.sent:
                self.on_first_result(result)
            return
        self.ledger.add_event(
            EventSeen(
                topic=topic,
                partition=rec.partition,
                offset=rec.offset,
                key=rec.key.decode() if rec.key else None,
                id=body["id"],
                type=body["type"],
                correlationid=body.get("correlationid"),
                time=body.get("time", ""),
                data=body.get("data") or {},
                broker=self.generation,
            )
        )
