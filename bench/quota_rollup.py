"""Benchmark: the division roll-up of the quota query API over a province of 200,000 orgs.

Fills a quota database (SQLite by default, or ``--database-url``) with N orgs spread over the
county-level divisions of Hebei (130000), each holding the categories its kind allows with
realistic approved, occupied and reserved counts, and limits for the province, its cities and
counties. Then it measures, through the service's own query router (no network):

  baseline   ``GET /notices/{no}``: one primary-key row, the floor of a query round trip;
  today      ``GET /divisions/{code}/establishment`` as the service answers it now (sums over
             ``establishment`` joined to ``org_projection`` for the division prefix), for the
             province, a city and a county;
  aggregates the same province answer from a table of totals per division prefix and category
             (one indexed read), the design the target assumes; the bench fills that table
             itself and checks it gives the same numbers, the service does not keep it yet.

Figures, not assertions: ``python bench/quota_rollup.py`` (``-n 20000`` for a quick run).
"""

from __future__ import annotations

import argparse
import asyncio
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
from typing import Any

import httpx
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    func,
    insert,
    literal,
    select,
    union_all,
)

from contracts import identifiers
from services.quota.adapters.orm import (
    establishment,
    notices,
    org_projection,
    region_limits,
)
from services.quota.bootstrap import build
from services.runtime.settings import Settings

PROVINCE = "130000"
CHUNK = 5_000
ORGAN_SHARE = 0.3  # organs vs public institutions among the orgs

totals = Table(
    "bench_division_totals",
    MetaData(),
    Column("prefix", String(6), nullable=False),
    Column("category", String(32), nullable=False),
    Column("approved", Integer, nullable=False),
    Column("occupied", Integer, nullable=False),
    Column("reserved", Integer, nullable=False),
    Column("orgs", Integer, nullable=False),
    PrimaryKeyConstraint("prefix", "category"),
)


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


async def fill(rt: Any, n: int, seed: int) -> tuple[list[str], int, str]:
    """Fill the database; the counties, the establishment rows written, the busiest county."""
    rng = random.Random(seed)
    places = counties(PROVINCE)
    orgs, rows = org_rows(n, places, rng)
    stamp = datetime.now(UTC)
    async with rt.engine.begin() as conn:
        for table, values in ((org_projection, orgs), (establishment, rows)):
            for start in range(0, len(values), CHUNK):
                await conn.execute(insert(table), values[start : start + CHUNK])
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
        await conn.run_sync(totals.metadata.create_all)
        # The totals a maintained aggregate would hold: per division prefix (province, city,
        # county, as GB/T 2260 codes nest) and category.
        joined = establishment.join(
            org_projection, org_projection.c.org_id == establishment.c.org_id
        )
        levels = []
        for width in (2, 4, 6):
            prefix = func.substr(org_projection.c.division_code, 1, width)
            levels.append(
                select(
                    prefix.label("prefix"),
                    establishment.c.category,
                    func.sum(establishment.c.approved).label("approved"),
                    func.sum(establishment.c.occupied).label("occupied"),
                    func.sum(establishment.c.reserved).label("reserved"),
                    func.count().label("orgs"),
                )
                .select_from(joined)
                .group_by(prefix, establishment.c.category)
            )
        await conn.execute(
            insert(totals).from_select(
                ["prefix", "category", "approved", "occupied", "reserved", "orgs"],
                union_all(*levels),
            )
        )
    busiest = Counter(o["division_code"] for o in orgs).most_common(1)[0][0]
    return places, len(rows), busiest


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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--orgs", type=int, default=200_000)
    parser.add_argument(
        "--rounds", type=int, default=200, help="calls per indexed query (default 200)"
    )
    parser.add_argument(
        "--scan-rounds", type=int, default=10, help="calls per scanning roll-up (default 10)"
    )
    parser.add_argument("--database-url", help="a fresh quota database (default: SQLite file)")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bianzhi-rollup-") as tmp:
        url = args.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'quota.db'}"
        os.environ["BIANZHI_QUOTA_DATABASE_URL"] = url
        rt = build(Settings(data_dir=Path(tmp), kafka_bootstrap="localhost:1", log_level="ERROR"))
        await rt.migrate()
        started = time.perf_counter()
        places, rows, county = await fill(rt, args.orgs, args.seed)
        say(
            f"filled {args.orgs:,} orgs, {rows:,} establishment rows over {len(places)} "
            f"counties of {PROVINCE} in {time.perf_counter() - started:.1f}s "
            f"({rt.engine.dialect.name})"
        )
        city = county[:4] + "00"
        api = httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.router), base_url="http://q")

        async def get(path: str) -> Any:
            response = await api.get(path)
            assert response.status_code == 200, response.text
            return response.json()

        say("division roll-up (all categories):")
        base, _ = await timed(lambda: get("/notices/冀编用〔2026〕1号"), args.rounds)
        say(line("baseline: one notice by key", base))
        results = {}
        for label, code in (("province", PROVINCE), ("city", city), ("county", county)):
            samples, answer = await timed(
                lambda code=code: get(f"/divisions/{code}/establishment"), args.scan_rounds
            )
            results[label] = answer
            say(line(f"today: {label} {code} (scan of the subtree)", samples))

        async def from_totals() -> dict[str, tuple[int, int, int, int]]:
            async with rt.read_sessions() as session:
                found = await session.execute(
                    select(totals).where(totals.c.prefix == literal(PROVINCE[:2]))
                )
                return {r.category: (r.approved, r.occupied, r.reserved, r.orgs) for r in found}

        samples, aggregated = await timed(from_totals, args.rounds)
        say(line(f"aggregates: province {PROVINCE} (indexed read)", samples))
        scanned = {
            c["category"]: (c["approved"], c["occupied"], c["reserved"], c["orgs"])
            for c in results["province"]["categories"]
        }
        say(f"  aggregates equal the scanned answer: {aggregated == scanned}")
        say("target: province roll-up p99 <= 20 ms from maintained aggregates")
        await api.aclose()
        await rt.engine.dispose()
        await rt.read_engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
