"""Benchmark: RegisterOrg commands end to end on the embedded stack, against its raw limits.

One run measures, on the same broker and the same kind of database:
  (a) the limits: the produce→consume round trip of N messages through the broker with aiokafka,
      and the single-row commit rate of the database;
  (b) N RegisterOrg commands from publish to CommandCompleted (the orgs service runs as its own
      process, as in production), then a paced run at a fixed rate for latency.
It prints throughput, p50/p99 latency and the ratio of (b) to the lower of
(broker rate ÷ messages per command, commit rate ÷ transactions per command).
Figures, not assertions: run it with `make bench` (or `python bench/orgs_throughput.py -n 20000`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import date, datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import Column, Integer, MetaData, String, Table, insert

from contracts.common import Document
from contracts.envelope import CONTENT_TYPE
from contracts.orgs import RegisterOrg
from contracts.topics import COMMAND_RESULTS, ORGS_COMMANDS, all_topics
from services.runtime.db import create_engine
from services.runtime.embedded_broker import EmbeddedBroker, ensure_topics, free_port

MESSAGES_PER_COMMAND = 3  # the command in, its event out, its result out
TRANSACTIONS_PER_COMMAND = 1  # inbox + state + outbox commit together (relay marks in batches)
ACTOR = {"actorid": "bench", "actorregion": "130000", "actorroles": "approver"}
DOC = Document(title="基准测试批复", number="冀编〔2026〕99号", date=date(2026, 1, 1))


def say(text: str) -> None:
    print(text, flush=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def broker_round_trip(bootstrap: str, n: int, partitions: int) -> float:
    """Messages per second through produce + consume of ``n`` 600-byte records."""
    topic = f"bench.roundtrip.{uuid.uuid4().hex[:6]}"
    await ensure_topics(bootstrap, [topic], partitions=partitions)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10
    )
    await producer.start()
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        value = b"x" * 600
        started = time.perf_counter()
        received = 0

        async def consume() -> None:
            nonlocal received
            while received < n:
                batches = await consumer.getmany(timeout_ms=100)
                received += sum(len(r) for r in batches.values())

        reader = asyncio.create_task(consume())
        futures = []
        for i in range(n):
            futures.append(await producer.send(topic, value, key=str(i).encode()))
        await asyncio.gather(*futures)
        await reader
        return n / (time.perf_counter() - started)
    finally:
        await consumer.stop()
        await producer.stop()


async def commit_rate(url: str, n: int) -> float:
    """Single-row transactions per second on the database at ``url``."""
    engine = create_engine(url)
    table = Table(
        "bench_rows", MetaData(), Column("id", Integer, primary_key=True), Column("v", String(64))
    )
    async with engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
    started = time.perf_counter()
    for i in range(n):
        async with engine.begin() as conn:
            await conn.execute(insert(table).values(v=f"row-{i}"))
    rate = n / (time.perf_counter() - started)
    await engine.dispose()
    return rate


def start_orgs(bootstrap: str, data_dir: Path, port: int, db_url: str | None) -> subprocess.Popen:
    env = {
        **os.environ,
        "BIANZHI_DATA_DIR": str(data_dir),
        "BIANZHI_KAFKA_BOOTSTRAP": bootstrap,
        "BIANZHI_KAFKA_SESSION_TIMEOUT_MS": "3000",
        "BIANZHI_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
        "BIANZHI_LOG_LEVEL": os.environ.get("BENCH_SERVICE_LOG_LEVEL", "WARNING"),
    }
    if db_url:
        env["BIANZHI_ORGS_DATABASE_URL"] = db_url
    log = open(data_dir / "orgs.log", "ab")  # noqa: SIM115 (lives as long as the process)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "services.orgs.entrypoints.app:create_app",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=log,
        stderr=log,
    )


async def wait_ready(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = await asyncio.to_thread(
                lambda: (
                    urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/health/ready", timeout=1
                    ).status
                )
            )
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("the orgs service did not become ready")


class Driver:
    """Publishes RegisterOrg commands and times each one until its result arrives."""

    def __init__(self, bootstrap: str, partitions: int) -> None:
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10
        )
        self.partitions = partitions
        self.sent: dict[str, float] = {}
        self.sent_wall: dict[str, float] = {}
        self.latency: dict[str, float] = {}
        # Where each command's time went (wall clock, one machine): until the service built its
        # result, until the relay handed the result to the producer, until it reached us.
        self.stages: dict[str, list[float]] = {"handled": [], "relayed": [], "delivered": []}
        self.rejected = 0
        self._done = asyncio.Event()
        self._expect = 0

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        tps = [TopicPartition(COMMAND_RESULTS, p) for p in range(self.partitions)]
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
            now = time.perf_counter()
            wall = time.time()
            for records in batches.values():
                for rec in records:
                    data = json.loads(rec.value)
                    cid = data["data"]["command_id"]
                    if cid in self.sent and cid not in self.latency:
                        self.latency[cid] = now - self.sent[cid]
                        built = datetime.fromisoformat(data["time"]).timestamp()
                        self.stages["handled"].append(built - self.sent_wall[cid])
                        self.stages["relayed"].append(rec.timestamp / 1000 - built)
                        self.stages["delivered"].append(wall - rec.timestamp / 1000)
                        if data["type"] != "bianzhi.CommandCompleted.v1":
                            self.rejected += 1
            if self._expect and len(self.latency) >= self._expect:
                self._done.set()

    def command(self, i: int) -> tuple[str, bytes, bytes]:
        org_id = uuid.uuid4()
        cmd = RegisterOrg(
            org_id=org_id,
            name=f"基准测试单位{i:06d}",
            kind="public_institution",
            division_code="130102",
            functions=["承担基准测试"],
            document=DOC,
        )
        env = cmd.envelope(source="/bench", **ACTOR)
        return env.id, str(org_id).encode(), env.to_bytes()

    async def run(self, n: int, rate: float | None, label: str) -> tuple[float, list[float]]:
        commands = [self.command(i) for i in range(n)]
        self.sent.clear()
        self.sent_wall.clear()
        self.latency.clear()
        for values in self.stages.values():
            values.clear()
        self.rejected = 0
        self._done.clear()
        self._expect = n
        started = time.perf_counter()
        futures = []
        for i, (cid, key, value) in enumerate(commands):
            if rate is not None:
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            self.sent[cid] = time.perf_counter()
            self.sent_wall[cid] = time.time()
            futures.append(
                await self.producer.send(
                    ORGS_COMMANDS, value, key=key, headers=[("content-type", CONTENT_TYPE.encode())]
                )
            )
            if (i + 1) % 5000 == 0:
                say(f"  {label}: {i + 1}/{n} published, {len(self.latency)} results")
        await asyncio.gather(*futures)
        last = 0
        while not self._done.is_set():
            try:
                await asyncio.wait_for(self._done.wait(), 5)
            except TimeoutError:
                if len(self.latency) == last:
                    raise RuntimeError(
                        f"{label}: stalled at {len(self.latency)}/{n} results"
                    ) from None
                last = len(self.latency)
                say(f"  {label}: {last}/{n} results")
        elapsed = time.perf_counter() - started
        return n / elapsed, list(self.latency.values())


def scrape(port: int) -> dict[str, float]:
    """The service's metrics page as {sample: value} (labels dropped, values summed)."""
    out: dict[str, float] = {}
    for line in fetch(f"http://127.0.0.1:{port}/metrics").splitlines():
        if line.startswith("bianzhi_") and " " in line:
            name, value = line.rsplit(" ", 1)
            base = name.split("{", 1)[0]
            out[base] = out.get(base, 0.0) + float(value)
    return out


def service_figures(before: dict[str, float], after: dict[str, float]) -> str:
    def mean(metric: str) -> float:
        count = after.get(f"{metric}_count", 0) - before.get(f"{metric}_count", 0)
        total = after.get(f"{metric}_sum", 0) - before.get(f"{metric}_sum", 0)
        return total / count if count else float("nan")

    return (
        f"mean message age at handling {mean('bianzhi_message_age_seconds') * 1000:.1f} ms, "
        f"mean batch {mean('bianzhi_batch_size'):.1f} commands, "
        f"mean handling {mean('bianzhi_handler_latency_seconds') * 1000:.1f} ms"
    )


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) a process has used so far; NaN for no process (``None``) and
    where /proc is missing.

    The service's CPU per command is the figure that survives a busy machine: wall-clock
    latencies on shared cores move with the other processes, CPU time hardly does.
    """
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_dir(tmp: str) -> Path:
    """BENCH_KEEP_DIR keeps the logs and databases of the run for a look afterwards."""
    path = Path(os.environ.get("BENCH_KEEP_DIR") or tmp)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="commands in the throughput run")
    parser.add_argument("--rate", type=float, default=200.0, help="commands/s in the paced run")
    parser.add_argument("--paced-seconds", type=float, default=15.0)
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument(
        "--database-url",
        default=None,
        help="orgs database (default: a SQLite file, the embedded default)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bianzhi-bench-") as tmp:
        data_dir = run_dir(tmp)
        broker = EmbeddedBroker(log_path=data_dir / "broker.log")
        await broker.start()
        service: subprocess.Popen | None = None
        port = 0
        try:
            await ensure_topics(broker.bootstrap, all_topics(), partitions=args.partitions)
            say(f"broker {broker.bootstrap}, {args.partitions} partitions per topic")

            say("(a) limits")
            broker_rate = await broker_round_trip(broker.bootstrap, args.n, args.partitions)
            say(f"  broker round trip (aiokafka produce+consume): {broker_rate:,.0f} msg/s")
            bench_db = args.database_url or f"sqlite+aiosqlite:///{data_dir / 'commit.db'}"
            db_rate = await commit_rate(bench_db, min(args.n, 5000))
            say(f"  database single-row commits: {db_rate:,.0f} tx/s")
            bound = min(broker_rate / MESSAGES_PER_COMMAND, db_rate / TRANSACTIONS_PER_COMMAND)
            say(
                f"  bound per command: min({broker_rate:,.0f}/{MESSAGES_PER_COMMAND}, "
                f"{db_rate:,.0f}/{TRANSACTIONS_PER_COMMAND}) = {bound:,.0f} commands/s"
            )

            port = free_port()
            service = start_orgs(broker.bootstrap, data_dir, port, args.database_url)
            await wait_ready(port)
            driver = Driver(broker.bootstrap, args.partitions)
            await driver.start()
            try:
                await driver.run(50, None, "warm-up")
                say(f"(b) {args.n} RegisterOrg commands, publish → CommandCompleted")
                cpu = cpu_seconds(service.pid)
                throughput, lat = await driver.run(args.n, None, "burst")
                burst_cpu = (cpu_seconds(service.pid) - cpu) / args.n * 1000
                say(
                    f"  throughput {throughput:,.0f} commands/s; latency under a full queue "
                    f"p50 {percentile(lat, 0.5) * 1000:,.0f} ms, "
                    f"p99 {percentile(lat, 0.99) * 1000:,.0f} ms; rejected {driver.rejected}; "
                    f"service CPU {burst_cpu:.2f} ms per command"
                )
                before = await asyncio.to_thread(scrape, port)
                paced_n = int(args.rate * args.paced_seconds)
                say(f"(c) paced: {paced_n} commands at {args.rate:.0f}/s")
                cpu = cpu_seconds(service.pid)
                _, plat = await driver.run(paced_n, args.rate, "paced")
                paced_cpu = (cpu_seconds(service.pid) - cpu) / paced_n * 1000
                say(
                    f"  latency p50 {percentile(plat, 0.5) * 1000:.1f} ms, "
                    f"p99 {percentile(plat, 0.99) * 1000:.1f} ms, "
                    f"mean {statistics.fmean(plat) * 1000:.1f} ms; rejected {driver.rejected}; "
                    f"service CPU {paced_cpu:.2f} ms per command"
                )
                after = await asyncio.to_thread(scrape, port)
                say("  service side, " + service_figures(before, after))
                say(
                    "  where it went (p50/p99 ms): "
                    + ", ".join(
                        f"{stage} {percentile(v, 0.5) * 1000:.0f}/{percentile(v, 0.99) * 1000:.0f}"
                        for stage, v in driver.stages.items()
                    )
                    + "  (handled: sent → result built; relayed: → handed to the producer; "
                    "delivered: → received)"
                )
            finally:
                await driver.stop()
            say("")
            say(
                f"RESULT throughput={throughput:,.0f}/s bound={bound:,.0f}/s "
                f"ratio={throughput / bound:.2f} (target ≥ 0.25) "
                f"paced_p99={percentile(plat, 0.99) * 1000:.1f}ms (target ≤ 50 ms at 200/s) "
                f"service_cpu={burst_cpu:.2f}/{paced_cpu:.2f}ms per command (burst/paced) "
                f"load={' '.join(f'{x:.1f}' for x in os.getloadavg())}"
            )
        except Exception:
            if service is not None and service.poll() is None:
                with contextlib.suppress(OSError):
                    page = await asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/metrics")
                    say("--- service metrics ---")
                    say("\n".join(ln for ln in page.splitlines() if ln.startswith("bianzhi_")))
            elif service is not None:
                say(f"the orgs service exited with {service.returncode}")
            log_file = data_dir / "orgs.log"
            if log_file.exists():
                say("--- last lines of the orgs service log ---")
                say("\n".join(log_file.read_text(errors="replace").splitlines()[-30:]))
            raise
        finally:
            if service is not None:
                service.send_signal(signal.SIGTERM)
                try:
                    service.wait(30)
                except subprocess.TimeoutExpired:
                    service.kill()
            await broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
