"""Benchmark: the price of distribution. Enrolment as a monolith beside the full saga pipeline.

One run, the same N enrolments (``EnrolPerson`` commands with valid, distinct citizen IDs, built
by ``bench/roster_enrol.py``'s ``People``) executed twice:

  (a) the monolith: one process, one database (a SQLite file, or a fresh PostgreSQL database with
      ``--database-url``), one transaction per enrolment, no broker. Each transaction applies the
      rules the services apply, with their own code and tables: the command parsed and validated
      (``contracts``: the citizen ID's GB 11643 check digit, birth date and address code); the org
      checked (``services.quota.domain.model``: active, category allowed); the person looked up
      by the blind index and the citizen ID encrypted (``services.roster.domain.personal_data``,
      the roster's ``People`` repository: one row per person); the notice checked and one of its
      places used, the slot recorded (one per person), a reserved place occupied where the
      establishment has one (the quota repository's conditional statements: notice remaining,
      vacancy); the history of both (``person_history``, ``quota_ledger``). Then the rules are
      shown to bite: every enrolment sent again is refused ``already_enrolled``.
  (b) the pipeline: ``roster_enrol.py``'s stack: the embedded broker, the quota and roster
      services as their own processes, N enrolments at once as sagas (roster → quota → roster),
      timed from publish to ``CommandCompleted``; then ``--paced-seconds`` at ``--rate`` for the
      latency of one enrolment without a queue; its checks (one result each, quota and roster
      agree).

Printed: enrolments/s, p50/p99 per enrolment, CPU ms per enrolment (every process of each stack:
the monolith's own; broker, quota and roster for the pipeline; a PostgreSQL server is outside
both), and the ratio monolith / pipeline. Figures, not assertions; the machine may be shared,
so the load average is printed with them.
``python bench/price_of_distribution.py`` (``-n 2000`` by default, about two minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench modules

import roster_enrol
from orgs_throughput import cpu_seconds, percentile, run_dir, say
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from contracts import identifiers
from contracts.codes import Category, OrgStatus, ReasonCode
from contracts.envelope import Envelope
from contracts.orgs import OrgRegistered
from contracts.quota import SlotOccupied
from contracts.roster import EnrolPerson, PersonEnrolled
from contracts.topics import all_topics
from services.quota.adapters import orm as quota_orm
from services.quota.adapters.repository import Ledger, Notices, OrgProjection, Slots
from services.quota.domain import model as quota_model
from services.roster.adapters import orm as roster_orm
from services.roster.adapters.repository import People
from services.roster.domain import model as roster_model
from services.roster.domain.personal_data import PersonalDataCipher
from services.roster.service_layer import handlers as roster_handlers
from services.runtime.db import create_engine
from services.runtime.embedded_broker import EmbeddedBroker, ensure_topics
from services.runtime.rules import Rejection

# The tables the monolith needs, as the services define them (one database holds both).
QUOTA_TABLES = [
    quota_orm.org_projection,
    quota_orm.establishment,
    quota_orm.notices,
    quota_orm.slots,
    quota_orm.quota_ledger,
]
ROSTER_TABLES = [roster_orm.people, roster_orm.person_history]
SOURCE = "/bench/monolith"
VALID_UNTIL = date(2099, 12, 31)


@dataclass
class Figures:
    label: str
    n: int
    rate: float  # enrolments/s
    p50: float  # s
    p99: float  # s
    cpu_ms: float  # CPU ms per enrolment, all processes of the stack
    detail: str


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


# --- (a) the monolith -------------------------------------------------------------------------


class Monolith:
    """Enrolment in one process and one database: one transaction applies every rule."""

    def __init__(self, engine: AsyncEngine, cipher: PersonalDataCipher) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self.cipher = cipher

    async def create_tables(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(lambda c: quota_orm.metadata.create_all(c, tables=QUOTA_TABLES))
            await conn.run_sync(lambda c: roster_orm.metadata.create_all(c, tables=ROSTER_TABLES))

    async def set_up(
        self, orgs: list[tuple[uuid.UUID, str, bytes]], numbers: list[str], places: int
    ) -> None:
        """The orgs (from their OrgRegistered events), per org ``places`` approved admin places
        and a notice reserving all of them."""
        async with self.sessions() as session, session.begin():
            projection, ledger, notices = OrgProjection(session), Ledger(session), Notices(session)
            for (org_id, _, value), number in zip(orgs, numbers, strict=True):
                event = OrgRegistered.model_validate(Envelope.from_bytes(value).data)
                await projection.registered(
                    org_id,
                    name=event.name,
                    kind=event.kind,
                    division_code=event.division_code,
                    parent_org_id=None,
                    status=OrgStatus.ACTIVE,
                )
                assert await ledger.set_approved(org_id, Category.ADMIN, places, None)
                assert await notices.add(
                    number, org_id, Category.ADMIN, places, VALID_UNTIL, {"title": "bench"}
                )
                assert await ledger.reserve(org_id, Category.ADMIN, places)

    async def enrol(self, value: bytes, today: date) -> None:
        """One EnrolPerson in one transaction; ``Rejection`` (rolled back) when a rule says no."""
        command = Envelope.from_bytes(value)
        cmd = EnrolPerson.model_validate(command.data)  # the citizen ID is validated here
        async with self.sessions() as session, session.begin():
            await self._enrol(session, command, cmd, today)

    async def _enrol(
        self, session: AsyncSession, command: Envelope, cmd: EnrolPerson, today: date
    ) -> None:
        org = await OrgProjection(session).get(cmd.org_id)
        if org is None:
            raise Rejection(ReasonCode.NOT_FOUND, f"org {cmd.org_id} is not known")
        quota_model.require_active(org)
        quota_model.require_category(org, cmd.category)
        people = People(session)
        index = self.cipher.blind_index(cmd.citizen_id)
        person_id = str(cmd.person_id or uuid.uuid4())
        # roster: the person, the citizen ID encrypted and blind-indexed, masked for display;
        # inserted first (as the roster does): the unique blind index turns away a number
        # already on the roster, which is then looked up
        added = await people.add(
            {
                **roster_handlers.identity(cmd, self.cipher, person_id, index),
                **roster_handlers.person_values(
                    cmd,
                    self.cipher,
                    person_id,
                    status=roster_model.Status.ACTIVE,
                    saga_id=None,
                    enrolled_on=cmd.effective_date,
                ),
            }
        )
        if not added:
            existing = await people.by_index(index)
            if existing is None:
                raise Rejection(ReasonCode.CONFLICT, f"person id {person_id} is taken")
            raise roster_model.already_enrolled(
                existing.person_id, existing.org_id, existing.status
            )
        # quota: the notice (issued to this org and category, unexpired, places left), the slot
        # (one per person), a reserved place occupied (none while the org is over its count)
        notices = Notices(session)
        if await notices.use_one(cmd.notice_no, cmd.org_id, cmd.category, today) is None:
            notice = quota_model.check_notice_usable(
                await notices.get(cmd.notice_no), cmd.notice_no, cmd.org_id, cmd.category, today
            )
            raise quota_model.notice_exhausted(notice)
        request_id = uuid.uuid4()
        if not await Slots(session).add(
            uuid.UUID(person_id),
            cmd.org_id,
            cmd.category,
            cmd.unit_id,
            cmd.leader_post,
            cmd.notice_no,
            request_id,
        ):
            raise roster_model.already_enrolled(person_id, str(cmd.org_id), "active")
        ledger = Ledger(session)
        occupied = await ledger.occupy_reserved(cmd.org_id, cmd.category)
        if occupied is None:
            raise quota_model.no_vacancy(await ledger.establishment(cmd.org_id, cmd.category), 1)
        if cmd.leader_post is not None and not await ledger.hold_leader_post(
            cmd.org_id, cmd.unit_id, cmd.leader_post
        ):
            posts = await ledger.leader_posts(cmd.org_id, cmd.unit_id)
            raise quota_model.leader_posts_exceeded(
                posts or quota_model.LeaderPosts(), cmd.leader_post
            )
        # the history of both, as the services keep it
        actor = {"actorid": command.actorid, "actorregion": command.actorregion}
        slot_event = SlotOccupied(
            request_id=request_id,
            person_id=uuid.UUID(person_id),
            org_id=cmd.org_id,
            category=cmd.category,
            notice_no=cmd.notice_no,
            leader_post=cmd.leader_post,
            unit_id=cmd.unit_id,
            occupied=occupied,
        ).envelope(source=SOURCE, **actor)
        await ledger.record(
            slot_event,
            command,
            document=None,
            effective_date=today,
            org_id=org.org_id,
            unit_id=cmd.unit_id,
            division_code=org.division_code,
            category=cmd.category,
            after={"occupied": occupied, "notice_no": cmd.notice_no, "person_id": person_id},
        )
        enrolled = PersonEnrolled(
            person_id=uuid.UUID(person_id),
            citizen_id_masked=identifiers.mask_citizen_id(cmd.citizen_id),
            name=cmd.name,
            org_id=cmd.org_id,
            category=cmd.category,
            notice_no=cmd.notice_no,
            position=cmd.position,
            leader_post=cmd.leader_post,
            unit_id=cmd.unit_id,
            entry_method=cmd.entry_method,
            effective_date=cmd.effective_date,
            document=cmd.document,
        ).envelope(source=SOURCE, **actor)
        await people.record(
            enrolled,
            person_id=person_id,
            org_id=cmd.org_id,
            category=cmd.category.value,
            effective_date=cmd.effective_date,
            document=cmd.document.model_dump(mode="json") if cmd.document else None,
            details={"notice_no": cmd.notice_no, "entry_method": cmd.entry_method.value},
            command=command,
        )
        await ledger.flush()  # quota's history rows are written together, as its unit of work does

    async def counts(self) -> dict[str, int]:
        from sqlalchemy import func, select

        async with self.sessions() as session:

            async def one(query: Any) -> int:
                return int((await session.execute(query)).scalar_one() or 0)

            return {
                "occupied": await one(select(func.sum(quota_orm.establishment.c.occupied))),
                "reserved": await one(select(func.sum(quota_orm.establishment.c.reserved))),
                "notice_used": await one(select(func.sum(quota_orm.notices.c.used))),
                "slots": await one(select(func.count()).select_from(quota_orm.slots)),
                "people_active": await one(
                    select(func.count())
                    .select_from(roster_orm.people)
                    .where(roster_orm.people.c.status == "active")
                ),
            }


async def run_monolith(n: int, orgs_count: int, database_url: str | None, tmp: Path) -> Figures:
    async with roster_enrol.databases(database_url, ["monolith"]) as urls:
        url = urls.get("monolith") or f"sqlite+aiosqlite:///{tmp / 'monolith.db'}"
        engine = create_engine(url)
        try:
            mono = Monolith(engine, PersonalDataCipher(secrets.token_bytes(32)))
            await mono.create_tables()
            warm = roster_enrol.WARM_UP
            places = math.ceil((warm + n) / orgs_count) + 1
            orgs = roster_enrol.org_events(orgs_count, roster_enrol.counties())
            numbers = [f"冀编用〔2026〕单体-{i:03d}号" for i in range(orgs_count)]
            await mono.set_up(orgs, numbers, places)
            people = roster_enrol.People(orgs, numbers)
            today = quota_model.today()
            warm_up = people.commands(warm)
            for _, _, _, value in warm_up:
                await mono.enrol(value, today)
            commands = people.commands(n)
            latencies: list[float] = []
            refused = Counter[str]()
            cpu0, started = time.process_time(), time.perf_counter()
            for _, _, _, value in commands:
                t0 = time.perf_counter()
                try:
                    await mono.enrol(value, today)
                except Rejection as rejection:
                    refused[rejection.code.value] += 1
                latencies.append(time.perf_counter() - t0)
            wall = time.perf_counter() - started
            cpu = time.process_time() - cpu0
            counts = await mono.counts()
            # The rules bite: every person enrolled again (a new command, the same citizen ID).
            again = Counter[str]()
            for _, _, _, value in commands[: min(n, 200)]:
                env = Envelope.from_bytes(value)
                resent = env.model_copy(update={"id": str(uuid.uuid4())}).to_bytes()
                try:
                    await mono.enrol(resent, today)
                    again["completed"] += 1
                except Rejection as rejection:
                    again[rejection.code.value] += 1
            after = await mono.counts()
        finally:
            await engine.dispose()
    total = warm + n
    ok = (
        not refused
        and counts["occupied"] == counts["slots"] == counts["people_active"] == total
        and counts["notice_used"] == total
        and after == counts
        and set(again) == {ReasonCode.ALREADY_ENROLLED.value}
    )
    say(
        f"  monolith checks: occupied {counts['occupied']}, slots {counts['slots']}, people "
        f"active {counts['people_active']}, notice places used {counts['notice_used']} "
        f"(expected {total} each), rejected {dict(refused) or 0}; "
        f"{sum(again.values())} enrolled again → {dict(again)}, ledger unchanged "
        f"{after == counts} → {'OK' if ok else 'FAILED'}"
    )
    return Figures(
        "monolith",
        n,
        n / wall,
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        cpu / n * 1000,
        f"{'PostgreSQL' if database_url else 'SQLite'}, one transaction per enrolment, "
        f"mean {statistics.fmean(latencies) * 1000:.2f} ms, checks {'OK' if ok else 'FAILED'}",
    )


# --- (b) the pipeline, with roster_enrol.py's stack --------------------------------------------


def cpu_of(pids: dict[str, int | None]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


async def run_pipeline(
    n: int,
    orgs_count: int,
    database_url: str | None,
    tmp: Path,
    partitions: int,
    rate: float,
    paced_seconds: float,
) -> tuple[Figures, Figures | None]:
    paced_n = int(rate * paced_seconds)
    total = roster_enrol.WARM_UP + n + paced_n
    places = math.ceil(total / orgs_count) + 1
    broker = EmbeddedBroker(log_path=tmp / "broker.log")
    await broker.start()
    services: dict[str, roster_enrol.Service] = {}
    try:
        async with roster_enrol.databases(database_url, ["quota", "roster"]) as urls:
            await ensure_topics(broker.bootstrap, all_topics(), partitions=partitions)
            await roster_enrol.start_services(services, broker.bootstrap, tmp, urls)
            quota, roster = services["quota"], services["roster"]
            driver = roster_enrol.Driver(broker.bootstrap, partitions)
            await driver.start()
            try:
                orgs, numbers = await roster_enrol.set_up(driver, quota, roster, orgs_count, places)
                people = roster_enrol.People(orgs, numbers)
                warm = people.commands(roster_enrol.WARM_UP)
                await driver.run(warm, None, "warm-up")
                pids = {
                    "tansu": broker.pid,
                    "quota": quota.process.pid,
                    "roster": roster.process.pid,
                }
                burst = people.commands(n)
                cpu0 = cpu_of(pids)
                throughput = await driver.run(burst, None, "burst")
                cpu1 = cpu_of(pids)
                ids = [c[0] for c in burst]
                lat = [driver.latency[i] for i in ids]
                refused = driver.rejected(ids)
                await roster_enrol.drain(roster)
                cpu2 = cpu_of(pids)  # the burst's tail: answers applied after the last result
                per = {k: (cpu2[k] - cpu0[k]) / n * 1000 for k in pids}
                until_last = sum(cpu1[k] - cpu0[k] for k in pids) / n * 1000
                burst_figures = Figures(
                    "pipeline burst",
                    n,
                    throughput,
                    percentile(lat, 0.5),
                    percentile(lat, 0.99),
                    sum(per.values()),
                    f"{n} at once, latency includes the queue; CPU ms per enrolment "
                    + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
                    + f" (until the last result: {until_last:.2f})"
                    + f"; rejected {dict(refused) or 0}",
                )
                paced_figures = None
                paced: list[tuple[str, str, bytes, bytes]] = []
                if paced_n:
                    paced = people.commands(paced_n)
                    c0 = cpu_of(pids)
                    await driver.run(paced, rate, "paced")
                    c1 = cpu_of(pids)
                    pids_ = [c[0] for c in paced]
                    plat = [driver.latency[i] for i in pids_]
                    paced_figures = Figures(
                        "pipeline paced",
                        paced_n,
                        rate,
                        percentile(plat, 0.5),
                        percentile(plat, 0.99),
                        sum(c1[k] - c0[k] for k in pids) / paced_n * 1000,
                        f"at {rate:.0f}/s for {paced_seconds:.0f} s (the rate is the one sent); "
                        f"rejected {dict(driver.rejected(pids_)) or 0}",
                    )
                    await roster_enrol.drain(roster)
                say("  pipeline checks (roster_enrol.verify):")
                all_ids = [c[0] for c in warm + burst + paced]
                ok = await roster_enrol.verify(driver, all_ids, orgs, quota, roster)
                burst_figures.detail += f"; checks {'OK' if ok else 'FAILED'}"
            finally:
                await driver.stop()
    finally:
        for service in services.values():
            service.stop()
        await broker.stop()
    return burst_figures, paced_figures


# --- main -------------------------------------------------------------------------------------


def line(f: Figures) -> str:
    return (
        f"  {f.label:<15} {f.rate:9,.0f}/s  p50 {f.p50 * 1000:8.2f} ms  p99 {f.p99 * 1000:8.2f} ms"
        f"  CPU {f.cpu_ms:6.2f} ms/enrolment  ({f.detail})"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2_000, help="enrolments in each stack")
    parser.add_argument("--orgs", type=int, default=24, help="orgs (each with one notice)")
    parser.add_argument(
        "--database-url",
        default=None,
        metavar="URL",
        help="a PostgreSQL server (postgresql+asyncpg://…): fresh databases for the monolith "
        "and the services (default: SQLite files)",
    )
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument(
        "--rate", type=float, default=20.0, help="pipeline paced run, per s (below capacity)"
    )
    parser.add_argument(
        "--paced-seconds", type=float, default=5.0, help="pipeline paced run length (0 skips)"
    )
    args = parser.parse_args()
    say(
        f"price of distribution: {args.n} enrolments each, {args.orgs} orgs, database "
        f"{'PostgreSQL' if args.database_url else 'SQLite files'}; {os.cpu_count()} cores, "
        f"load average {load()} (the machine may be shared)"
    )
    with tempfile.TemporaryDirectory(prefix="bianzhi-price-") as tmp_name:
        tmp = run_dir(tmp_name)
        say("(a) the monolith: one process, one database, one transaction per enrolment")
        mono = await run_monolith(args.n, args.orgs, args.database_url, tmp)
        say(line(mono))
        say("(b) the pipeline: broker + quota + roster, an EnrolPerson saga per enrolment")
        burst, paced = await run_pipeline(
            args.n,
            args.orgs,
            args.database_url,
            tmp,
            args.partitions,
            args.rate,
            args.paced_seconds,
        )
    say("")
    say(f"figures (load average now {load()}):")
    for figures in (mono, burst, paced):
        if figures is not None:
            say(line(figures))
    ratio = mono.rate / burst.rate
    cpu_ratio = burst.cpu_ms / mono.cpu_ms
    latency = (paced.p50 / mono.p50) if paced else float("nan")
    say(
        f"RESULT enrolments={args.n} monolith={mono.rate:,.0f}/s pipeline={burst.rate:,.0f}/s "
        f"throughput_ratio={ratio:.1f} (monolith/pipeline) "
        f"cpu_per_enrolment monolith={mono.cpu_ms:.2f}ms pipeline={burst.cpu_ms:.2f}ms "
        f"cpu_ratio={cpu_ratio:.1f} "
        f"p50 monolith={mono.p50 * 1000:.2f}ms "
        f"pipeline_paced={paced.p50 * 1000 if paced else float('nan'):.1f}ms "
        f"latency_ratio={latency:.0f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
