"""`bianzhi up`: the whole platform on one machine, supervised.

The embedded broker (tansu) keeps everything in memory, so every `bianzhi up` starts it empty:
topics are created again and, when the service databases hold outbox rows, those rows are
re-published so that consumers see what the lost broker held (their inboxes skip what they have
already handled). Each service then runs as its own uvicorn process. Whatever stops — the broker
or a service — stops the platform: it fails loudly rather than running half-broken.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from aiokafka.structs import TopicPartition

from contracts.topics import SERVICES, all_topics
from services.cli.common import (
    CliError,
    Platform,
    existing_services,
    kafka_errors,
    kafka_options,
    load_settings,
    make_consumer,
    platform_path,
    port_number,
    positive_float,
    read_platform,
    say,
    topic_partitions,
    write_platform,
)
from services.cli.keys import create_key
from services.cli.migrate import migrate_services
from services.cli.replay import outbox_rows, replay_service
from services.runtime.broker import make_broker
from services.runtime.embedded_broker import (
    BrokerStartError,
    EmbeddedBroker,
    ensure_topics,
    free_port,
)
from services.runtime.processes import die_with_parent
from services.runtime.settings import Settings, embedded_overrides

BROKER_HOST = "127.0.0.1"  # the embedded broker has no authentication: loopback only
DRAIN_TIMEOUT_S = 20.0
CLIFF_CHECK_INTERVAL_S = 60.0
CLIFF_WARN_AT = 10_000
LOG_TAIL_LINES = 30
BEGINNING_OF_TIME = datetime(1970, 1, 1, tzinfo=UTC)
# Keys `bianzhi up` generates in DATA/keys: commands (with --require-signatures) and audit
# checkpoints. Development keys of one data directory, never a production key.
DEV_KID = "bianzhi-dev"
AUDIT_DEV_KID = "bianzhi-audit-dev"


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "up",
        help="run the whole platform on this machine",
        description=(
            "Start the embedded broker (or use --kafka), migrate the service databases, "
            "start every service and supervise them. When all are ready one line "
            "`bianzhi ready broker=… orgs=http://… …` goes to stdout and DATA/platform.json is "
            "written. Ctrl-C or SIGTERM drains the services and stops everything. If the "
            "broker or any service stops, the platform stops (exit 1)."
        ),
        epilog=(
            "The embedded broker is memory-only: every start is a fresh broker. Database state "
            "is kept, and the retained outbox rows are re-published to the fresh broker."
        ),
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="databases, logs and platform.json (default: $BIANZHI_DATA_DIR or ./data)",
    )
    parser.add_argument(
        "--broker-port",
        type=port_number,
        metavar="P",
        help="port of the embedded broker on 127.0.0.1 (default: a free port)",
    )
    parser.add_argument(
        "--http-port",
        type=port_number,
        default=8080,
        metavar="H",
        help="orgs listens on H, quota on H+1, roster on H+2, notify on H+3 (default 8080)",
    )
    parser.add_argument(
        "--kafka",
        metavar="BOOTSTRAP",
        help="use this Kafka instead of the embedded broker (its topics are created if missing)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address the services listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default="INFO",
        help="of bianzhi up and of the services (default INFO)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start with an empty broker. This is always so with the embedded broker (it keeps "
        "nothing across restarts); the flag is accepted so that the advice printed near the "
        "broker's per-partition limit can name it. Not allowed with --kafka.",
    )
    parser.add_argument(
        "--require-signatures",
        action="store_true",
        help="services refuse unsigned commands (the production default, docs/security.md); a "
        f"dev key pair {DEV_KID!r} is generated in DATA/keys, the services accept every public "
        "key there and sign their own saga steps with it, and `bianzhi send`, `import` and "
        "`demo` sign with it while this platform runs",
    )
    parser.add_argument(
        "--ready-timeout",
        type=positive_float,
        default=60.0,
        metavar="S",
        help="seconds each service may take to become ready (default 60)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.fresh and args.kafka:
        raise CliError("--fresh: only the embedded broker can start fresh; drop it with --kafka")
    settings = load_settings(data_dir=args.data_dir, log_level=args.log_level)
    data_dir = settings.data_dir.resolve()
    settings = load_settings(data_dir=data_dir, log_level=args.log_level)
    names = existing_services()
    if not names:
        raise CliError("no services are installed (services/<svc>/bootstrap.py)")
    running = read_platform(data_dir)
    if running is not None:
        raise CliError(
            f"--data-dir {data_dir}: a platform is already running from it (pid {running.pid},"
            f" broker {running.broker}); stop it first"
        )
    ports = {svc: args.http_port + SERVICES.index(svc) for svc in names}
    _check_ports(args.host, ports, args.broker_port if not args.kafka else None)
    data_dir.mkdir(parents=True, exist_ok=True)
    up = Up(
        settings=settings,
        services=names,
        host=args.host,
        ports=ports,
        kafka=args.kafka,
        broker_port=args.broker_port,
        ready_timeout_s=args.ready_timeout,
        require_signatures=args.require_signatures,
    )
    return asyncio.run(up.run())


def dev_key(keys: Path, kid: str) -> Path:
    """The private key file of ``kid`` in ``keys``, generated on first use (embedded only)."""
    private = keys / f"{kid}.key.pem"
    if not private.exists():
        create_key(keys, kid)
        say(f"generated the dev key {kid} in {keys}")
    return private


def _check_ports(host: str, ports: dict[str, int], broker_port: int | None) -> None:
    for svc, port in ports.items():
        if port > 65_535:
            raise CliError(
                f"--http-port: {svc} would listen on {port}; expected a base port of at most "
                f"{65_535 - SERVICES.index(svc)}"
            )
        if _port_in_use(host, port):
            raise CliError(
                f"--http-port: port {port} on {host} (for {svc}) is in use;"
                " pick another --http-port"
            )
    if broker_port is not None and _port_in_use(BROKER_HOST, broker_port):
        raise CliError(f"--broker-port {broker_port}: the port is in use on {BROKER_HOST}")


def _port_in_use(host: str, port: int) -> bool:
    # SO_REUSEADDR as uvicorn and tansu bind: a port in TIME_WAIT counts as free.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


class StartupFailed(Exception):
    """A service did not become ready; the message names it and quotes its log."""


@dataclass
class ServiceProcess:
    name: str
    url: str
    log_path: Path
    process: asyncio.subprocess.Process
    log_offset: int = 0

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.log_offset)
                text = log.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        tail = text.strip().splitlines()[-lines:]
        if not tail:
            return f"({self.log_path} is empty)"
        return f"last lines of {self.log_path}:\n" + "\n".join(tail)


@dataclass
class Up:
    """One run of the platform: start, supervise, stop."""

    settings: Settings
    services: list[str]
    host: str
    ports: dict[str, int]
    kafka: str | None = None
    broker_port: int | None = None
    ready_timeout_s: float = 60.0
    require_signatures: bool = False
    broker: EmbeddedBroker | None = None
    bootstrap: str = ""
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _force: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _wrote_platform: bool = field(default=False, init=False)

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal)
        try:
            return await self._run()
        finally:
            await self.shutdown()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    def _on_signal(self) -> None:
        if self._stop.is_set():
            self._force.set()  # a second Ctrl-C: do not wait for the services to drain
        self._stop.set()

    async def _run(self) -> int:
        started = loop_time()
        starting = asyncio.create_task(self.start())
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not starting.done():
            say("stopping before the platform was ready")
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return 0
        try:
            starting.result()
        except StartupFailed as exc:
            sys.stderr.write(f"bianzhi: {exc}\n")
            return 1
        except BrokerStartError as exc:
            sys.stderr.write(f"bianzhi: {exc}\n")
            return 1
        self._announce(loop_time() - started)
        return await self.supervise()

    # start -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.kafka:
            self.bootstrap = self.kafka
        else:
            self.broker = EmbeddedBroker(
                port=self.broker_port,
                host=BROKER_HOST,
                log_path=self.data_dir / "broker.log",
                worker_threads=self.settings.embedded_broker_threads,
            )
            await self.broker.start()
            self.bootstrap = self.broker.bootstrap
            say(f"embedded broker on {self.bootstrap} (pid {self.broker.pid})")
        self.settings = self.settings.model_copy(update={"kafka_bootstrap": self.bootstrap})
        async with kafka_errors(self.bootstrap):
            created = await ensure_topics(
                self.bootstrap,
                all_topics(),
                self.settings.kafka_topic_partitions,
                replication=self.settings.kafka_replication_factor,
                client_options=kafka_options(self.settings),
            )
        if created:
            partitions = self.settings.kafka_topic_partitions
            say(f"created {len(created)} topics with {partitions} partitions each")
        await migrate_services(self.services, self.settings)
        say(f"databases at the latest schema: {', '.join(self.services)}")
        if created:
            await self.recover()
        await asyncio.gather(*(self._spawn(svc) for svc in self.services))
        await asyncio.gather(*(self.wait_ready(p) for p in self.processes.values()))

    async def recover(self) -> None:
        """A fresh broker has lost every message: publish the retained outbox rows again."""
        counts = {svc: await outbox_rows(svc, self.settings) for svc in self.services}
        total = sum(counts.values())
        if not total:
            return
        detail = ", ".join(f"{svc} {n:,}" for svc, n in counts.items() if n)
        say(
            f"fresh broker: re-publishing {total:,} retained outbox rows ({detail}); "
            "consumers skip what they have already handled"
        )
        broker = make_broker(self.settings, client_id="bianzhi-up-recovery")
        async with kafka_errors(self.bootstrap):
            await broker.connect()
        try:
            for svc, count in counts.items():
                if count:
                    await replay_service(
                        svc, self.settings, BEGINNING_OF_TIME, broker=broker, check_topics=False
                    )
        finally:
            await broker.stop()
        say(f"re-published {total:,} outbox rows")

    def _service_env(self) -> dict[str, str]:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # holds `services` and `contracts`
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env["BIANZHI_DATA_DIR"] = str(self.data_dir)
        env["BIANZHI_KAFKA_BOOTSTRAP"] = self.bootstrap
        env["BIANZHI_MIGRATE_ON_START"] = "false"  # migrated above, once, before anyone starts
        env["BIANZHI_LOG_LEVEL"] = self.settings.log_level
        keys = self.data_dir / "keys"
        if "BIANZHI_AUDIT_SIGNING_PRIVATE_KEY" not in env:
            # Audit checkpoints are signed with a dev key of the data directory.
            env["BIANZHI_AUDIT_SIGNING_PRIVATE_KEY"] = str(dev_key(keys, AUDIT_DEV_KID))
            env["BIANZHI_AUDIT_SIGNING_KID"] = AUDIT_DEV_KID
        if self.require_signatures:
            env["BIANZHI_REQUIRE_SIGNATURES"] = "true"
            env["BIANZHI_SIGNING_PUBLIC_KEYS"] = str(keys)
            # Saga steps one service sends another are signed like a front-end's commands.
            env["BIANZHI_SIGNING_PRIVATE_KEY"] = str(dev_key(keys, DEV_KID))
            env["BIANZHI_SIGNING_KID"] = DEV_KID
        if self.broker is not None:
            # Real Kafka needs longer session timeouts (and wants idempotence); the settings of
            # the environment decide there.
            for name, value in embedded_overrides().items():
                env[f"BIANZHI_{name.upper()}"] = str(value).lower()
        return env

    async def _spawn(self, svc: str) -> None:
        port = self.ports[svc]
        log_path = self.data_dir / "logs" / f"{svc}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            f"services.{svc}.entrypoints.app:create_app",
            "--host",
            self.host,
            "--port",
            str(port),
            "--no-access-log",
        ]
        with log_path.open("a", encoding="utf-8") as log:
            log.write(f"--- bianzhi up: starting {svc} at {datetime.now(UTC).isoformat()} ---\n")
            log.flush()
            offset = log.tell()
            process = await _spawn_child(argv, self._service_env(), log)
        url = f"http://{self.host}:{port}"
        self.processes[svc] = ServiceProcess(svc, url, log_path, process, offset)
        say(f"started {svc} on {url} (pid {process.pid})")

    async def wait_ready(self, proc: ServiceProcess) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout_s
        probe_host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        url = f"http://{probe_host}:{self.ports[proc.name]}/health/ready"
        while True:
            if self.broker is not None and not self.broker.running:
                raise StartupFailed(
                    f"the broker stopped while {proc.name} was starting; see {self.broker.log_path}"
                )
            if proc.process.returncode is not None:
                raise StartupFailed(
                    f"service {proc.name} exited during start-up (status "
                    f"{proc.process.returncode}); {proc.log_tail()}"
                )
            if await asyncio.to_thread(_is_ready, url):
                return
            if loop.time() > deadline:
                raise StartupFailed(
                    f"service {proc.name} was not ready within {self.ready_timeout_s:g} s "
                    f"({url}); {proc.log_tail()}"
                )
            await asyncio.sleep(0.2)

    def _announce(self, took_s: float) -> None:
        urls = {svc: self.processes[svc].url for svc in self.services}
        platform = Platform(
            broker=self.bootstrap,
            services=urls,
            pid=os.getpid(),
            started_at=datetime.now(UTC).isoformat(),
            signing_key=str(self.data_dir / "keys" / f"{DEV_KID}.key.pem")
            if self.require_signatures
            else None,
            signing_kid=DEV_KID if self.require_signatures else None,
        )
        write_platform(self.data_dir, platform)
        self._wrote_platform = True
        say(f"ready in {took_s:.1f} s")
        line = " ".join([f"broker={self.bootstrap}", *(f"{k}={v}" for k, v in urls.items())])
        sys.stdout.write(f"bianzhi ready {line}\n")
        sys.stdout.flush()

    # supervise ---------------------------------------------------------------------------

    async def supervise(self) -> int:
        """Wait for a stop signal, or for the broker or a service to stop (then exit 1)."""
        watches: dict[asyncio.Task[Any], str] = {
            asyncio.create_task(self._stop.wait()): "signal",
        }
        for svc, proc in self.processes.items():
            watches[asyncio.create_task(proc.process.wait())] = svc
        if self.broker is not None:
            watches[asyncio.create_task(self.broker.wait_exit())] = "broker"
            watches[asyncio.create_task(self._watch_cliff())] = "cliff"
        try:
            done, _ = await asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in watches:
                task.cancel()
            await asyncio.gather(*watches, return_exceptions=True)
        what = watches[next(iter(done))]
        if what == "signal":
            say("stopping: draining the services")
            return 0
        if what == "broker":
            say("the broker stopped unexpectedly; stopping all services (restart with bianzhi up)")
            return 1
        if what == "cliff":  # the watch never returns unless it broke
            say("the broker watch stopped unexpectedly; stopping all services")
            return 1
        proc = self.processes[what]
        say(
            f"service {what} exited unexpectedly (status {proc.process.returncode}); stopping all"
            f" services (restart with bianzhi up); {proc.log_tail()}"
        )
        return 1

    async def _watch_cliff(self) -> None:
        warned: set[tuple[str, int]] = set()
        while True:
            await asyncio.sleep(CLIFF_CHECK_INTERVAL_S)
            try:
                over = await partitions_past(self.settings, all_topics(), CLIFF_WARN_AT)
            except Exception as exc:  # a watch must not stop the platform
                say(f"could not check the broker's partitions: {exc}")
                continue
            new = [(t, p, n) for t, p, n in over if (t, p) not in warned]
            if new:
                warned.update((t, p) for t, p, _ in new)
                say(cliff_warning(over))

    # stop --------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """SIGTERM the services, wait for them to drain, SIGKILL stragglers, stop the broker."""
        running = [p for p in self.processes.values() if p.process.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.process.send_signal(signal.SIGTERM)
        if running:
            waits = asyncio.gather(*(p.process.wait() for p in running))
            force = asyncio.create_task(self._force.wait())
            await asyncio.wait(
                {waits, force}, timeout=DRAIN_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
            force.cancel()
            stragglers = [p for p in running if p.process.returncode is None]
            for proc in stragglers:
                say(f"service {proc.name} did not stop in time; killing it")
                with contextlib.suppress(ProcessLookupError):
                    proc.process.kill()
            await waits
        if self.broker is not None:
            await self.broker.stop()
        if self._wrote_platform:
            current = read_platform(self.data_dir)
            if current is None or current.pid == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    platform_path(self.data_dir).unlink()
        say("stopped")


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


async def _spawn_child(
    argv: list[str], env: dict[str, str], log: TextIO
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        # Its own process group: a terminal's Ctrl-C reaches `bianzhi up` only, which then
        # SIGTERMs each service once (a second signal would make uvicorn exit without draining).
        process_group=0,
        preexec_fn=die_with_parent,
    )


async def partitions_past(
    settings: Settings, topics: list[str], threshold: int
) -> list[tuple[str, int, int]]:
    """``(topic, partition, end offset)`` of every partition whose end offset is ≥ ``threshold``.

    End offsets count messages; batches (what the cliff is about) are at most as many.
    """
    partitions = await topic_partitions(settings, topics)
    tps = [TopicPartition(t, p) for t, ps in partitions.items() for p in ps]
    consumer = make_consumer(settings)
    async with kafka_errors(settings.kafka_bootstrap):
        await consumer.start()
        try:
            ends = await consumer.end_offsets(tps)
        finally:
            await consumer.stop()
    return sorted((tp.topic, tp.partition, n) for tp, n in ends.items() if n >= threshold)


def cliff_warning(over: list[tuple[str, int, int]]) -> str:
    topic, partition, count = max(over, key=lambda item: item[2])
    return (
        f"warning: {len(over)} partition(s) hold more than {CLIFF_WARN_AT:,} messages (most: "
        f"partition {partition} of {topic}, {count:,}); the embedded broker slows down sharply "
        "near 15,000-20,000 record batches per partition. Restart with `bianzhi up`: the broker "
        "starts fresh, database state is kept and the outbox is re-published."
    )


def free_http_base(host: str = "127.0.0.1", count: int = len(SERVICES)) -> int:
    """A base port H with H … H+count-1 all free right now (for tests and scripts).

    Taken below the range the system hands out to outgoing connections (Linux:
    ``ip_local_port_range``, 32768 and up by default): a port from that range can be taken by
    any connection made between this check and the services binding, as a test run saw
    (``address already in use`` on H+1)."""
    top = _ephemeral_low() - count
    for _ in range(50):
        base = random.randrange(10_000, top) if top > 10_000 else free_port(host)
        if base + count - 1 <= 65_535 and not any(
            _port_in_use(host, base + i) for i in range(count)
        ):
            return base
    raise CliError(f"--http-port: found no {count} consecutive free ports on {host}")


def _ephemeral_low() -> int:
    """The lowest port the system gives outgoing connections (32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768
