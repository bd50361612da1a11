"""Benchmark: the slot occupation round trip against the orgs command round trip, in one run.

One run, on one embedded broker (tansu) with orgs and quota as service processes (SQLite files by
default, or fresh PostgreSQL databases with ``--postgres URL``, dropped afterwards):
  (a) the limits: the raw produce→consume round trip of the broker (throughput, and the latency
      of one record at the paced rate);
  set-up: organs registered through the orgs service, a wait until quota's org projection has
      them (``GET /orgs/{id}/establishment`` answers 200), then per org an ``ApproveQuota`` and an
      ``IssueQuotaUseNotice`` with room for every occupation of the run (several orgs, so quota's
      work, keyed by org, spreads over partitions);
  (b) orgs: N ``RegisterOrg`` commands at ``--rate``/s, each timed from publish to its
      ``OrgRegistered`` on ``bianzhi.orgs.events.v1`` (command in → event out): p50/p99;
  (c) quota: N ``OccupySlot`` commands sent as the roster sends them (message id = request_id,
      a clerk of the orgs' region, keyed by org_id), same rate, each timed from publish to its
      ``SlotOccupied`` on ``bianzhi.quota.events.v1``: p50/p99;
  (d) the ratio slot/orgs at p50 and p99 (target ≤ 2×, printed, never asserted) and the checks:
      every command got exactly one event and exactly one ``CommandCompleted``, and quota's
      occupied count over the measured orgs equals N.
Figures, not assertions: ``python bench/quota_slot_roundtrip.py`` (``-n 500`` for a quick run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from orgs_throughput import broker_round_trip, cpu_seconds, percentile, run_dir, say
from roster_enrol import (
    APPROVER,
    CLERK,
    DOC,
    Metrics,
    Service,
    broker_latency,
    counties,
    databases,
    delta,
    load,
    mean_of,
    quota_commands,
    scrape,
    wait_for,
)

from contracts.codes import Category, OrgKind
from contracts.envelope import CONTENT_TYPE
from contracts.orgs import OrgRegistered, RegisterOrg
from contracts.quota import OccupySlot, SlotOccupied
from contracts.topics import COMMAND_RESULTS, ORGS_EVENTS, QUOTA_EVENTS, all_topics
from services.runtime.embedded_broker import EmbeddedBroker, ensure_topics

COMPLETED = "bianzhi.CommandCompleted.v1"
TARGET_RATIO = 2.0  # slot round trip ≤ 2× the orgs command round trip
WARM_UP = 50
STALL_S = 60  # no new answer for this long ends the run as stalled
# Where a command's time went, from one machine's clock: the event's envelope time (when the
# handler built it) and its record's broker timestamp (when the relay handed it to the producer).
STAGES = (
    ("handled", "sent → event built (delivery, queueing, handling)"),
    ("relayed", "→ event handed to the producer by the service's relay"),
    ("delivered", "→ received here"),
)

# (command id, topic, key, value, the event that answers it as (type, id in its data) or None)
Command = tuple[str, str, bytes, bytes, tuple[str, str] | None]


def stamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


class Follower:
    """Publishes commands and follows each to its event (orgs and quota events) and its result."""

    def __init__(self, bootstrap: str, partitions: int) -> None:
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10
        )
        self.partitions = partitions
        self.sent: dict[str, float] = {}
        self.sent_wall: dict[str, float] = {}
        self.answers: dict[tuple[str, str], str] = {}  # (event type, id in data) → command id
        self.latency: dict[str, float] = {}  # command id → publish to its event
        self.marks: dict[str, tuple[float, float, float]] = {}  # event built, relayed, received
        self.events = Counter[str]()  # command id → its events seen (must end at exactly 1)
        self.results = Counter[str]()  # command id → results seen (must end at exactly 1)
        self.outcome: dict[str, str] = {}  # command id → "completed" or the rejection code
        self._pending: set[str] = set()  # commands of the current run still without an answer
        self._by_event = True
        self._done = asyncio.Event()

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        tps = [
            TopicPartition(topic, p)
            for topic in (COMMAND_RESULTS, ORGS_EVENTS, QUOTA_EVENTS)
            for p in range(self.partitions)
        ]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.consumer.stop()
        await self.producer.stop()

    async def _read(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=50)
            now, wall = time.perf_counter(), time.time()
            for tp, records in batches.items():
                for rec in records:
                    self._record(tp.topic, rec, now, wall)
            if not self._pending:
                self._done.set()

    def _record(self, topic: str, rec: Any, now: float, wall: float) -> None:
        data = json.loads(rec.value)
        if topic == COMMAND_RESULTS:
            result = data["data"]
            cid = result["command_id"]
            if cid in self.sent:
                self.results[cid] += 1
                self.outcome.setdefault(
                    cid, "completed" if data["type"] == COMPLETED else str(result.get("code"))
                )
                if cid in self._pending and self._answered(cid):
                    self._pending.discard(cid)
            return
        body = data["data"]
        ref = body.get("request_id") if data["type"] == SlotOccupied.TYPE else body.get("org_id")
        cid = self.answers.get((data["type"], str(ref)))
        if cid is None:
            return
        self.events[cid] += 1
        if cid not in self.latency:
            self.latency[cid] = now - self.sent[cid]
            self.marks[cid] = (stamp(data["time"]), rec.timestamp / 1000, wall)
            if cid in self._pending and self._answered(cid):
                self._pending.discard(cid)

    def _answered(self, cid: str) -> bool:
        if cid in self.outcome and self.outcome[cid] != "completed":
            return True  # rejected: no event will come
        return cid in self.latency if self._by_event else cid in self.outcome

    async def run(self, commands: list[Command], rate: float | None, label: str) -> None:
        """Publish the commands, at ``rate``/s or at once; return when each has its event (or,
        for commands without one, its result), or a rejection."""
        ids = [c[0] for c in commands]
        self._by_event = all(c[4] is not None for c in commands)
        for cid, _, _, _, answer in commands:
            if answer is not None:
                self.answers[answer] = cid
        self._done.clear()
        self._pending = set(ids)
        started = time.perf_counter()
        futures = []
        headers = [("content-type", CONTENT_TYPE.encode())]
        for i, (cid, topic, key, value, _) in enumerate(commands):
            if rate is not None:
                pause = started + i / rate - time.perf_counter()
                if pause > 0:
                    await asyncio.sleep(pause)
            self.sent[cid] = time.perf_counter()
            self.sent_wall[cid] = time.time()
            futures.append(await self.producer.send(topic, value, key=key, headers=headers))
        await asyncio.gather(*futures)
        last, quiet = -1, 0.0
        while not self._done.is_set():
            try:
                await asyncio.wait_for(self._done.wait(), 5)
            except TimeoutError:
                answered = sum(1 for c in ids if self._answered(c))
                quiet = quiet + 5 if answered == last else 0.0
                if quiet >= STALL_S:
                    raise RuntimeError(
                        f"{label}: stalled at {answered}/{len(ids)} answers"
                    ) from None
                last = answered
                say(f"  {label}: {answered}/{len(ids)} answered")

    def rejected(self, ids: Iterable[str]) -> Counter[str]:
        return Counter(
            code for i in ids if (code := self.outcome.get(i, "completed")) != "completed"
        )

    def stages(self, ids: Iterable[str]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {name: [] for name, _ in STAGES}
        for cid in ids:
            if cid in self.marks:
                marks = [self.sent_wall[cid], *self.marks[cid]]
                for (name, _), a, b in zip(STAGES, marks[:-1], marks[1:], strict=True):
                    out[name].append(b - a)
        return out


# --- the workload ----------------------------------------------------------------------------


def register_orgs(
    count: int, places: list[str], kind: OrgKind, tag: str
) -> tuple[list[Command], list[tuple[uuid.UUID, str, bytes]]]:
    """``RegisterOrg`` commands (an approver of the province) answered by their
    ``OrgRegistered``, and the orgs as (org_id, division, b"")."""
    commands: list[Command] = []
    orgs: list[tuple[uuid.UUID, str, bytes]] = []
    for i in range(count):
        org_id = uuid.uuid4()
        division = places[i % len(places)]
        env = RegisterOrg(
            org_id=org_id,
            name=f"基准测试单位{tag}{i:05d}",
            kind=kind,
            division_code=division,
            functions=["承担基准测试"],
            document=DOC,
        ).envelope(source="/bench", **APPROVER)
        key = str(org_id).encode()
        commands.append(
            (env.id, RegisterOrg.TOPIC, key, env.to_bytes(), (OrgRegistered.TYPE, str(org_id)))
        )
        orgs.append((org_id, division, b""))
    return commands, orgs


def occupations(
    n: int, orgs: list[tuple[uuid.UUID, str, bytes]], notices: list[str]
) -> list[Command]:
    """``OccupySlot`` commands as the roster sends them: message id = request_id, the actor a
    clerk of the province, keyed by org_id; round-robin over the orgs."""
    out: list[Command] = []
    for i in range(n):
        org_id, _, _ = orgs[i % len(orgs)]
        request_id = uuid.uuid4()
        env = OccupySlot(
            request_id=request_id,
            person_id=uuid.uuid4(),
            org_id=org_id,
            category=Category.ADMIN,
            notice_no=notices[i % len(orgs)],
        ).envelope(source="/roster", id=str(request_id), **CLERK)
        out.append(
            (
                env.id,
                OccupySlot.TOPIC,
                str(org_id).encode(),
                env.to_bytes(),
                (SlotOccupied.TYPE, str(request_id)),
            )
        )
    return out


async def set_up(
    follower: Follower, quota: Service, count: int, places: int
) -> tuple[list[tuple[uuid.UUID, str, bytes]], list[str]]:
    """``count`` organs registered through orgs, projected by quota, approved and noticed."""
    commands, orgs = register_orgs(count, counties(), OrgKind.ORGAN, "机关")
    await follower.run(commands, None, "set-up orgs")
    if refused := follower.rejected(c[0] for c in commands):
        raise RuntimeError(f"set-up RegisterOrg rejected: {dict(refused)}")

    async def projected() -> bool:
        for org_id, _, _ in orgs:
            if (await quota.get(f"/orgs/{org_id}/establishment"))[0] != 200:
                return False
        return True

    await wait_for(projected, "quota to project the orgs")
    approvals, notices, numbers = quota_commands(orgs, places, uuid.uuid4().hex[:6])
    for label, batch in (("approvals", approvals), ("notices", notices)):
        await follower.run([(*c, None) for c in batch], None, f"set-up {label}")
        if refused := follower.rejected(c[0] for c in batch):
            raise RuntimeError(f"set-up {label} rejected: {dict(refused)}")
    return orgs, numbers


async def projected_all(quota: Service, registered: int) -> None:
    """Wait until quota has handled every OrgRegistered of the run (its org projection)."""

    async def done() -> bool:
        metrics = await asyncio.to_thread(scrape, quota)
        return (
            delta({}, metrics, "bianzhi_messages_handled_total", type=OrgRegistered.TYPE)
            >= registered
        )

    await wait_for(done, "quota to project every OrgRegistered")


def report(follower: Follower, label: str, ids: list[str]) -> tuple[float, float]:
    lat = [follower.latency[i] for i in ids if i in follower.latency]
    p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
    say(
        f"  {label}: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
        f"mean {statistics.fmean(lat) * 1000:.1f} ms over {len(lat)}; "
        f"rejected {dict(follower.rejected(ids)) or 0}"
    )
    stages = follower.stages(ids)
    say(
        "  where it went (p50/p99 ms): "
        + ", ".join(
            f"{name} {percentile(v, 0.5) * 1000:.1f}/{percentile(v, 0.99) * 1000:.1f}"
            for name, v in stages.items()
        )
        + "  ("
        + "; ".join(f"{name}: {meaning}" for name, meaning in STAGES)
        + ")"
    )
    return p50, p99


def service_side(
    label: str, service: Service, command: str, before: Metrics, after: Metrics, cpu: float, n: int
) -> None:
    """What the service itself saw of the run (its /metrics) and the CPU it spent per command."""
    name = service.name
    fetches = delta(before, after, "bianzhi_batch_size_count", service=name)
    age = mean_of(before, after, "bianzhi_message_age_seconds", service=name)
    handling = mean_of(before, after, "bianzhi_handler_latency_seconds", type=command)
    say(
        f"  {label} service side: {fetches:.0f} fetches, mean batch "
        f"{mean_of(before, after, 'bianzhi_batch_size', service=name):.1f} commands, mean age "
        f"at handling {age * 1000:.1f} ms, mean transaction a command waited in "
        f"{handling * 1000:.1f} ms (its batch's); relay published "
        f"{delta(before, after, 'bianzhi_outbox_published_total', service=name):.0f} outbox "
        f"rows; {name} CPU {cpu / n * 1000:.2f} ms per command"
    )


async def idle_cpu(services: dict[str, Service], seconds: float = 5.0) -> None:
    """CPU the services use with no traffic (their consumers' and relays' polling): a floor
    under the CPU per command figures below, which count it over the run."""
    before = {name: cpu_seconds(s.process.pid) for name, s in services.items()}
    await asyncio.sleep(seconds)
    used = {name: cpu_seconds(s.process.pid) - before[name] for name, s in services.items()}
    say(
        f"  idle CPU over {seconds:.0f} s: "
        + ", ".join(f"{name} {sec / seconds:.0%} of a core" for name, sec in used.items())
    )


async def verify(
    follower: Follower,
    label: str,
    ids: list[str],
) -> bool:
    """Exactly one event and exactly one CommandCompleted per command."""
    once = sum(1 for i in ids if follower.events[i] == 1 and follower.results[i] == 1)
    no_event = sum(1 for i in ids if follower.events[i] == 0)
    extra = sum(1 for i in ids if follower.events[i] > 1 or follower.results[i] > 1)
    no_result = sum(1 for i in ids if follower.results[i] == 0)
    refused = follower.rejected(ids)
    ok = once == len(ids) and not refused
    say(
        f"  {label}: {len(ids)} commands, {once} with exactly one event and one result; "
        f"{no_event} without event, {no_result} without result, {extra} answered more than "
        f"once; rejected {dict(refused) or 0}"
    )
    return ok


async def occupied(quota: Service, orgs: list[tuple[uuid.UUID, str, bytes]]) -> int:
    total = 0
    for org_id, _, _ in orgs:
        status, body = await quota.get(f"/orgs/{org_id}/establishment")
        if status != 200:
            raise RuntimeError(f"quota answered {status} for org {org_id}")
        total += sum(cat["occupied"] for cat in body["categories"])
    return total


# --- main ------------------------------------------------------------------------------------


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1_000, help="commands per measured run")
    parser.add_argument("--rate", type=float, default=100.0, help="commands/s in both runs")
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--orgs", type=int, default=12, help="orgs the occupations spread over")
    parser.add_argument(
        "--postgres",
        default=None,
        metavar="URL",
        help="a PostgreSQL server (postgresql+asyncpg://…): fresh databases for the services "
        "(default: SQLite files, the embedded default)",
    )
    args = parser.parse_args()
    places = math.ceil(args.n / args.orgs) + 1

    with tempfile.TemporaryDirectory(prefix="bianzhi-bench-") as tmp:
        data_dir = run_dir(tmp)
        broker = EmbeddedBroker(log_path=data_dir / "broker.log")
        await broker.start()
        services: dict[str, Service] = {}
        try:
            async with databases(args.postgres, ["orgs", "quota"]) as urls:
                await ensure_topics(broker.bootstrap, all_topics(), partitions=args.partitions)
                say(
                    f"broker {broker.bootstrap}, {args.partitions} partitions per topic; "
                    f"database {'PostgreSQL' if urls else 'SQLite files'}; "
                    f"{os.cpu_count()} cores, load average {load()} (the machine is shared)"
                )
                say("(a) limits: the raw broker")
                broker_rate = await broker_round_trip(broker.bootstrap, args.n, args.partitions)
                raw = await broker_latency(broker.bootstrap, args.rate, min(args.n / args.rate, 5))
                raw_p50, raw_p99 = percentile(raw, 0.5), percentile(raw, 0.99)
                say(
                    f"  round trip (aiokafka produce+consume, 600 B): {broker_rate:,.0f} msg/s; "
                    f"one record at {args.rate:.0f}/s: p50 {raw_p50 * 1000:.1f} ms, "
                    f"p99 {raw_p99 * 1000:.1f} ms (a command → event round trip crosses the "
                    "broker twice)"
                )

                for name in ("orgs", "quota"):
                    env = {f"BIANZHI_{name.upper()}_DATABASE_URL": urls[name]} if urls else {}
                    services[name] = Service(name, broker.bootstrap, data_dir, env, None)
                for service in services.values():
                    await service.wait_ready()
                quota = services["quota"]
                follower = Follower(broker.bootstrap, args.partitions)
                await follower.start()
                try:
                    say(
                        f"set-up: {args.orgs} organs (+1 for the warm-up) through orgs, each "
                        f"{places} admin places approved and one notice of as many"
                    )
                    orgs, notices = await set_up(follower, quota, args.orgs + 1, places)
                    warm_org, measured = orgs[:1], orgs[1:]
                    registered = args.orgs + 1
                    await idle_cpu(services)

                    say(
                        f"(b) orgs: {args.n} RegisterOrg at {args.rate:.0f}/s, "
                        f"publish → OrgRegistered on {ORGS_EVENTS}"
                    )
                    warm, _ = register_orgs(WARM_UP, ["130102"], OrgKind.PUBLIC_INSTITUTION, "预热")
                    await follower.run(warm, None, "orgs warm-up")
                    register, _ = register_orgs(
                        args.n, ["130102"], OrgKind.PUBLIC_INSTITUTION, "测量"
                    )
                    orgs_service = services["orgs"]
                    m0 = await asyncio.to_thread(scrape, orgs_service)
                    cpu = cpu_seconds(orgs_service.process.pid)
                    await follower.run(register, args.rate, "orgs")
                    cpu = cpu_seconds(orgs_service.process.pid) - cpu
                    m1 = await asyncio.to_thread(scrape, orgs_service)
                    registered += WARM_UP + args.n
                    org_ids = [c[0] for c in register]
                    orgs_p50, orgs_p99 = report(follower, "orgs round trip", org_ids)
                    service_side("orgs", orgs_service, RegisterOrg.TYPE, m0, m1, cpu, args.n)
                    say(f"  load average {load()}")
                    await projected_all(quota, registered)

                    say(
                        f"(c) quota: {args.n} OccupySlot at {args.rate:.0f}/s over "
                        f"{len(measured)} orgs, publish → SlotOccupied on {QUOTA_EVENTS}"
                    )
                    await follower.run(
                        occupations(WARM_UP, warm_org, notices[:1]), None, "slot warm-up"
                    )
                    slots = occupations(args.n, measured, notices[1:])
                    m0 = await asyncio.to_thread(scrape, quota)
                    cpu = cpu_seconds(quota.process.pid)
                    await follower.run(slots, args.rate, "slot")
                    cpu = cpu_seconds(quota.process.pid) - cpu
                    m1 = await asyncio.to_thread(scrape, quota)
                    slot_ids = [c[0] for c in slots]
                    slot_p50, slot_p99 = report(follower, "slot round trip", slot_ids)
                    service_side("quota", quota, OccupySlot.TYPE, m0, m1, cpu, args.n)
                    say(f"  load average {load()}")

                    say("(d) checks")
                    await asyncio.sleep(3)  # a duplicate would come soon after the first
                    ok = await verify(follower, "RegisterOrg", org_ids)
                    ok = await verify(follower, "OccupySlot", slot_ids) and ok
                    count = await occupied(quota, measured)
                    say(
                        f"  quota occupied over the {len(measured)} measured orgs: {count} "
                        f"(sent {args.n}): {'equal' if count == args.n else 'DIFFERENT'}"
                    )
                    ok = ok and count == args.n
                finally:
                    await follower.stop()

                say("")
                say(
                    f"RESULT n={args.n} rate={args.rate:.0f}/s "
                    f"broker_p50={raw_p50 * 1000:.1f}ms broker_p99={raw_p99 * 1000:.1f}ms "
                    f"orgs_p50={orgs_p50 * 1000:.1f}ms orgs_p99={orgs_p99 * 1000:.1f}ms "
                    f"slot_p50={slot_p50 * 1000:.1f}ms slot_p99={slot_p99 * 1000:.1f}ms "
                    f"ratio_p50={slot_p50 / orgs_p50:.2f} ratio_p99={slot_p99 / orgs_p99:.2f} "
                    f"(target ≤ {TARGET_RATIO:.0f}×) checks={'OK' if ok else 'FAILED'} "
                    f"load={load()}"
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
