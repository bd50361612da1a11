"""The platform under test: orgs, quota and roster as real service processes (uvicorn), the way
`bianzhi up` runs them, on a broker given by address, so a scenario can kill, stop, pause and
restart each of them and lock its database."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import sqlite3
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from services.runtime.embedded_broker import free_port
from services.runtime.processes import die_with_parent

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("orgs", "quota", "roster")
READY_TIMEOUT_S = 90.0


class PlatformError(RuntimeError):
    """A service did not start, or exited by itself."""


@dataclass
class ServiceProcess:
    """One service as its own uvicorn process; restarted on the same port and database."""

    name: str
    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        if self.running:
            raise PlatformError(f"{self.name} is already running (pid {self.pid})")
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            f"services.{self.name}.entrypoints.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- chaos: start {self.starts + 1} of {self.name} ---\n".encode())
            log.flush()
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=ROOT,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                process_group=0,  # signals meant for the test run must not reach it
                preexec_fn=die_with_parent,
            )
        self.starts += 1

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Seconds until ``/health/ready`` answers 200; raises if the process exits first."""
        started = time.monotonic()
        while True:
            if self.process is None or self.process.returncode is not None:
                code = None if self.process is None else self.process.returncode
                raise PlatformError(
                    f"{self.name} exited (status {code}) before it was ready; {self.log_tail()}"
                )
            status, _ = await get_json(f"{self.url}/health/ready", timeout=2)
            if status == 200:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise PlatformError(
                    f"{self.name} not ready within {timeout:g} s; {self.log_tail()}"
                )
            await asyncio.sleep(0.2)

    def signal(self, signum: signal.Signals) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def kill(self) -> None:
        """``kill -9``: no drain, no commit, no relay mark."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            await self.process.wait()

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the service drains and commits), SIGKILL after ``timeout``."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.signal(signal.SIGCONT)  # a paused process cannot drain
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                await self.kill()
        return self.process.returncode

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        return f"last lines of {self.log_path}:\n" + "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class Platform:
    """orgs, quota and roster on one broker, each with its own database."""

    bootstrap: str
    data_dir: Path
    database_urls: dict[str, str]
    saga_timeout_s: float = 60.0
    group_prefix: str = field(default_factory=lambda: f"chaos-{uuid.uuid4().hex[:8]}")
    personal_data_key: str = field(
        default_factory=lambda: base64.b64encode(secrets.token_bytes(32)).decode()
    )
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BIANZHI_")}
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                "PYTHONUNBUFFERED": "1",
                "BIANZHI_DATA_DIR": str(self.data_dir),
                "BIANZHI_KAFKA_BOOTSTRAP": self.bootstrap,
                "BIANZHI_KAFKA_GROUP_PREFIX": self.group_prefix,
                "BIANZHI_KAFKA_SESSION_TIMEOUT_MS": "3000",
                "BIANZHI_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
                "BIANZHI_KAFKA_EVENT_FETCH_MAX_WAIT_MS": "50",
                "BIANZHI_KAFKA_GRACEFUL_TIMEOUT_S": "10",
                "BIANZHI_RELAY_POLL_INTERVAL_S": "0.2",
                "BIANZHI_RETRY_INITIAL_S": "0.05",
                "BIANZHI_RETRY_MAX_S": "1",
                "BIANZHI_LOG_LEVEL": "WARNING",
                "BIANZHI_ROSTER_PERSONAL_DATA_KEY": self.personal_data_key,
                "BIANZHI_ROSTER_SAGA_TIMEOUT_S": str(self.saga_timeout_s),
            }
        )
        for name, url in self.database_urls.items():
            env[f"BIANZHI_{name.upper()}_DATABASE_URL"] = url
        return env

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for name in SERVICES:
            self.database_urls.setdefault(
                name, f"sqlite+aiosqlite:///{(self.data_dir / f'{name}.db').resolve()}"
            )
            self.services[name] = ServiceProcess(
                name=name, env=self.env(), log_path=self.data_dir / "logs" / f"{name}.log"
            )

    def use_broker(self, bootstrap: str) -> None:
        """Point every service at another broker (after a broker loss); takes effect on start."""
        self.bootstrap = bootstrap
        for svc in self.services.values():
            svc.env = self.env()

    def url(self, name: str) -> str:
        return self.services[name].url

    async def start(self) -> dict[str, float]:
        """Start every service at once, as `bianzhi up` does; seconds until each is ready."""
        for svc in self.services.values():
            await svc.start()
        took = await asyncio.gather(*(svc.wait_ready() for svc in self.services.values()))
        return dict(zip(self.services, took, strict=True))

    async def restart(self, name: str) -> float:
        svc = self.services[name]
        await svc.start()
        return await svc.wait_ready()

    async def stop(self) -> None:
        await asyncio.gather(*(svc.stop() for svc in self.services.values()))

    async def kill_all(self) -> None:
        await asyncio.gather(*(svc.kill() for svc in self.services.values()))

    def exited(self) -> list[str]:
        """Services that stopped by themselves (not through this object)."""
        return [
            f"{svc.name} (status {svc.process.returncode})"
            for svc in self.services.values()
            if svc.process is not None and svc.process.returncode is not None
        ]

    def tracebacks(self) -> dict[str, int]:
        return {name: svc.log_text().count("Traceback") for name, svc in self.services.items()}


async def get_json(url: str, timeout: float = 30.0) -> tuple[int, Any]:
    """GET ``url``: (status, parsed JSON body); (0, None) when nothing answers."""

    def call() -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"null")
            except ValueError:
                return exc.code, None
        except (urllib.error.URLError, OSError, ValueError):
            return 0, None

    return await asyncio.to_thread(call)


# --- database faults ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def sqlite_locked(url: str) -> Any:
    """Hold an exclusive lock on a SQLite database file: every writer gets ``database is
    locked`` until the block ends."""
    path = make_url(url).database
    assert path, url

    def lock() -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN EXCLUSIVE")
        return conn

    conn = await asyncio.to_thread(lock)
    try:
        yield
    finally:
        await asyncio.to_thread(conn.execute, "ROLLBACK")
        await asyncio.to_thread(conn.close)


async def postgres_outage(url: str, seconds: float, every_s: float = 0.3) -> int:
    """Terminate every connection to the (test's own) PostgreSQL database of ``url`` and keep
    terminating new ones for ``seconds``; the number of connections ended."""
    parsed = make_url(url)
    dbname = parsed.database
    admin = parsed.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )
    ended = 0
    conn = await asyncpg.connect(admin)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            rows = await conn.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                dbname,
            )
            ended += sum(1 for r in rows if r[0])
            await asyncio.sleep(every_s)
    finally:
        await conn.close()
    return ended
