"""Benchmark: notify's webhook deliveries to a local receiver, against a plain HTTP baseline.

One run measures, against the same receiver (a separate process on a loopback port):
  (a) the baseline: signed POSTs straight from an HTTP client, as many at once as notify sends
      (requests/s), and one at a time at the latency run's rate (latency of one request);
  (b) throughput: N events handed to notify's events consumer at once (one transaction each,
      as off the topic), fanned out to S subscriptions and delivered by the worker: deliveries/s;
  (c) latency: events one at a time at a fixed rate; from the moment notify's consumer takes an
      event to the moment the receiver has it (the broker hop is not included), p50/p99, and
      what notify adds to the baseline's.
Figures, not assertions: `python bench/notify_delivery.py -n 2000 -s 4`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import httpx

from contracts.codes import OrgKind, OrgStatus
from contracts.common import Document
from contracts.envelope import CONTENT_TYPE, Envelope
from contracts.notify import Subscribe
from contracts.orgs import OrgRegistered
from contracts.topics import ORGS_EVENTS
from services.notify.domain.model import sign

SECRET = "bench-secret-0123456789"
DOC = Document(title="基准测试批复", number="冀编〔2026〕99号", date=date(2026, 1, 1))
ADMIN = {"actorid": "bench", "actorregion": "130000", "actorroles": "admin"}


def say(text: str) -> None:
    print(text, flush=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the receiver (its own process) -----------------------------------------------------------


class ReceiverApp:
    """Answers 200 to every POST and notes when each webhook-id first arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.requests = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            if not message.get("more_body"):
                break
        body = b""
        if scope["method"] == "GET":
            body = json.dumps({"requests": self.requests, "arrived": self.arrived}).encode()
        else:
            self.requests += 1
            headers = dict(scope["headers"])
            event_id = headers.get(b"webhook-id", b"").decode()
            self.arrived.setdefault(event_id, time.time())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def serve_receiver(port: int) -> None:
    import uvicorn

    uvicorn.run(ReceiverApp(), host="127.0.0.1", port=port, log_level="warning", lifespan="off")


async def receiver_stats(base: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        stats: dict[str, Any] = (await client.get(f"{base}/stats", timeout=30)).json()
        return stats


# --- (a) baseline -----------------------------------------------------------------------------


async def baseline_paced(base: str, n: int, rate: float) -> list[float]:
    """The latency of single signed POSTs sent one at a time at ``rate`` per second."""
    body = org_registered().envelope(source="/bench").to_bytes()
    latencies: list[float] = []
    async with httpx.AsyncClient() as client:
        for i in range(n):
            stamp = int(time.time())
            headers = {
                "content-type": CONTENT_TYPE,
                "webhook-id": f"paced-{i}",
                "webhook-timestamp": str(stamp),
                "webhook-signature": sign(SECRET, stamp, body),
            }
            started = time.perf_counter()
            await client.post(f"{base}/hook", content=body, headers=headers)
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(1 / rate)
    return latencies


async def baseline(base: str, n: int, concurrency: int) -> tuple[float, list[float]]:
    """Requests/s of signed POSTs, and the latency of each."""
    body = org_registered().envelope(source="/bench").to_bytes()
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    ) as client:

        async def one(i: int) -> None:
            async with gate:
                stamp = int(time.time())
                headers = {
                    "content-type": CONTENT_TYPE,
                    "webhook-id": f"baseline-{i}",
                    "webhook-timestamp": str(stamp),
                    "webhook-signature": sign(SECRET, stamp, body),
                }
                started = time.perf_counter()
                await client.post(f"{base}/hook", content=body, headers=headers)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - started), latencies


# --- notify -----------------------------------------------------------------------------------


def org_registered() -> OrgRegistered:
    return OrgRegistered(
        org_id=uuid.uuid4(),
        name="基准测试机构",
        kind=OrgKind.ORGAN,
        division_code="130102",
        status=OrgStatus.ACTIVE,
        document=DOC,
        effective_date=DOC.date,
    )


class Notify:
    """The notify service in this process: its command and events consumers driven directly,
    its delivery worker running as in production."""

    def __init__(self, data_dir: Path, concurrency: int) -> None:
        from services.notify.bootstrap import build
        from services.notify.settings import NotifySettings
        from services.runtime.settings import Settings

        os.environ.pop("BIANZHI_NOTIFY_DATABASE_URL", None)
        self.runtime = build(
            Settings(data_dir=data_dir, log_level="WARNING", kafka_bootstrap="localhost:1"),
            NotifySettings(
                concurrency=concurrency,
                per_subscription_concurrency=concurrency,
                poll_interval_s=0.2,
                secrets_key=base64.b64encode(os.urandom(32)).decode(),
            ),
        )
        self._offsets = itertools.count()
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from services.runtime.events import EventConsumer
        from services.runtime.messaging import event_routes

        await self.runtime.migrate()
        sub = next(s for s in self.runtime.definition.event_subscriptions if s.topic == ORGS_EVENTS)

        async def no_dead_letters(*_: Any) -> None:
            raise RuntimeError("the benchmark's events are valid")

        self._consumer = EventConsumer(
            routes=event_routes(sub.routes),
            service="notify",
            consumer=f"notify<-{ORGS_EVENTS}",
            uow_factory=self.runtime.uow,
            dead_letter=no_dead_letters,
        )
        self._task = asyncio.create_task(self.runtime.worker.serve())  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.runtime.engine.dispose()
        await self.runtime.read_engine.dispose()

    async def subscribe(self, url: str) -> None:
        from services.runtime.messaging import RawMessage

        cmd = Subscribe.model_validate(
            {
                "subscription_id": str(uuid.uuid4()),
                "subscriber": "基准测试接收方",
                "event_types": ["bianzhi.orgs.*"],
                "division_code": "130100",
                "channel": {"kind": "webhook", "url": url, "secret": SECRET},
            }
        )
        env = cmd.envelope(source="/bench", **ADMIN)
        await self.runtime.command_consumer.process(
            RawMessage(
                topic=cmd.TOPIC,
                partition=0,
                offset=next(self._offsets),
                key=env.subject.encode() if env.subject else None,
                value=env.to_bytes(),
            )
        )

    async def take(self, env: Envelope) -> None:
        """What notify does with one event off the orgs events topic."""
        from services.runtime.messaging import RawMessage

        await self._consumer.process(
            RawMessage(
                topic=ORGS_EVENTS,
                partition=0,
                offset=next(self._offsets),
                key=(env.subject or env.id).encode(),
                value=env.to_bytes(),
            )
        )


async def wait_requests(base: str, count: int, timeout: float) -> None:
    """Until the receiver has had ``count`` requests in all (baseline included)."""
    deadline = time.perf_counter() + timeout
    while (await receiver_stats(base))["requests"] < count:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"the receiver did not get {count} requests in {timeout:g}s")
        await asyncio.sleep(0.2)


async def wait_arrived(base: str, ids: set[str], timeout: float) -> dict[str, float]:
    deadline = time.perf_counter() + timeout
    while True:
        arrived: dict[str, float] = (await receiver_stats(base))["arrived"]
        if ids <= arrived.keys() or time.perf_counter() > deadline:
            return {i: arrived[i] for i in ids if i in arrived}
        await asyncio.sleep(0.2)


def start_receiver(port: int) -> subprocess.Popen[bytes]:
    root = str(Path(__file__).resolve().parents[1])
    return subprocess.Popen(
        [sys.executable, __file__, "--serve-receiver", str(port)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
    )


async def run(n: int, subscriptions: int, latency_n: int, rate: float, concurrency: int) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    receiver = start_receiver(port)
    try:
        for _ in range(100):
            try:
                await receiver_stats(base)
                break
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
        say(f"receiver on {base} (pid {receiver.pid})")

        rps, _ = await baseline(base, n, concurrency)
        base_latencies = await baseline_paced(base, latency_n, rate)
        say(
            f"(a) baseline: {n} signed POSTs, {concurrency} at once: {rps:,.0f} requests/s; "
            f"one at a time at {rate:g}/s: latency p50 "
            f"{percentile(base_latencies, 0.5) * 1000:.1f} ms, "
            f"p99 {percentile(base_latencies, 0.99) * 1000:.1f} ms"
        )

        with tempfile.TemporaryDirectory(prefix="bench-notify-") as tmp:
            notify = Notify(Path(tmp), concurrency)
            await notify.start()
            try:
                for i in range(subscriptions):
                    await notify.subscribe(f"{base}/hook/{i}")
                envs = [org_registered().envelope(source="/bench") for _ in range(n)]
                started = time.perf_counter()
                for env in envs:
                    await notify.take(env)
                taken = time.perf_counter() - started
                await wait_requests(base, n * subscriptions + n + latency_n, timeout=1200)
                elapsed = time.perf_counter() - started
                total = n * subscriptions
                say(
                    f"(b) throughput: {n} events × {subscriptions} subscriptions = {total} "
                    f"deliveries in {elapsed:.1f}s: {total / elapsed:,.0f} deliveries/s "
                    f"({n / taken:,.0f} events/s taken by the consumer); "
                    f"{total / elapsed / rps:.0%} of the baseline's requests/s"
                )

                fed: dict[str, float] = {}
                for _ in range(latency_n):
                    env = org_registered().envelope(source="/bench")
                    fed[env.id] = time.time()
                    await notify.take(env)
                    await asyncio.sleep(1 / rate)
                arrived = await wait_arrived(base, set(fed), timeout=120)
                latencies = [arrived[i] - fed[i] for i in fed if i in arrived]
                p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
                b50, b99 = percentile(base_latencies, 0.5), percentile(base_latencies, 0.99)
                say(
                    f"(c) latency, {latency_n} events at {rate:g}/s, {subscriptions} "
                    f"subscriptions: event taken → first delivery p50 {p50 * 1000:.1f} ms, "
                    f"p99 {p99 * 1000:.1f} ms; added to the baseline p50 "
                    f"{(p50 - b50) * 1000:.1f} ms, p99 {(p99 - b99) * 1000:.1f} ms"
                )
            finally:
                await notify.stop()
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="events for throughput (2000)")
    parser.add_argument("-s", type=int, default=4, help="subscriptions (4)")
    parser.add_argument("--latency-n", type=int, default=300, help="events for latency (300)")
    parser.add_argument("--rate", type=float, default=50.0, help="events/s for latency (50)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests at once (32)")
    parser.add_argument("--serve-receiver", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_receiver:
        serve_receiver(args.serve_receiver)
        return
    asyncio.run(run(args.n, args.s, args.latency_n, args.rate, args.concurrency))


if __name__ == "__main__":
    main()
