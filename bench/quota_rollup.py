"""Benchmark: the division roll-up of the quota query API over a province of 200,000 orgs.

Fills a quota database (SQLite by default, or ``--database-url``) with N orgs spread over the
county-level divisions of Hebei (130000), each holding the categories its kind allows with
realistic approved, occupied and reserved counts, and limits for the province, its cities and
counties. The rows go in through the service's migrated schema, so the database triggers of
migration 0003 keep ``division_totals`` while they are written. Then, through the service's own
query router (no network):

  baseline   ``GET /notices/{no}``: one primary-key row, the floor of a query round trip;
  service    ``GET /divisions/{code}/establishment`` as the service answers it (the maintained
             totals of the division's prefix), for the province, a city and a county;
  scan       the same sums computed the way the service did before the totals (a sum over
             ``establishment`` joined to ``org_projection`` for the prefix), for comparison;

and checks that the service's answers equal the scans and that every stored total equals a fresh
sum. Then the cost on the write side: W concurrent writers each committing slot-like
transactions (one establishment row of a random org: occupied + 1, reserved − 1, plus one
ledger row), with the triggers as migrated (``SHARDS`` parts per prefix and category), with one
part (every writer of a category in the province updates the same province row), and with no
triggers at all; the totals are checked after each maintained run. On PostgreSQL every write
leaves a dead version of the total rows it changed: the bench vacuums ``division_totals`` after
the fill and before each write run, as autovacuum does after a burst (migration 0003 gives the
table a fixed autovacuum threshold and room for HOT updates).

Figures, not assertions: ``python bench/quota_rollup.py`` (``-n 20000`` for a quick run).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import random
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from contracts import identifiers
from contracts.identifiers import division_prefix
from services.quota.adapters.orm import (
    division_totals,
    establishment,
    notices,
    org_projection,
    quota_ledger,
    region_limits,
)
from services.quota.adapters.repository import DivisionTotals, Totals
from services.quota.bootstrap import build
from services.runtime.db import is_transient
from services.runtime.settings import Settings

PROVINCE = "130000"
CHUNK = 5_000
ORGAN_SHARE = 0.3  # organs vs public institutions among the orgs

MIGRATION = (
    Path(__file__).resolve().parent.parent
    / "services/quota/migrations/versions/0003_division_totals.py"
)


def totals_migration() -> ModuleType:
    """Migration 0003, for its trigger DDL with another number of parts."""
    spec = importlib.util.spec_from_file_location("quota_0003_division_totals", MIGRATION)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def say(text: str) -> None:
    print(text, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def counties(province: str) -> list[str]:
    """Current county-level divisions of the province (GB/T 2260 data of ``contracts``)."""
    prefix = province[:2]
    found = []
    for n in range(10_000):
        code = f"{prefix}{n:04d}"
        division = identifiers.division(code)
        if division is not None and division.current and division.level == 3:
            found.append(code)
    return found


def org_rows(n: int, places: list[str], rng: random.Random) -> tuple[list[dict], list[dict]]:
    """N orgs and their establishment rows; some counties are much bigger than others."""
    weights = [rng.paretovariate(1.5) for _ in places]
    stamp = datetime.now(UTC)
    orgs: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for i, division in enumerate(rng.choices(places, weights, k=n)):
        org_id = str(uuid.UUID(int=rng.getrandbits(128)))
        organ = rng.random() < ORGAN_SHARE
        orgs.append(
            {
                "org_id": org_id,
                "kind": "organ" if organ else "public_institution",
                "division_code": division,
                "parent_org_id": None,
                "status": "active",
                "name": f"机构{i}",
                "updated_at": stamp,
            }
        )
        held = ["admin", "support"] if organ else ["institutional", "support"]
        if organ and rng.random() < 0.15:
            held.append("political_legal")
        if not organ and rng.random() < 0.1:
            held.append("institutional_csr")
        for category in held:
            approved = rng.randint(1, 8) if category == "support" else rng.randint(5, 80)
            occupied = int(approved * rng.uniform(0.7, 1.0))
            reserved = rng.randint(0, approved - occupied)
            rows.append(
                {
                    "org_id": org_id,
                    "category": category,
                    "approved": approved,
                    "occupied": occupied,
                    "reserved": reserved,
                    "funding": None,
                    "version": 1,
                    "updated_at": stamp,
                }
            )
    return orgs, rows


async def fill(rt: Any, n: int, seed: int) -> tuple[list[str], list[str], int, str]:
    """Fill the database (the triggers keep the totals meanwhile); the counties, the org ids,
    the establishment rows written, the busiest county."""
    rng = random.Random(seed)
    places = counties(PROVINCE)
    orgs, rows = org_rows(n, places, rng)
    stamp = datetime.now(UTC)
    # One transaction per chunk, as an import arrives: in one transaction of 400,000 rows every
    # total row would gather a new version per row (none can be pruned before the commit).
    for table, values in ((org_projection, orgs), (establishment, rows)):
        for start in range(0, len(values), CHUNK):
            async with rt.engine.begin() as conn:
                await conn.execute(insert(table), values[start : start + CHUNK])
    async with rt.engine.begin() as conn:
        limits = []
        for code in [PROVINCE, *sorted({c[:4] + "00" for c in places}), *places]:
            for category in ("admin", "institutional", "support", "political_legal"):
                limits.append(
                    {
                        "division_code": code,
                        "category": category,
                        "limit": 10_000_000,
                        "version": 1,
                        "updated_at": stamp,
                    }
                )
        await conn.execute(insert(region_limits), limits)
        await conn.execute(
            insert(notices).values(
                notice_no="冀编用〔2026〕1号",
                org_id=orgs[0]["org_id"],
                category="support",
                count=1,
                used=0,
                valid_until=date(2099, 12, 31),
                status="issued",
                document={"title": "用编核准", "number": "冀编用〔2026〕1号", "date": "2026-01-01"},
                issued_at=stamp,
                closed_at=None,
                version=1,
            )
        )
    busiest = Counter(o["division_code"] for o in orgs).most_common(1)[0][0]
    return places, [o["org_id"] for o in orgs], len(rows), busiest


async def timed(call: Callable[[], Awaitable[Any]], rounds: int) -> tuple[list[float], Any]:
    for _ in range(min(3, rounds)):  # warm caches and the connection pool
        answer = await call()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        answer = await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples, answer


def line(label: str, samples: list[float]) -> str:
    return (
        f"  {label:<46} p50 {statistics.median(samples):8.2f} ms   "
        f"p99 {percentile(samples, 0.99):8.2f} ms   ({len(samples)} calls)"
    )


async def scan(session: AsyncSession, code: str) -> dict[str, Totals]:
    """The roll-up as a sum over the subtree (what the service computed before the totals)."""
    rows = await session.execute(
        select(
            establishment.c.category,
            func.sum(establishment.c.approved).label("approved"),
            func.sum(establishment.c.occupied).label("occupied"),
            func.sum(establishment.c.reserved).label("reserved"),
            func.count().label("orgs"),
        )
        .select_from(
            establishment.join(org_projection, org_projection.c.org_id == establishment.c.org_id)
        )
        .where(org_projection.c.division_code.like(f"{division_prefix(code)}%"))
        .group_by(establishment.c.category)
    )
    return {
        r.category: Totals(int(r.approved), int(r.occupied), int(r.reserved), int(r.orgs))
        for r in rows
    }


def answered(body: dict[str, Any]) -> dict[str, Totals]:
    return {
        c["category"]: Totals(c["approved"], c["occupied"], c["reserved"], c["orgs"])
        for c in body["categories"]
        if c["orgs"]
    }


async def install(rt: Any, shards: int | None) -> None:
    """Replace the triggers: ``shards`` parts per prefix and category (refilled), or none."""
    migration = totals_migration()
    dialect = rt.engine.dialect.name
    async with rt.engine.begin() as conn:
        for statement in migration.drop_triggers(dialect):
            await conn.execute(text(statement))
        await conn.execute(delete(division_totals))
        if shards is None:
            return
        ddl = (
            migration.postgresql_triggers(shards)
            if dialect == "postgresql"
            else migration.sqlite_triggers()
        )
        for statement in ddl:
            await conn.execute(text(statement))
        await conn.execute(text(migration.fill_sql(dialect, shards)))


async def vacuum(rt: Any) -> None:
    """PostgreSQL: vacuum the totals, as autovacuum does after a burst of writes (every write
    leaves a dead row version of the totals it changed; SQLite updates rows in place)."""
    if rt.engine.dialect.name != "postgresql":
        return
    async with rt.engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("VACUUM ANALYZE division_totals"))


async def writers(
    rt: Any, org_ids: list[str], count: int, txns: int, seed: int
) -> tuple[list[float], float, int]:
    """``count`` concurrent writers, ``txns`` slot-like transactions each; the latencies (ms),
    the wall time (s) and how many attempts failed transiently and were retried."""
    categories = {}
    async with rt.engine.connect() as conn:
        for org_id, category in await conn.execute(
            select(establishment.c.org_id, establishment.c.category).where(
                establishment.c.category.in_(("admin", "institutional"))
            )
        ):
            categories[org_id] = category
    picks = [o for o in org_ids if o in categories]
    stamp = datetime.now(UTC)
    latencies: list[float] = []
    retried = 0

    async def one(rng: random.Random, n: int) -> None:
        nonlocal retried
        org_id = rng.choice(picks)
        delta = rng.choice((1, -1))
        while True:
            started = time.perf_counter()
            try:
                async with rt.sessions() as session:
                    await session.execute(
                        update(establishment)
                        .where(
                            establishment.c.org_id == org_id,
                            establishment.c.category == categories[org_id],
                            # as the slot handlers do: a conditional update
                            (establishment.c.reserved if delta > 0 else establishment.c.occupied)
                            >= 1,
                        )
                        .values(
                            occupied=establishment.c.occupied + delta,
                            reserved=establishment.c.reserved - delta,
                            version=establishment.c.version + 1,
                        )
                    )
                    await session.execute(
                        insert(quota_ledger).values(
                            event_id=f"bench-{n}",
                            event_type="bench.SlotOccupied",
                            command_id=f"bench-{n}",
                            org_id=org_id,
                            category=categories[org_id],
                            effective_date=stamp.date(),
                            recorded_at=stamp,
                            after={"occupied": delta},
                        )
                    )
                    await session.commit()
                latencies.append((time.perf_counter() - started) * 1000)
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                retried += 1
                await asyncio.sleep(0.01)

    async def writer(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        for n in range(txns):
            await one(rng, i * txns + n)

    started = time.perf_counter()
    await asyncio.gather(*(writer(i) for i in range(count)))
    return latencies, time.perf_counter() - started, retried


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--orgs", type=int, default=200_000)
    parser.add_argument(
        "--rounds", type=int, default=200, help="calls per indexed query (default 200)"
    )
    parser.add_argument(
        "--scan-rounds", type=int, default=10, help="calls per scanning roll-up (default 10)"
    )
    parser.add_argument("--writers", type=int, default=8, help="concurrent writers (default 8)")
    parser.add_argument(
        "--txns", type=int, default=150, help="transactions per writer and variant (default 150)"
    )
    parser.add_argument("--database-url", help="a fresh quota database (default: SQLite file)")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bianzhi-rollup-") as tmp:
        url = args.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'quota.db'}"
        os.environ["BIANZHI_QUOTA_DATABASE_URL"] = url
        rt = build(Settings(data_dir=Path(tmp), kafka_bootstrap="localhost:1", log_level="ERROR"))
        await rt.migrate()
        dialect = rt.engine.dialect.name
        started = time.perf_counter()
        places, org_ids, rows, county = await fill(rt, args.orgs, args.seed)
        say(
            f"filled {args.orgs:,} orgs, {rows:,} establishment rows over {len(places)} "
            f"counties of {PROVINCE} in {time.perf_counter() - started:.1f}s, totals kept by "
            f"the triggers ({dialect})"
        )
        city = county[:4] + "00"
        codes = (("province", PROVINCE), ("city", city), ("county", county))
        api = httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.router), base_url="http://q")

        async def get(path: str) -> Any:
            response = await api.get(path)
            assert response.status_code == 200, response.text
            return response.json()

        async def scanned(code: str) -> dict[str, Totals]:
            async with rt.read_sessions() as session:
                return await scan(session, code)

        say("division roll-up (all categories):")
        base, _ = await timed(lambda: get("/notices/冀编用〔2026〕1号"), args.rounds)
        say(line("baseline: one notice by key", base))
        if dialect == "postgresql":
            samples, _ = await timed(
                lambda: get(f"/divisions/{PROVINCE}/establishment"), args.rounds
            )
            say(line(f"service: province {PROVINCE}, before VACUUM", samples))
            await vacuum(rt)
        answers = {}
        for label, code in codes:
            samples, answers[code] = await timed(
                lambda code=code: get(f"/divisions/{code}/establishment"), args.rounds
            )
            say(line(f"service: {label} {code} (maintained totals)", samples))
        equal = True
        for label, code in codes:
            samples, summed = await timed(lambda code=code: scanned(code), args.scan_rounds)
            say(line(f"scan: {label} {code} (sum over the subtree)", samples))
            equal = equal and answered(answers[code]) == summed
        say(f"  service answers equal the scans: {equal}")
        async with rt.read_sessions() as session:
            drift = await DivisionTotals(session).mismatches()
        say(f"  stored totals equal a fresh sum at every level: {drift == []}")
        say("target: province roll-up p99 <= 20 ms from maintained aggregates")

        shards = totals_migration().SHARDS
        say(
            f"writes: {args.writers} concurrent writers x {args.txns} slot-like transactions "
            "(one establishment row + one ledger row)"
        )
        variants: list[tuple[str, int | None]] = [(f"triggers, {shards} parts (as migrated)", 0)]
        if dialect == "postgresql":
            variants.append(("triggers, 1 part (one province row)", 1))
        variants.append(("no triggers (no totals kept)", None))
        for label, parts in variants:
            if parts != 0:
                await install(rt, parts)
            await vacuum(rt)
            latencies, wall, retried = await writers(
                rt, org_ids, args.writers, args.txns, args.seed
            )
            say(line(label, latencies) + f"  {len(latencies) / wall:7.0f} txn/s, {retried} retried")
            if parts is not None:
                async with rt.read_sessions() as session:
                    drift = await DivisionTotals(session).mismatches()
                say(f"    totals equal a fresh sum after the writes: {drift == []}")
        await api.aclose()
        await rt.engine.dispose()
        await rt.read_engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
