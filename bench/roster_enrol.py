"""Benchmark: EnrolPerson sagas end to end (roster → quota → roster) on the embedded stack.

One run, on one embedded broker (tansu) with quota and roster as service processes (SQLite files
by default, or fresh PostgreSQL databases with ``--postgres URL``):
  (a) the limits: the raw produce→consume round trip of the broker (throughput, and latency of
      one message at the paced rate), measured first in the same run;
  setup: orgs published as ``OrgRegistered`` events, then per org an approval and a quota-use
      notice with room for every enrolment of the run (several orgs, so the work of quota, keyed
      by org, spreads over partitions);
  (b) N EnrolPerson commands with valid citizen IDs sent as fast as the producer allows, timed
      from publish to the command's ``CommandCompleted`` on ``bianzhi.command-results.v1``;
  (c) a paced run at ``--rate`` commands/s: p50/p99 latency;
  (d) the checks: every command got exactly one result, a CommandCompleted; quota's occupied
      counts (``GET /orgs/{id}/establishment``) and roster's ``GET /counts`` both equal the
      enrolments sent;
  (e) where the time goes: per saga stage from the envelopes' build times and the records'
      broker timestamps, the services' /metrics, and CPU seconds per process;
  (f) the orgs service's RegisterOrg throughput on the same broker, for the ratio (quota and
      roster stopped first, so it runs alone as in ``bench/orgs_throughput.py``).
Figures, not assertions: ``python bench/roster_enrol.py`` (``-n 2000 --paced-seconds 5`` for a
quick run; ``--profile`` runs the roster under cProfile and prints its hottest functions).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import math
import os
import pstats
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from calibrate import machine_speed
from orgs_throughput import Driver as OrgsDriver
from orgs_throughput import broker_round_trip, cpu_seconds, fetch, percentile, run_dir, say
from sqlalchemy.engine import make_url

from contracts import identifiers
from contracts.codes import Category, EntryMethod, OrgKind
from contracts.common import Document
from contracts.envelope import CONTENT_TYPE, Envelope
from contracts.orgs import OrgRegistered
from contracts.quota import ApproveQuota, IssueQuotaUseNotice, OccupySlot
from contracts.roster import EnrolPerson
from contracts.topics import COMMAND_RESULTS, ORGS_EVENTS, QUOTA_COMMANDS, all_topics
from services.runtime.embedded_broker import EmbeddedBroker, ensure_topics, free_port
from services.runtime.gaps import OffsetGapGuard
from services.runtime.settings import Settings

COMPLETED = "bianzhi.CommandCompleted.v1"
# Written to the broker per enrolment: EnrolPerson, OccupySlot, SlotOccupied, quota's result,
# PersonEnrolled, the EnrolPerson result. Four broker round trips lie on its path: the command
# to roster, the step to quota, quota's answer to roster's projection, the result to the sender.
MESSAGES_PER_ENROLMENT = 6
HOPS_PER_ENROLMENT = 4
TARGET_RATE = 1_000.0  # enrolments/s on this 2-core machine
TARGET_P99_MS = 100.0  # at 200/s
APPROVER = {"actorid": "bench", "actorregion": "130000", "actorroles": "approver"}
CLERK = {"actorid": "bench.clerk", "actorregion": "130000", "actorroles": "clerk"}
DOC = Document(title="基准测试核编批复", number="冀编〔2026〕98号", date=date(2026, 1, 5))
EFFECTIVE = date(2026, 3, 1)
WARM_UP = 50
IDLE_SECONDS = 5.0
STALL_S = 120  # no new result for this long ends the run as stalled
# The saga's stages, from timestamps of one machine's clock: each message's envelope time (when
# its handler built it) and its record's broker timestamp (when a relay handed it to the producer).
STAGES = (
    ("roster command", "sent → OccupySlot built (delivery, queueing, EnrolPerson handling)"),
    ("relay to quota", "→ OccupySlot handed to the producer by roster's relay"),
    ("quota", "→ quota's result built (delivery, queueing, OccupySlot handling)"),
    ("relay back", "→ quota's result handed to the producer by quota's relay"),
    ("roster answer", "→ EnrolPerson result built (delivery to roster's projection, handling)"),
    ("relay result", "→ EnrolPerson result handed to the producer"),
    ("delivered", "→ received here"),
)


# --- the stack -------------------------------------------------------------------------------


def counties(prefix: str = "13") -> list[str]:
    """Current county-level divisions of the province (the bundled GB/T 2260 data)."""
    found = []
    for n in range(10_000):
        code = f"{prefix}{n:04d}"
        division = identifiers.division(code)
        if division is not None and division.current and division.level == 3:
            found.append(code)
    return found


@contextlib.asynccontextmanager
async def databases(base: str | None, names: Iterable[str]) -> AsyncIterator[dict[str, str]]:
    """Fresh PostgreSQL databases (dropped afterwards) per name, or {} for the SQLite default."""
    if not base:
        yield {}
        return
    url = make_url(base)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    made: dict[str, str] = {}
    try:
        for name in names:
            dbname = f"bench_{name}_{uuid.uuid4().hex[:8]}"
            conn = await asyncpg.connect(admin)
            try:
                await conn.execute(f'CREATE DATABASE "{dbname}"')
            finally:
                await conn.close()
            made[name] = url.set(database=dbname).render_as_string(hide_password=False)
        yield made
    finally:
        for full in made.values():
            conn = await asyncpg.connect(admin)
            try:
                dbname = make_url(full).database
                await conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            finally:
                await conn.close()


class Service:
    """One service as its own process (uvicorn), as in production; optionally under cProfile."""

    def __init__(
        self, name: str, bootstrap: str, data_dir: Path, env: dict[str, str], profile: Path | None
    ) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = data_dir / f"{name}.log"
        full_env = {
            **os.environ,
            "BIANZHI_DATA_DIR": str(data_dir),
            "BIANZHI_KAFKA_BOOTSTRAP": bootstrap,
            "BIANZHI_KAFKA_SESSION_TIMEOUT_MS": "3000",
            "BIANZHI_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
            "BIANZHI_LOG_LEVEL": os.environ.get("BENCH_SERVICE_LOG_LEVEL", "WARNING"),
            **env,
        }
        runner = ["-m", "cProfile", "-o", str(profile)] if profile else []
        # uvicorn re-raises the signal that stopped it; only SIGINT (KeyboardInterrupt) still
        # lets cProfile write its file on the way out.
        self.stop_signal = signal.SIGINT if profile else signal.SIGTERM
        log = open(self.log_path, "ab")  # noqa: SIM115 (lives as long as the process)
        self.process = subprocess.Popen(
            [
                sys.executable,
                *runner,
                "-m",
                "uvicorn",
                "--factory",
                f"services.{name}.entrypoints.app:create_app",
                "--port",
                str(self.port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env=full_env,
            stdout=log,
            stderr=log,
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def get(self, path: str) -> tuple[int, Any]:
        def call() -> tuple[int, Any]:
            try:
                with urllib.request.urlopen(self.url(path), timeout=10) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as exc:
                return exc.code, None

        return await asyncio.to_thread(call)

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the {self.name} service exited with {self.process.returncode}")
            with contextlib.suppress(OSError, ValueError):
                if (await self.get("/health/ready"))[0] == 200:
                    return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the {self.name} service did not become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def last_log_lines(self, n: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


# --- measuring --------------------------------------------------------------------------------


Sample = tuple[str, frozenset[tuple[str, str]]]
_SAMPLE = re.compile(r"^(bianzhi_\w+)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')
Metrics = dict[Sample, float]


def scrape(service: Service) -> Metrics:
    """The service's bianzhi_* samples, by name and labels."""
    out: Metrics = {}
    for line in fetch(service.url("/metrics")).splitlines():
        if match := _SAMPLE.match(line):
            name, labels, value = match.groups()
            out[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return out


def delta(before: Metrics, after: Metrics, name: str, **labels: str) -> float:
    """The change of ``name`` summed over the samples carrying ``labels``."""
    wanted = set(labels.items())
    return sum(
        value - before.get(key, 0.0)
        for key, value in after.items()
        if key[0] == name and wanted <= key[1]
    )


def mean_of(before: Metrics, after: Metrics, metric: str, **labels: str) -> float:
    count = delta(before, after, f"{metric}_count", **labels)
    return delta(before, after, f"{metric}_sum", **labels) / count if count else float("nan")


def stamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


async def broker_latency(bootstrap: str, rate: float, seconds: float) -> list[float]:
    """Produce→consume latency of single 600-byte records sent at ``rate``/s."""
    topic = f"bench.latency.{uuid.uuid4().hex[:6]}"
    await ensure_topics(bootstrap, [topic], partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10
    )
    await producer.start()
    await consumer.start()
    n = int(rate * seconds)
    sent: dict[int, float] = {}
    got: list[float] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)

        async def consume() -> None:
            while len(got) < n:
                batches = await consumer.getmany(timeout_ms=100)
                arrived = time.perf_counter()
                for records in batches.values():
                    got.extend(arrived - sent[int(r.key or b"0")] for r in records)

        reader = asyncio.create_task(consume())
        started = time.perf_counter()
        for i in range(n):
            pause = started + i / rate - time.perf_counter()
            if pause > 0:
                await asyncio.sleep(pause)
            sent[i] = time.perf_counter()
            await producer.send(topic, b"x" * 600, key=str(i).encode())
        await asyncio.wait_for(reader, 30)
        return got
    finally:
        await consumer.stop()
        await producer.stop()


class Driver:
    """Publishes commands and follows them: their results, and for enrolments the saga's step
    (OccupySlot on quota's command topic) and quota's answer on the results topic."""

    def __init__(self, bootstrap: str, partitions: int) -> None:
        # A front end: each command goes out at once (no linger), and its result is read with
        # the services' own short fetch wait.
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=Settings().kafka_command_fetch_max_wait_ms,
        )
        # The saga steps on quota's command topic are read for their stage times only, which
        # come from the records themselves (built, relayed), not from when they are read here:
        # so they are read after a run (``settle``), not during it, where every fetch that
        # brings records would cost the broker what the stack's own fetches do (docs/BROKER.md).
        self.steps = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=250
        )
        self._steps_guard = OffsetGapGuard()
        self.partitions = partitions
        self.bootstrap = bootstrap
        self.sent: dict[str, float] = {}
        self.sent_wall: dict[str, float] = {}
        self.latency: dict[str, float] = {}
        self.outcome: dict[str, str] = {}  # command id → result type, or the rejection code
        self.results = Counter[str]()  # command id → results seen (must end at exactly 1)
        self.step: dict[str, tuple[float, float]] = {}  # correlation → OccupySlot built, relayed
        self.answer: dict[str, tuple[float, float]] = {}  # correlation → quota's result
        self.final: dict[str, tuple[float, float, float]] = {}  # command id → built, relayed, got
        # The commands of the current run still without a result: emptied as results come,
        # so a fetch costs the reader only its own records (a subset test of the whole run at
        # every fetch cost it a tenth of a core while idle after a 20,000-command run).
        self._waiting: set[str] = set()
        self._done = asyncio.Event()

    async def start(self) -> None:
        await self.producer.start()
        for consumer, topic in ((self.consumer, COMMAND_RESULTS), (self.steps, QUOTA_COMMANDS)):
            await consumer.start()
            tps = [TopicPartition(topic, p) for p in range(self.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:
                await consumer.position(tp)
        self._reader = asyncio.create_task(self._read(self.consumer))

    async def stop(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.consumer.stop()
        await self.steps.stop()
        await self.producer.stop()

    async def scan_results(self, ids: set[str]) -> dict[str, str]:
        """Where the results of ``ids`` are on the results topic, read with a fresh consumer
        from the start, against where this driver's reader stands: a result the broker holds
        but the reader never got, or one the broker does not hold."""
        found: dict[str, str] = {}
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(COMMAND_RESULTS, p) for p in range(self.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            while any([await consumer.position(tp) < ends[tp] for tp in tps]):
                for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                    for rec in records:
                        key = (rec.key or b"").decode()
                        if key in ids:
                            found[key] = (
                                f"partition {tp.partition} offset {rec.offset}, the reader at "
                                f"offset {await self.consumer.position(tp)} of {ends[tp]}"
                            )
        finally:
            await consumer.stop()
        return found

    async def settle(self, ids: list[str], timeout: float = 5.0) -> None:
        """Read the saga steps written since the last call, up to the end of quota's command
        topic, for as long as that leaves a completed saga's step unseen (a little)."""
        deadline = time.monotonic() + timeout
        while True:
            await self.read_steps()
            seen = all(self.outcome.get(i) != "completed" or i in self.step for i in ids)
            if seen or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.1)

    async def read_steps(self) -> None:
        """Read quota's command topic from where the last read stopped to its end now."""
        tps = sorted(self.steps.assignment())
        ends = await self.steps.end_offsets(tps)
        while any([await self.steps.position(tp) < ends[tp] for tp in tps]):
            batches = await self.steps.getmany(timeout_ms=500)
            now, wall = time.perf_counter(), time.time()
            for rec in self._steps_guard.take(self.steps, batches):
                self._record(rec.topic, rec, now, wall)

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        # The services' own guard against the embedded broker's out-of-order answers.
        guard = OffsetGapGuard()
        while True:
            batches = await consumer.getmany(timeout_ms=50)
            now, wall = time.perf_counter(), time.time()
            for rec in guard.take(consumer, batches):
                self._record(rec.topic, rec, now, wall)
            if not self._waiting:
                self._done.set()

    def _record(self, topic: str, rec: Any, now: float, wall: float) -> None:
        data = json.loads(rec.value)
        relayed = rec.timestamp / 1000
        correlation = data.get("correlationid") or data["id"]
        if topic == QUOTA_COMMANDS:
            if data["type"] == OccupySlot.TYPE:
                self.step.setdefault(correlation, (stamp(data["time"]), relayed))
            return
        result = data["data"]
        if result["command_type"] == OccupySlot.TYPE:
            self.answer.setdefault(correlation, (stamp(data["time"]), relayed))
            return
        cid = result["command_id"]
        self.results[cid] += 1
        if cid in self.sent and cid not in self.latency:
            self.latency[cid] = now - self.sent[cid]
            self._waiting.discard(cid)
            self.final[cid] = (stamp(data["time"]), relayed, wall)
            self.outcome[cid] = "completed" if data["type"] == COMPLETED else result.get("code")

    async def run(
        self, commands: list[tuple[str, str, bytes, bytes]], rate: float | None, label: str
    ) -> float:
        """Publish (id, topic, key, value) commands, at ``rate``/s or at once; commands/s until
        the last result."""
        ids = [c[0] for c in commands]
        self._waiting = set(ids) - self.latency.keys()
        self._done.clear()
        started = time.perf_counter()
        futures = []
        headers = [("content-type", CONTENT_TYPE.encode())]
        for i, (cid, topic, key, value) in enumerate(commands):
            if rate is not None:
                pause = started + i / rate - time.perf_counter()
                if pause > 0:
                    await asyncio.sleep(pause)
            self.sent[cid] = time.perf_counter()
            self.sent_wall[cid] = time.time()
            futures.append(await self.producer.send(topic, value, key=key, headers=headers))
            if (i + 1) % 5000 == 0:
                say(f"  {label}: {i + 1}/{len(commands)} published, {self._answered(ids)} results")
        await asyncio.gather(*futures)
        last, quiet = -1, 0.0
        while not self._done.is_set():
            try:
                await asyncio.wait_for(self._done.wait(), 5)
            except TimeoutError:
                answered = self._answered(ids)
                quiet = quiet + 5 if answered == last else 0.0
                if quiet >= STALL_S:
                    await self.read_steps()
                    missing = [i for i in ids if i not in self.latency][:10]
                    stored = await self.scan_results(set(missing))
                    for cid in missing:
                        say(
                            f"  no result for {cid}: its OccupySlot "
                            f"{'was' if cid in self.step else 'was not'} seen on quota's "
                            f"command topic, quota's answer "
                            f"{'was' if cid in self.answer else 'was not'} seen on the results; "
                            f"read again from the start of the results topic: "
                            f"{stored.get(cid, 'not there')}"
                        )
                    raise RuntimeError(
                        f"{label}: stalled at {answered}/{len(ids)} results"
                    ) from None
                last = answered
                say(f"  {label}: {answered}/{len(ids)} results")
        return len(ids) / (time.perf_counter() - started)

    def _answered(self, ids: list[str]) -> int:
        return sum(1 for i in ids if i in self.latency)

    def rejected(self, ids: Iterable[str]) -> Counter[str]:
        return Counter(self.outcome[i] for i in ids if self.outcome.get(i) != "completed")

    def stages(self, ids: Iterable[str]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {name: [] for name, _ in STAGES}
        for cid in ids:
            if self.outcome.get(cid) != "completed" or not (
                cid in self.step and cid in self.answer and cid in self.final
            ):
                continue
            marks = [self.sent_wall[cid], *self.step[cid], *self.answer[cid], *self.final[cid]]
            for (name, _), a, b in zip(STAGES, marks[:-1], marks[1:], strict=True):
                out[name].append(b - a)
        return out


# --- the workload ----------------------------------------------------------------------------


def envelope_of(command: Any, actor: dict[str, str]) -> Envelope:
    return command.envelope(source="/bench", **actor)


def org_events(count: int, places: list[str]) -> list[tuple[uuid.UUID, str, bytes]]:
    """``OrgRegistered`` events of ``count`` organs, as the orgs service would publish them."""
    out = []
    for i in range(count):
        org_id = uuid.uuid4()
        division = places[i % len(places)]
        event = OrgRegistered(
            org_id=org_id,
            name=f"基准测试机关{i:03d}",
            kind=OrgKind.ORGAN,
            division_code=division,
            functions=["承担基准测试"],
            document=DOC,
            effective_date=DOC.date,
        )
        out.append((org_id, division, envelope_of(event, APPROVER).to_bytes()))
    return out


def quota_commands(
    orgs: list[tuple[uuid.UUID, str, bytes]], places: int, run_tag: str
) -> tuple[list[tuple[str, str, bytes, bytes]], list[tuple[str, str, bytes, bytes]], list[str]]:
    """Per org an approval of ``places`` admin slots and a notice of as many: the commands, and
    the notice numbers."""
    approvals, notices, numbers = [], [], []
    for i, (org_id, _, _) in enumerate(orgs):
        key = str(org_id).encode()
        approve = envelope_of(
            ApproveQuota(
                org_id=org_id,
                category=Category.ADMIN,
                approved=places,
                document=DOC,
                effective_date=DOC.date,
            ),
            APPROVER,
        )
        approvals.append((approve.id, QUOTA_COMMANDS, key, approve.to_bytes()))
        notice_no = f"冀编用〔2026〕{run_tag}-{i:03d}号"
        issue = envelope_of(
            IssueQuotaUseNotice(
                notice_no=notice_no,
                org_id=org_id,
                category=Category.ADMIN,
                count=places,
                valid_until=date(2099, 12, 31),
                document=DOC,
            ),
            APPROVER,
        )
        notices.append((issue.id, QUOTA_COMMANDS, key, issue.to_bytes()))
        numbers.append(notice_no)
    return approvals, notices, numbers


class People:
    """EnrolPerson commands with valid, distinct citizen IDs, spread over the orgs."""

    def __init__(self, orgs: list[tuple[uuid.UUID, str, bytes]], notices: list[str]) -> None:
        self.orgs = orgs
        self.notices = notices
        self.next = 0

    def commands(self, n: int) -> list[tuple[str, str, bytes, bytes]]:
        out = []
        for _ in range(n):
            i = self.next
            self.next += 1
            org_id, division, _ = self.orgs[i % len(self.orgs)]
            born = date(1965, 1, 1) + timedelta(days=i // 1000)
            citizen_id = identifiers.compose_citizen_id(division, born, i % 1000)
            env = envelope_of(
                EnrolPerson(
                    citizen_id=citizen_id,
                    name=f"基准人员{i:06d}",
                    org_id=org_id,
                    category=Category.ADMIN,
                    notice_no=self.notices[i % len(self.orgs)],
                    entry_method=EntryMethod.EXAM,
                    effective_date=EFFECTIVE,
                ),
                CLERK,
            )
            out.append((env.id, EnrolPerson.TOPIC, citizen_id.encode(), env.to_bytes()))
        return out


async def wait_for(check: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}")


async def set_up(
    driver: Driver, quota: Service, roster: Service, orgs: int, places: int
) -> tuple[list[tuple[uuid.UUID, str, bytes]], list[str]]:
    registered = org_events(orgs, counties())
    headers = [("content-type", CONTENT_TYPE.encode())]
    for org_id, _, value in registered:
        await driver.producer.send_and_wait(
            ORGS_EVENTS, value, key=str(org_id).encode(), headers=headers
        )

    async def projected() -> bool:
        applied = delta(
            {},
            await asyncio.to_thread(scrape, roster),
            "bianzhi_messages_handled_total",
            type=OrgRegistered.TYPE,
            outcome="applied",
        )
        statuses = [(await quota.get(f"/orgs/{o}/establishment"))[0] for o, _, _ in registered]
        return applied >= orgs and all(s == 200 for s in statuses)

    await wait_for(projected, "quota and roster to project the orgs")
    approvals, notices, numbers = quota_commands(registered, places, uuid.uuid4().hex[:6])
    for label, commands in (("approvals", approvals), ("notices", notices)):
        await driver.run(commands, None, label)
        if refused := driver.rejected(c[0] for c in commands):
            raise RuntimeError(f"set-up {label} rejected: {dict(refused)}")
    return registered, numbers


async def verify(
    driver: Driver,
    enrol_ids: list[str],
    orgs: list[tuple[uuid.UUID, str, bytes]],
    quota: Service,
    roster: Service,
) -> bool:
    """Exactly one CommandCompleted per command; quota's and roster's counts equal the sent."""
    await asyncio.sleep(3)  # a duplicate result would come soon after the first
    extra = sum(1 for i in enrol_ids if driver.results[i] > 1)
    missing = sum(1 for i in enrol_ids if driver.results[i] == 0)
    refused = driver.rejected(enrol_ids)
    occupied = reserved = 0
    for org_id, _, _ in orgs:
        status, body = await quota.get(f"/orgs/{org_id}/establishment")
        if status != 200:
            raise RuntimeError(f"quota answered {status} for org {org_id}")
        for cat in body["categories"]:
            occupied += cat["occupied"]
            reserved += cat["reserved"]
    _, counts = await roster.get("/counts")
    # {"totals": {category: {"held", "enrolling"}}, "orgs": [...]}; earlier {"orgs": {org: …}}
    buckets = (
        list(counts["totals"].values())
        if "totals" in counts
        else [c for cats in counts["orgs"].values() for c in cats.values()]
    )
    held = sum(c["held"] for c in buckets)
    enrolling = sum(c["enrolling"] for c in buckets)
    n = len(enrol_ids)
    completed = n - missing - sum(refused.values())
    consistent = occupied == held == completed and not enrolling
    ok = consistent and not extra and completed == n
    say(
        f"  {n} EnrolPerson commands: {n - missing} answered, {extra} answered more than once, "
        f"{completed} completed, rejected {dict(refused) or 0}"
    )
    say(
        f"  quota occupied {occupied} (reserved left {reserved}); roster held {held}, "
        f"enrolling {enrolling}; completed {completed} → books "
        f"{'agree' if consistent else 'DISAGREE'}; all {n} completed: {completed == n}"
    )
    return ok


async def drain(roster: Service, timeout: float = 3600) -> None:
    """Wait until no saga waits for quota (nor for a compensation's answer)."""
    started = time.monotonic()
    last = started

    async def open_sagas() -> int:
        total = 0
        for status in ("waiting", "timed_out"):
            _, body = await roster.get(f"/sagas?status={status}&limit=1000")
            total += len(body["sagas"])
        return total

    while (left := await open_sagas()) > 0:
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{left}+ sagas still open after {timeout:.0f} s")
        if time.monotonic() - last >= 15:
            say(f"  drain: {left}{'+' if left >= 1000 else ''} sagas still open")
            last = time.monotonic()
        await asyncio.sleep(1)
    say(f"  drained: no saga open ({time.monotonic() - started:.1f} s after the last result)")


def print_by_second(driver: Driver, ids: list[str]) -> None:
    """p99 and the slowest latency of the commands sent in each second of a paced run: slow
    results spread over the run (queueing) or bunched in a few seconds (a stall)."""
    if not ids:
        return
    start = min(driver.sent[i] for i in ids)
    seconds: dict[int, list[float]] = {}
    for i in ids:
        seconds.setdefault(int(driver.sent[i] - start), []).append(driver.latency[i])
    cells = [
        f"{percentile(lat, 0.99) * 1000:.0f}/{max(lat) * 1000:.0f}"
        for _, lat in sorted(seconds.items())
    ]
    say(f"  p99/max ms by second sent: {' '.join(cells)}")


def print_stages(driver: Driver, ids: list[str]) -> None:
    stages = driver.stages(ids)
    say(f"  per stage (ms, p50 / p99 / mean) over {len(stages['delivered'])} sagas:")
    for name, meaning in STAGES:
        values = stages[name]
        if not values:
            continue
        say(
            f"    {name:<15} {percentile(values, 0.5) * 1000:7.1f} / "
            f"{percentile(values, 0.99) * 1000:7.1f} / {statistics.fmean(values) * 1000:7.1f}"
            f"   {meaning}"
        )
    # Where the tail comes from: the stages of the slowest sagas (the lists are aligned, one
    # entry per saga, in the same order).
    totals = [sum(values) for values in zip(*(stages[name] for name, _ in STAGES), strict=True)]
    if len(totals) >= 100:
        slow = sorted(range(len(totals)), key=totals.__getitem__)[-max(1, len(totals) // 100) :]
        say(
            f"  the slowest 1 % ({len(slow)} sagas, ≥ {totals[slow[0]] * 1000:.0f} ms), mean ms "
            "per stage: "
            + ", ".join(
                f"{name} {statistics.fmean(stages[name][i] for i in slow) * 1000:.1f}"
                for name, _ in STAGES
            )
        )


def print_service_figures(
    label: str,
    before: dict[str, Metrics],
    after: dict[str, Metrics],
) -> None:
    r0, r1, q0, q1 = before["roster"], after["roster"], before["quota"], after["quota"]
    for name, b, a, command in (
        ("roster", r0, r1, EnrolPerson.TYPE),
        ("quota", q0, q1, OccupySlot.TYPE),
    ):
        batches = delta(b, a, "bianzhi_batch_size_count", service=name)
        handling = mean_of(b, a, "bianzhi_handler_latency_seconds", type=command)
        say(
            f"  {label} {name} commands: {batches:.0f} fetches, mean batch "
            f"{mean_of(b, a, 'bianzhi_batch_size', service=name):.1f}, mean age at handling "
            f"{mean_of(b, a, 'bianzhi_message_age_seconds', service=name) * 1000:.1f} ms, "
            f"mean batch transaction {handling * 1000:.1f} ms (≈ {handling * batches:.1f} s busy)"
        )
        handled = delta(b, a, "bianzhi_message_age_seconds_count", service=name)
        if handled:
            bucket = "bianzhi_message_age_seconds_bucket"
            shares = [
                f"≤ {bound * 1000:.0f} ms "
                f"{delta(b, a, bucket, service=name, le=str(bound)) / handled:.1%}"
                for bound in (0.01, 0.02, 0.05, 0.1)
            ]
            say(f"    age at handling: {', '.join(shares)}")
    applied = delta(r0, r1, "bianzhi_messages_handled_total", type=COMPLETED, outcome="applied")
    ignored = delta(r0, r1, "bianzhi_messages_handled_total", type=COMPLETED, outcome="ignored")
    # A fetch of answers is applied in one transaction, whose time each applied answer records.
    per_answer = delta(r0, r1, "bianzhi_handler_latency_seconds_sum", type=COMPLETED)
    say(
        f"  {label} roster answers (projection, a transaction per fetch): {applied:.0f} "
        f"applied + {ignored:.0f} ignored results, mean transaction of an answer's fetch "
        f"{per_answer / max(applied, 1) * 1000:.2f} ms"
    )
    fetches = {
        outcome: delta(
            r0, r1, "bianzhi_fetch_transactions_total", service="roster", outcome=outcome
        )
        for outcome in ("together", "apart")
    }
    say(
        f"  {label} roster fetches of both commands and answers: {fetches['together']:.0f} "
        f"handled in one transaction, {fetches['apart']:.0f} topic by topic after it failed"
    )
    for name, b, a in (("roster", r0, r1), ("quota", q0, q1)):
        say(
            f"  {label} {name} relay published "
            f"{delta(b, a, 'bianzhi_outbox_published_total', service=name):.0f} outbox rows"
        )


class Cpu:
    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.start = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self.started = time.perf_counter()
        self.windows: list[dict[str, float]] = []  # CPU share per process, by ``follow``
        self.window_s = 0.0

    def _used(self) -> dict[str, float]:
        """CPU seconds per process since this started."""
        return {name: cpu_seconds(pid) - self.start[name] for name, pid in self.pids.items()}

    def report(self, label: str, items: int) -> None:
        """CPU seconds per process, and per item; the machine's load (other work shares it)."""
        wall = time.perf_counter() - self.started
        used = self._used()
        parts = [f"{name} {sec:.1f} s ({sec / wall:.0%})" for name, sec in used.items()]
        say(f"  {label} CPU over {wall:.1f} s wall (2 cores = 200%): " + ", ".join(parts))
        per = {name: sec / items * 1000 for name, sec in used.items()}
        stack = sum(v for k, v in per.items() if k != "bench")
        say(
            f"  {label} CPU per enrolment: "
            + ", ".join(f"{name} {ms:.2f} ms" for name, ms in per.items())
            + f"; the stack without the bench {stack:.2f} ms → {os.cpu_count() or 2} cores "
            f"would allow ≈ {(os.cpu_count() or 2) * 1000 / stack:,.0f} enrolments/s if CPU "
            f"were all it needed; load average now {load()}"
        )

    async def follow(self, every_s: float = 3.0) -> None:
        """Note each process's CPU share every ``every_s`` until cancelled (``report_windows``
        prints them): whether a process's share grows through a run at a steady load."""
        self.window_s = every_s
        last, at = self._used(), time.perf_counter()
        while True:
            await asyncio.sleep(every_s)
            used, now = self._used(), time.perf_counter()
            self.windows.append({n: (used[n] - last[n]) / (now - at) for n in used})
            last, at = used, now

    def report_windows(self, label: str) -> None:
        if len(self.windows) < 2:
            return
        say(f"  {label} CPU % of one core by {self.window_s:.0f}-s window, first to last:")
        for name in self.windows[0]:
            say(f"    {name:6} " + " ".join(f"{w[name] * 100:3.0f}" for w in self.windows))

    def per_item_ms(self, items: int) -> dict[str, float]:
        """CPU ms per item of each process."""
        return {name: sec / items * 1000 for name, sec in self._used().items()}

    def stack_ms(self, items: int) -> float:
        """CPU ms per item of the stack (every process but the benchmark's own)."""
        return sum(ms for name, ms in self.per_item_ms(items).items() if name != "bench")

    def report_idle(self) -> None:
        """CPU share per process while nothing is asked of the stack: the idle polling."""
        wall = time.perf_counter() - self.started
        used = self._used()
        parts = [f"{name} {sec / wall:.1%}" for name, sec in used.items()]
        total = sum(sec for name, sec in used.items() if name != "bench") / wall
        say(
            "  idle CPU (of one core): "
            + ", ".join(parts)
            + f"; the stack without the bench {total:.1%}"
        )


async def explained(run: Awaitable[float], roster: Service) -> float:
    """``run``, and when it stalls, what the roster says of its sagas still open."""
    try:
        return await run
    except RuntimeError:
        for status in ("waiting", "timed_out"):
            _, body = await roster.get(f"/sagas?status={status}&limit=5")
            for saga in (body or {}).get("sagas", []):
                say(f"  open saga ({status}): {json.dumps(saga, ensure_ascii=False)[:400]}")
        raise


def steady() -> None:
    """Move everything this process holds now out of the garbage collector's sight.

    The driver keeps a few records per command; a full collection walking them all paused this
    process for 50 ms, stamping every result that arrived meanwhile late (the services freeze
    what their start-up made the same way)."""
    gc.collect()
    gc.freeze()


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def print_profile(path: Path, top: int = 25) -> None:
    if not path.exists():
        say(f"  no profile written at {path}")
        return
    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    say(f"--- roster profile (cProfile, {total:.1f} s wall in the profiled thread) ---")
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, ct, nc, f"{Path(file).name}:{line}({func})", file))
    say("  by own time:")
    for tt, ct, nc, where, _ in sorted(rows, reverse=True)[:top]:
        say(f"    {tt:7.2f} s own {ct:7.2f} s cum {nc:9d} calls  {where}")
    say("  by cumulative time (bianzhi code):")
    ours = [r for r in rows if "/services/" in r[4] or "/contracts/" in r[4]]
    for tt, ct, nc, where, file in sorted(ours, key=lambda r: -r[1])[:top]:
        short = file.split("/services/")[-1] if "/services/" in file else Path(file).name
        say(f"    {ct:7.2f} s cum {tt:7.2f} s own {nc:9d} calls  {short}:{where.split(':', 1)[1]}")
    say(
        "  (wall time of the event-loop thread; a coroutine counts one call per resumption; "
        "SQLite itself runs in aiosqlite's thread, which cProfile does not see)"
    )


# --- main ------------------------------------------------------------------------------------


async def start_services(
    into: dict[str, Service],
    bootstrap: str,
    data_dir: Path,
    urls: dict[str, str],
    saga_timeout: float | None = None,
    profile: Path | None = None,
) -> None:
    """Quota and roster as their own processes on ``bootstrap`` (SQLite files in ``data_dir``,
    or the PostgreSQL ``urls``), with a fresh personal-data key, put ``into`` as they start (so
    the caller stops them whatever happens); returns once both are ready."""
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    env = {
        "quota": {"BIANZHI_QUOTA_DATABASE_URL": urls["quota"]} if urls else {},
        "roster": {
            "BIANZHI_ROSTER_PERSONAL_DATA_KEY": key,
            **({"BIANZHI_ROSTER_SAGA_TIMEOUT_S": str(saga_timeout)} if saga_timeout else {}),
            **({"BIANZHI_ROSTER_DATABASE_URL": urls["roster"]} if urls else {}),
        },
    }
    for name in ("quota", "roster"):
        profiled = profile if name == "roster" else None
        into[name] = Service(name, bootstrap, data_dir, env[name], profiled)
    for name in ("quota", "roster"):
        await into[name].wait_ready()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="enrolments in the throughput run")
    parser.add_argument("--rate", type=float, default=200.0, help="enrolments/s in the paced run")
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    parser.add_argument(
        "--paced-first",
        action="store_true",
        help="run the paced run before the burst (on a broker that holds only set-up's and "
        "the warm-up's records) rather than after it",
    )
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--orgs", type=int, default=24, help="orgs (each with one notice)")
    parser.add_argument(
        "--postgres",
        default=None,
        metavar="URL",
        help="a PostgreSQL server (postgresql+asyncpg://…): fresh databases for the services "
        "(default: SQLite files, the embedded default)",
    )
    parser.add_argument(
        "--orgs-n",
        type=int,
        default=None,
        help="RegisterOrg commands for the ratio (default: -n; 0 skips the orgs run)",
    )
    parser.add_argument(
        "--saga-timeout",
        type=float,
        default=None,
        metavar="S",
        help="the roster's saga step timeout (default: the service's own, 60 s); a queue "
        "longer than it ends enrolments with `timeout` and compensates them",
    )
    parser.add_argument(
        "--rates",
        default="",
        metavar="R1,R2,…",
        help="after the paced run, one more paced run of --paced-seconds at each of these "
        "rates (enrolments/s): p50, p99 and CPU per enrolment by rate, and the highest rate "
        "that meets the p99 target",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the roster under cProfile and print its hottest functions (slows it down)",
    )
    args = parser.parse_args()
    paced_n = int(args.rate * args.paced_seconds)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    ladder_n = sum(int(r * args.paced_seconds) for r in rates)
    total = WARM_UP + args.n + paced_n + ladder_n
    places = math.ceil(total / args.orgs) + 1
    orgs_n = args.n if args.orgs_n is None else args.orgs_n

    # Before anything else runs: how fast the machine is today (bench/calibrate.py).
    speed = machine_speed()
    say(speed.describe())
    with tempfile.TemporaryDirectory(prefix="bianzhi-bench-") as tmp:
        data_dir = run_dir(tmp)
        broker = EmbeddedBroker(log_path=data_dir / "broker.log")
        await broker.start()
        services: dict[str, Service] = {}
        profile = data_dir / "roster.prof" if args.profile else None
        try:
            async with databases(args.postgres, ["quota", "roster", "orgs"]) as urls:
                await ensure_topics(broker.bootstrap, all_topics(), partitions=args.partitions)
                say(
                    f"broker {broker.bootstrap}, {args.partitions} partitions per topic; "
                    f"database {'PostgreSQL' if urls else 'SQLite files'}; "
                    f"{os.cpu_count()} cores, load average {load()} (the machine is shared)"
                )
                say("(a) limits: the raw broker")
                broker_rate = await broker_round_trip(broker.bootstrap, args.n, args.partitions)
                bound = broker_rate / MESSAGES_PER_ENROLMENT
                say(
                    f"  round trip (aiokafka produce+consume, 600 B): {broker_rate:,.0f} msg/s "
                    f"→ bound {broker_rate:,.0f}/{MESSAGES_PER_ENROLMENT} = {bound:,.0f} "
                    "enrolments/s"
                )
                raw = await broker_latency(broker.bootstrap, args.rate, min(args.paced_seconds, 5))
                raw_p50, raw_p99 = percentile(raw, 0.5), percentile(raw, 0.99)
                say(
                    f"  one record at {args.rate:.0f}/s: p50 {raw_p50 * 1000:.1f} ms, "
                    f"p99 {raw_p99 * 1000:.1f} ms → the {HOPS_PER_ENROLMENT} hops of a saga "
                    f"(command, step, answer, result) ≈ "
                    f"{HOPS_PER_ENROLMENT * raw_p50 * 1000:.0f} ms at p50"
                )

                await start_services(
                    services, broker.bootstrap, data_dir, urls, args.saga_timeout, profile
                )
                quota, roster = services["quota"], services["roster"]
                driver = Driver(broker.bootstrap, args.partitions)
                await driver.start()
                try:
                    say(f"set-up: {args.orgs} orgs, each {places} admin places and one notice")
                    orgs, notices = await set_up(driver, quota, roster, args.orgs, places)
                    people = People(orgs, notices)
                    warm = people.commands(WARM_UP)
                    await driver.run(warm, None, "warm-up")

                    pids = {
                        "tansu": broker.pid,
                        "quota": quota.process.pid,
                        "roster": roster.process.pid,
                        "bench": os.getpid(),
                    }

                    paced: list[tuple[str, str, bytes, bytes]] = []

                    async def paced_run() -> tuple[float, float]:
                        """The paced run: its p50 and p99."""
                        m_before = {
                            n: await asyncio.to_thread(scrape, s) for n, s in services.items()
                        }
                        say(f"(c) paced: {paced_n} EnrolPerson commands at {args.rate:.0f}/s")
                        paced.extend(people.commands(paced_n))
                        steady()
                        cpu = Cpu(pids)
                        following = asyncio.create_task(cpu.follow())
                        try:
                            await explained(driver.run(paced, args.rate, "paced"), roster)
                        finally:
                            following.cancel()
                        cpu.report("paced", paced_n)
                        cpu.report_windows("paced")
                        m2 = {n: await asyncio.to_thread(scrape, s) for n, s in services.items()}
                        paced_ids = [c[0] for c in paced]
                        plat = [driver.latency[i] for i in paced_ids]
                        p50, p99 = percentile(plat, 0.5), percentile(plat, 0.99)
                        say(
                            f"  latency p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
                            f"mean {statistics.fmean(plat) * 1000:.1f} ms; "
                            f"rejected {dict(driver.rejected(paced_ids)) or 0}"
                        )
                        print_by_second(driver, paced_ids)
                        print_service_figures("paced", m_before, m2)
                        await driver.settle(paced_ids)
                        print_stages(driver, paced_ids)
                        return p50, p99

                    if args.paced_first:
                        paced_p50, paced_p99 = await paced_run()
                        await drain(roster)

                    say(f"(b) {args.n} EnrolPerson commands at once, publish → CommandCompleted")
                    burst = people.commands(args.n)
                    # What set-up made is kept out of this process's collections, so none of
                    # them pauses the timing of the runs for long (see ``steady``).
                    steady()
                    m0 = {n: await asyncio.to_thread(scrape, s) for n, s in services.items()}
                    cpu = Cpu(pids)
                    throughput = await explained(driver.run(burst, None, "burst"), roster)
                    cpu.report("burst", args.n)
                    m1 = {n: await asyncio.to_thread(scrape, s) for n, s in services.items()}
                    burst_ids = [c[0] for c in burst]
                    lat = [driver.latency[i] for i in burst_ids]
                    refused = driver.rejected(burst_ids)
                    say(
                        f"  throughput {throughput:,.0f} enrolments/s ended "
                        f"({throughput * (args.n - sum(refused.values())) / args.n:,.0f}/s "
                        f"completed); latency under a full queue "
                        f"p50 {percentile(lat, 0.5) * 1000:,.0f} ms, "
                        f"p99 {percentile(lat, 0.99) * 1000:,.0f} ms; "
                        f"rejected {dict(refused) or 0}"
                    )
                    print_service_figures("burst", m0, m1)
                    await driver.settle(burst_ids)
                    print_stages(driver, burst_ids)
                    await drain(roster)

                    say(f"(c) idle: {IDLE_SECONDS:.0f} s with nothing to do (what polling costs)")
                    cpu = Cpu(pids)
                    await asyncio.sleep(IDLE_SECONDS)
                    cpu.report_idle()

                    if not args.paced_first:
                        paced_p50, paced_p99 = await paced_run()
                    ladder: list[tuple[str, str, bytes, bytes]] = []
                    if rates:
                        say(f"(c) by rate: {args.paced_seconds:.0f} s at each rate")
                    met = None
                    for rate in rates:
                        await drain(roster)
                        step = people.commands(int(rate * args.paced_seconds))
                        ladder += step
                        steady()
                        cpu = Cpu(pids)
                        await explained(driver.run(step, rate, f"{rate:.0f}/s"), roster)
                        stack_ms = cpu.stack_ms(len(step))
                        tansu_ms = cpu.per_item_ms(len(step))["tansu"]
                        rlat = [driver.latency[c[0]] for c in step]
                        r50, r99 = percentile(rlat, 0.5), percentile(rlat, 0.99)
                        if r99 * 1000 <= TARGET_P99_MS:
                            met = rate if met is None else max(met, rate)
                        say(
                            f"  {rate:5.0f}/s: p50 {r50 * 1000:6.1f} ms, p99 {r99 * 1000:6.1f} ms, "
                            f"the stack's CPU {stack_ms:5.2f} ms per enrolment "
                            f"({stack_ms * rate / 10:.0f}% of one core; the broker's "
                            f"{tansu_ms * rate / 10:.0f}%); load average {load()}"
                        )
                    if rates:
                        say(
                            f"  highest rate with p99 ≤ {TARGET_P99_MS:.0f} ms: "
                            + (f"{met:.0f}/s" if met is not None else "none of these")
                        )

                    await drain(roster)
                    say("(d) checks")
                    all_ids = [c[0] for c in warm + burst + paced + ladder]
                    ok = await verify(driver, all_ids, orgs, quota, roster)
                finally:
                    await driver.stop()
                for name in ("roster", "quota"):
                    services.pop(name).stop()
                if profile is not None:
                    print_profile(profile)

                orgs_rate = float("nan")
                if orgs_n:
                    say(f"(f) {orgs_n} RegisterOrg commands on the same broker (orgs alone)")
                    orgs_env = {"BIANZHI_ORGS_DATABASE_URL": urls["orgs"]} if urls else {}
                    services["orgs"] = orgs_service = Service(
                        "orgs", broker.bootstrap, data_dir, orgs_env, None
                    )
                    await orgs_service.wait_ready()
                    odriver = OrgsDriver(broker.bootstrap, args.partitions)
                    await odriver.start()
                    try:
                        await odriver.run(50, None, "orgs warm-up")
                        orgs_rate, olat = await odriver.run(orgs_n, None, "orgs burst")
                    finally:
                        await odriver.stop()
                    say(
                        f"  RegisterOrg throughput {orgs_rate:,.0f} commands/s "
                        f"(p50 {percentile(olat, 0.5) * 1000:,.0f} ms under a full queue)"
                    )
                    services.pop("orgs").stop()

                say("")
                say(
                    f"RESULT enrolments={args.n} throughput={throughput:,.0f}/s "
                    f"burst_rejected={sum(refused.values())} "
                    f"(target ≥ {TARGET_RATE:,.0f}/s) broker_bound={bound:,.0f}/s "
                    f"ratio_to_broker={throughput / bound:.2f} "
                    + (
                        f"orgs_register={orgs_rate:,.0f}/s "
                        f"ratio_to_orgs={throughput / orgs_rate:.2f} "
                        if orgs_n
                        else ""
                    )
                    + f"paced_p50={paced_p50 * 1000:.1f}ms paced_p99={paced_p99 * 1000:.1f}ms "
                    f"(target ≤ {TARGET_P99_MS:.0f} ms at {args.rate:.0f}/s) "
                    f"checks={'OK' if ok else 'FAILED'} "
                    f"machine_envelopes={speed.envelopes_per_s:,.0f}/s "
                    f"machine_sqlite_rows={speed.sqlite_rows_per_s:,.0f}/s"
                )
        except Exception:
            for service in services.values():
                if service.process.poll() is not None:
                    say(f"the {service.name} service exited with {service.process.returncode}")
                say(f"--- last lines of the {service.name} service log ---")
                say(service.last_log_lines())
            raise
        finally:
            for service in services.values():
                service.stop()
            await broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
