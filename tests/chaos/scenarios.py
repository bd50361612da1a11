"""Fault scenarios: the platform under load, faults injected while the load runs, then the
checker. The same code runs at small scale in the test suite and at full scale from
``python -m tests.chaos --full``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from contracts.topics import all_topics, commands
from services.cli.replay import replay_service
from services.runtime.embedded_broker import EmbeddedBroker, ensure_topics
from services.runtime.settings import Settings
from tests.chaos.checker import OPEN_SAGA_STATUSES, Report, check, saga_open
from tests.chaos.ledger import Ledger
from tests.chaos.load import LoadGenerator
from tests.chaos.platform import (
    SERVICES,
    Platform,
    get_json,
    postgres_outage,
    sqlite_locked,
)

BEGINNING_OF_TIME = datetime(1970, 1, 1, tzinfo=UTC)
PARTITIONS = 3


@dataclass(frozen=True)
class Scale:
    commands: int
    rate: float  # commands per second offered
    faults: int  # fault injections spread over the load
    orgs: int
    counties: int
    places: int  # approved places per org at set-up
    notice_places: int  # places of each org's first notice
    settle_s: float  # how long the platform may take to answer everything after the load
    max_in_flight: int = 100
    malformed_share: float = 0.01
    rule_share: float = 0.01
    duplicate_share: float = 0.05


# Small: one kill and restart takes 6-9 s here, so the load is slow enough to span them all.
SMALL = Scale(
    commands=240,
    rate=10,
    faults=3,
    orgs=8,
    counties=4,
    places=30,
    notice_places=20,
    settle_s=150,
    malformed_share=0.03,
    rule_share=0.03,
)
FULL = Scale(
    commands=10_600,
    rate=60,
    faults=12,
    orgs=40,
    counties=8,
    places=60,
    notice_places=40,
    settle_s=900,
    max_in_flight=200,
)


@dataclass
class Outcome:
    name: str
    report: Report
    recovery_s: list[float] = field(default_factory=list)  # per fault: fault → service ready
    catch_up_s: float = 0.0  # end of the load → every command answered
    wall_s: float = 0.0
    load_s: float = 0.0
    faults: list[dict[str, Any]] = field(default_factory=list)

    def render(self) -> str:
        rec = (
            f"recovery (fault → ready again) max {max(self.recovery_s):.1f} s, "
            f"mean {sum(self.recovery_s) / len(self.recovery_s):.1f} s over "
            f"{len(self.recovery_s)} faults; "
            if self.recovery_s
            else ""
        )
        return (
            f"scenario {self.name}: {rec}load {self.load_s:.1f} s, catch-up {self.catch_up_s:.1f} s"
            f", wall {self.wall_s:.1f} s (machine shared and loaded)\n" + self.report.render()
        )


Fault = Callable[[Platform, LoadGenerator, Ledger, int], Awaitable[float | None]]


# --- the faults ---------------------------------------------------------------------------------


def kill9(service: str | None = None, down_s: float = 1.0) -> Fault:
    """``kill -9`` of a service (round robin over orgs, quota, roster unless named), a pause,
    a restart; returns seconds from the kill until the service is ready again."""

    async def inject(platform: Platform, gen: LoadGenerator, ledger: Ledger, i: int) -> float:
        name = service or SERVICES[i % len(SERVICES)]
        started = time.monotonic()
        in_flight = len(ledger.unanswered())  # as the signal goes, not once it has landed
        await platform.services[name].kill()
        ledger.record_fault("kill -9", service=name, in_flight=in_flight)
        await asyncio.sleep(down_s)
        await platform.restart(name)
        return time.monotonic() - started

    return inject


def sigterm(service: str | None = None) -> Fault:
    """SIGTERM (drain and exit) of a service during load, then a restart."""

    async def inject(platform: Platform, gen: LoadGenerator, ledger: Ledger, i: int) -> float:
        name = service or SERVICES[i % len(SERVICES)]
        started = time.monotonic()
        in_flight = len(ledger.unanswered())  # as the signal goes, not once it has drained
        code = await platform.services[name].stop()
        ledger.record_fault("SIGTERM", service=name, exit_status=code, in_flight=in_flight)
        await platform.restart(name)
        return time.monotonic() - started

    return inject


def pause(service: str | None = None, paused_s: float = 6.0) -> Fault:
    """SIGSTOP past the consumer session timeout (3 s), then SIGCONT: the group moves on
    without it, and its late commits fail."""

    async def inject(platform: Platform, gen: LoadGenerator, ledger: Ledger, i: int) -> float:
        name = service or SERVICES[i % len(SERVICES)]
        svc = platform.services[name]
        started = time.monotonic()
        svc.signal(signal.SIGSTOP)
        ledger.record_fault(
            "SIGSTOP", service=name, seconds=paused_s, in_flight=len(ledger.unanswered())
        )
        await asyncio.sleep(paused_s)
        svc.signal(signal.SIGCONT)
        await svc.wait_ready()
        return time.monotonic() - started

    return inject


def database_outage(service: str | None = None, seconds: float = 5.0) -> Fault:
    """The service's database unavailable for a while: its SQLite file locked exclusively, or
    every connection to its own PostgreSQL database terminated again and again."""

    async def inject(platform: Platform, gen: LoadGenerator, ledger: Ledger, i: int) -> float:
        name = service or SERVICES[i % len(SERVICES)]
        url = platform.database_urls[name]
        started = time.monotonic()
        if url.startswith("sqlite"):
            in_flight = len(ledger.unanswered())  # as the lock is taken, not once it is held
            async with sqlite_locked(url):
                ledger.record_fault(
                    "sqlite locked", service=name, seconds=seconds, in_flight=in_flight
                )
                await asyncio.sleep(seconds)
        else:
            ended = await postgres_outage(url, seconds)
            ledger.record_fault(
                "postgres connections terminated", service=name, seconds=seconds, ended=ended
            )
        return time.monotonic() - started

    return inject


def poison() -> Fault:
    """Garbage bytes and an envelope without an id in every command topic."""

    async def inject(platform: Platform, gen: LoadGenerator, ledger: Ledger, i: int) -> None:
        for name in SERVICES:
            await gen.send_poison(commands(name))
        ledger.record_fault("poison", topics=[commands(n) for n in SERVICES])
        return None

    return inject


def mixed() -> Fault:
    """SIGTERM, a pause past the session timeout and a database outage, in turn; every three
    faults the services shift by one, so nine faults give each kind to each service."""
    kinds = (sigterm(), pause(), database_outage())

    async def inject(platform: Platform, gen: LoadGenerator, ledger: Ledger, i: int) -> Any:
        return await kinds[i % len(kinds)](platform, gen, ledger, i + i // len(kinds))

    return inject


# The saga-timeout scenario: the roster gives quota this long to answer a saga step, and quota is
# killed for longer, so steps time out while quota is down and their answers come late.
SAGA_TIMEOUT_S = 2.0


def quota_down_past_saga_timeout() -> Fault:
    return kill9("quota", down_s=SAGA_TIMEOUT_S * 2)


FAULTS: dict[str, Callable[[], Fault]] = {
    "kill9": kill9,
    "poison": poison,
    "sigterm": sigterm,
    "pause": pause,
    "database": database_outage,
    "mixed": mixed,
    "saga_timeouts": quota_down_past_saga_timeout,
}


# --- running a scenario -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def own_broker(log_path: Path) -> AsyncIterator[EmbeddedBroker]:
    broker = EmbeddedBroker(log_path=log_path)
    await broker.start()
    try:
        await ensure_topics(broker.bootstrap, all_topics(), partitions=PARTITIONS)
        yield broker
    finally:
        await broker.stop()


def generator(bootstrap: str, ledger: Ledger, scale: Scale, seed: int) -> LoadGenerator:
    return LoadGenerator(
        bootstrap,
        ledger,
        seed=seed,
        malformed_share=scale.malformed_share,
        rule_share=scale.rule_share,
        duplicate_share=scale.duplicate_share,
    )


async def _setup(platform: Platform, gen: LoadGenerator, scale: Scale) -> None:
    await platform.start()
    await gen.start()
    await gen.setup(
        orgs=scale.orgs,
        county_count=scale.counties,
        places=scale.places,
        notice_places=scale.notice_places,
        quota_url=platform.url("quota"),
        roster_url=platform.url("roster"),
    )


async def _inject_during(
    task: asyncio.Task[int],
    fault: Fault,
    count: int,
    commands: int,
    platform: Platform,
    gen: LoadGenerator,
    ledger: Ledger,
    say: Callable[[str], None],
) -> list[float]:
    """Inject ``count`` faults spread over the load by its progress: fault i once
    (i+1)/(count+1) of the commands are sent, so each one meets commands in flight however
    slowly the load goes (a load that ends early still gets every fault)."""
    took: list[float] = []
    for i in range(count):
        due = commands * (i + 1) // (count + 1)
        while gen.load_sent < due and not task.done():
            await asyncio.sleep(0.05)
        # Each fault is meant to meet commands in flight: wait (briefly) for some.
        patience = time.monotonic() + 5.0
        while not ledger.unanswered() and not task.done() and time.monotonic() < patience:
            await asyncio.sleep(0.01)
        took_s = await fault(platform, gen, ledger, i)
        last = ledger.faults[-1] if ledger.faults else {}
        say(
            f"  fault {i + 1}/{count}: {last.get('what')} {last.get('service', '')}"
            + (f", ready again after {took_s:.1f} s" if took_s is not None else "")
        )
        if took_s is not None:
            took.append(took_s)
    return took


async def settle(platform: Platform, gen: LoadGenerator, ledger: Ledger, timeout: float) -> float:
    """Wait until every command has a result, no saga is open (waiting for quota, or timed out
    and compensating: a refused enrolment's slot may still be on its way back), quota's and
    roster's counts stay the same for a while, and a little longer (a doubled result or event
    would come soon after the first). Seconds until every command had its result."""
    started = time.monotonic()
    deadline = started + timeout
    while ledger.unanswered() and time.monotonic() < deadline:
        if exited := platform.exited():
            raise RuntimeError(f"services exited by themselves: {exited}")
        await ledger.wait_changed(1.0)
    took = time.monotonic() - started
    roster, quota = platform.url("roster"), platform.url("quota")

    async def open_sagas() -> int:
        total = 0
        for status in OPEN_SAGA_STATUSES:
            _, body = await get_json(f"{roster}/sagas?status={status}&limit=1000")
            total += len([s for s in body["sagas"] if saga_open(s)]) if body is not None else 1
        return total

    async def counts() -> Any:
        return (
            (await get_json(f"{quota}/occupancy?division_code=130000"))[1],
            (await get_json(f"{roster}/counts"))[1],
        )

    while time.monotonic() < deadline and await open_sagas():
        await asyncio.sleep(0.5)
    before = await counts()
    while time.monotonic() < deadline:
        await asyncio.sleep(2.0)
        after = await counts()
        if after == before and not await open_sagas():
            break
        before = after
    await asyncio.sleep(1.0)
    return took


async def run_scenario(
    name: str,
    *,
    bootstrap: str,
    data_dir: Path,
    database_urls: dict[str, str] | None = None,
    scale: Scale = SMALL,
    fault: Fault | None = None,
    seed: int = 1,
    saga_timeout_s: float = 60.0,
    tolerated: frozenset[str] = frozenset(),
    say: Callable[[str], None] = lambda _: None,
) -> Outcome:
    """Set up, run the load with ``scale.faults`` faults spread over it, settle, check.
    ``tolerated``: reason codes a valid command may be refused with in this scenario."""
    started = time.monotonic()
    ledger = Ledger(data_dir / "ledger.jsonl")
    platform = Platform(
        bootstrap=bootstrap,
        data_dir=data_dir,
        database_urls=dict(database_urls or {}),
        saga_timeout_s=saga_timeout_s,
    )
    gen = generator(bootstrap, ledger, scale, seed)
    try:
        say(f"scenario {name}: set-up ({scale.orgs} orgs)")
        await _setup(platform, gen, scale)
        load_started = time.monotonic()
        say(f"scenario {name}: {scale.commands} commands at {scale.rate:g}/s")
        load = asyncio.create_task(
            gen.run(scale.commands, rate=scale.rate, max_in_flight=scale.max_in_flight)
        )
        recovery: list[float] = []
        try:
            if fault is not None and scale.faults:
                recovery = await _inject_during(
                    load, fault, scale.faults, scale.commands, platform, gen, ledger, say
                )
            await load
        finally:
            if not load.done():  # a fault could not be injected: stop the load too
                load.cancel()
                await asyncio.gather(load, return_exceptions=True)
        load_s = time.monotonic() - load_started
        say(f"scenario {name}: load sent in {load_s:.1f} s; waiting for every result")
        catch_up = await settle(platform, gen, ledger, scale.settle_s)
        urls = {n: platform.url(n) for n in SERVICES}
        report = await check(ledger, gen.world, urls, tolerated)
        report.extra["tracebacks_in_service_logs"] = platform.tracebacks()
        return Outcome(
            name=name,
            report=report,
            recovery_s=recovery,
            catch_up_s=catch_up,
            wall_s=time.monotonic() - started,
            load_s=load_s,
            faults=list(ledger.faults),
        )
    finally:
        await gen.stop()
        await platform.stop()
        ledger.close()


@contextlib.contextmanager
def _replay_env(platform: Platform) -> Iterator[None]:
    """``replay_service`` reads its settings from the environment like a service does: the
    database URLs and the roster's personal-data key (a roster outbox row may be sealed)."""
    names = {
        **{f"BIANZHI_{n.upper()}_DATABASE_URL": url for n, url in platform.database_urls.items()},
        "BIANZHI_ROSTER_PERSONAL_DATA_KEY": platform.personal_data_key,
    }
    saved = {name: os.environ.get(name) for name in names}
    try:
        os.environ.update(names)
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


async def run_recovery(
    *,
    data_dir: Path,
    database_urls: dict[str, str] | None = None,
    scale: Scale = SMALL,
    seed: int = 2,
    say: Callable[[str], None] = lambda _: None,
) -> Outcome:
    """The embedded recovery: the broker dies under load (every service with it, as `bianzhi
    up` stops them), a fresh broker starts, the retained outbox of every service is published
    again (`bianzhi replay`, what `bianzhi up` does on start), the services start on it, the
    front-end re-sends by id what the lost broker never delivered, the load goes on; zero
    missing effects and every check passing."""
    started = time.monotonic()
    ledger = Ledger(data_dir / "ledger.jsonl")
    first = EmbeddedBroker(log_path=data_dir / "broker-1.log")
    await first.start()
    second: EmbeddedBroker | None = None
    await ensure_topics(first.bootstrap, all_topics(), partitions=PARTITIONS)
    platform = Platform(
        bootstrap=first.bootstrap, data_dir=data_dir, database_urls=dict(database_urls or {})
    )
    gen = generator(first.bootstrap, ledger, scale, seed)
    closing: asyncio.Task[list[str]] | None = None
    try:
        say("scenario recovery: set-up")
        await _setup(platform, gen, scale)
        half = scale.commands // 2
        load_started = time.monotonic()
        load = asyncio.create_task(
            gen.run(half, rate=scale.rate, max_in_flight=scale.max_in_flight)
        )
        await asyncio.wait({load}, timeout=half / scale.rate * 0.7)
        # The broker dies with work in flight; `bianzhi up` then stops every service.
        lost_at = time.monotonic()
        await first.stop(timeout=0.1)
        await platform.kill_all()
        ledger.record_fault("broker lost", unanswered=len(ledger.unanswered()))
        load.cancel()
        await asyncio.gather(load, return_exceptions=True)
        # The front-end closes its clients of the lost broker for good now, while the fresh
        # broker starts: left open, they would retry the dead broker for the rest of the run.
        closing = asyncio.create_task(gen.stop())
        say(f"  broker lost with {len(ledger.unanswered())} commands unanswered")
        # The front-end's producer and reader follow once the fresh broker exists.
        second = EmbeddedBroker(log_path=data_dir / "broker-2.log")
        await second.start()
        await ensure_topics(second.bootstrap, all_topics(), partitions=PARTITIONS)
        settings = Settings(data_dir=data_dir, kafka_bootstrap=second.bootstrap)
        replayed = 0
        with _replay_env(platform):
            for name in SERVICES:
                replayed += await replay_service(name, settings, BEGINNING_OF_TIME)
        ledger.record_fault("outbox re-published", rows=replayed)
        platform.use_broker(second.bootstrap)
        await platform.start()
        recovered = time.monotonic() - lost_at
        say(
            f"  fresh broker, {replayed} outbox rows re-published, "
            f"services ready: {recovered:.1f} s"
        )
        left_running = await closing
        await gen.switch_broker(second.bootstrap)
        # Give the re-published results a moment to arrive before re-sending by id.
        await asyncio.sleep(3.0)
        resent = await gen.resend_unanswered()
        ledger.record_fault("front-end re-sent unanswered commands", count=resent)
        say(f"  re-sent {resent} unanswered commands by id; load goes on")
        await gen.run(
            scale.commands - gen.load_sent, rate=scale.rate, max_in_flight=scale.max_in_flight
        )
        load_s = time.monotonic() - load_started
        catch_up = await settle(platform, gen, ledger, scale.settle_s)
        report = await check(ledger, gen.world, {n: platform.url(n) for n in SERVICES})
        report.extra["outbox_rows_republished"] = replayed
        report.extra["resent_after_loss"] = resent
        report.extra["tracebacks_in_service_logs"] = platform.tracebacks()
        # A Kafka client task of the lost broker still running after its client was closed.
        report.bad["kafka_tasks_of_lost_broker_left"] = len(left_running)
        report.examples["kafka_tasks_of_lost_broker_left"] += left_running[:5]
        return Outcome(
            name="recovery",
            report=report,
            recovery_s=[recovered],
            catch_up_s=catch_up,
            wall_s=time.monotonic() - started,
            load_s=load_s,
            faults=list(ledger.faults),
        )
    finally:
        if closing is not None:
            await asyncio.gather(closing, return_exceptions=True)
        await gen.stop()
        await platform.stop()
        ledger.close()
        await first.stop()
        if second is not None:
            await second.stop()


def scaled(scale: Scale, **changes: Any) -> Scale:
    return replace(scale, **changes)
