"""The maintained division roll-up (``division_totals``, kept by the database triggers of
migration 0003) against fresh sums over the orgs, without Kafka, on SQLite and PostgreSQL.

The oracle is the roll-up as the service computed it before: a sum over ``establishment`` joined
to ``org_projection`` for the division's code prefix (``LIKE '13%'``).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.codes import Category, OrgKind
from contracts.identifiers import division_prefix
from contracts.orgs import OrgMoved
from contracts.quota import ApproveQuota, MergeEstablishments, SetLeaderPosts, SetRegionLimit
from services.quota.adapters.orm import division_totals, establishment, org_projection
from services.quota.adapters.repository import DivisionTotals, Totals, TotalsMismatch
from services.quota.bootstrap import build, definition
from services.quota.service_layer import handlers
from services.runtime.app import ServiceRuntime
from services.runtime.db import create_engine, is_transient
from services.runtime.migrate import alembic_config, upgrade
from tests.component import test_quota_handlers
from tests.component.test_quota_handlers import ORG_DOC, get, org, org_event
from tests.component.test_quota_rebuild import START, Office, doc
from tests.conftest import service_settings
from tests.support.databases import database

quota = test_quota_handlers.quota
projection = test_quota_handlers.projection

# Where the orgs of the mix sit and where they may be moved: counties of two cities of Hebei, a
# county-level city, a city-level and a province-level org, and one county of Shanxi.
PLACES = ["130102", "130104", "130181", "130100", "130203", "130000", "140105"]
QUERIED = ["130000", "130100", "130200", "130102", "130104", "130181", "130203", "140000"]


# --- the oracle ----------------------------------------------------------------------------


async def scanned(session: AsyncSession, code: str) -> dict[str, Totals]:
    """The roll-up of ``code`` as a sum over its subtree (what the service answered before)."""
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
    """The categories of a roll-up answer that some org of the subtree has a row for."""
    found = {}
    for row in body["categories"]:
        totals = Totals(row["approved"], row["occupied"], row["reserved"], row["orgs"])
        assert row["vacant"] == max(row["approved"] - row["occupied"] - row["reserved"], 0)
        if row["orgs"]:
            found[row["category"]] = totals
        else:  # a category with a limit only
            assert totals == Totals(), row
    return found


async def check_totals(rt: ServiceRuntime, codes: list[str] = QUERIED) -> None:
    """Every stored total equals a fresh sum, and the API answers what a scan would."""
    async with rt.sessions() as session:
        assert await DivisionTotals(session).mismatches() == []
        expected = {code: await scanned(session, code) for code in codes}
    for code in codes:
        body = await get(rt, f"/divisions/{code}/establishment")
        assert answered(body) == expected[code], code


# --- a realistic mix through the service ---------------------------------------------------


class MovingOffice(Office):
    """The office of the rebuild tests, whose orgs also move between divisions and merge."""

    kinds: dict[uuid.UUID, OrgKind]

    async def move_org(self, projection: Any) -> None:
        org_id, _ = self.pick_org()
        await org_event(
            projection,
            OrgMoved(
                org_id=org_id,
                parent_org_id=self.new_id(),
                division_code=self.rng.choice(PLACES),
                document=ORG_DOC,
                effective_date=self.day,
            ),
        )
        self.outcomes["org_moved"] += 1

    async def merge(self) -> None:
        target, category = self.pick_org()
        peers = [(o, c) for o, c in self.orgs if c is category and o != target]
        if len(peers) < 2:  # keep an org of the category to transfer with
            return
        sources = [o for o, _ in self.rng.sample(peers, self.rng.randint(1, min(2, len(peers))))]
        cmd = MergeEstablishments(
            request_id=uuid.uuid4(),
            source_org_ids=sources,
            target_org_id=target,
            document=doc(self.day),
        )
        if not await self.send(cmd):
            return
        self.orgs = [(o, c) for o, c in self.orgs if o not in sources]
        for person, (holder, cat) in list(self.holders.items()):
            if holder in sources:
                self.holders[person] = (target, cat)
        for number, (holder, cat) in list(self.notices.items()):
            if holder in sources:
                self.notices[number] = (target, cat)


async def run_mix(
    rt: ServiceRuntime, projection: Any, monkeypatch: pytest.MonkeyPatch, seed: int
) -> MovingOffice:
    office = MovingOffice(rt, random.Random(seed))
    office.kinds = {}
    monkeypatch.setattr(handlers, "today", lambda: office.day)
    layout = [
        (OrgKind.ORGAN, "130102", Category.ADMIN),
        (OrgKind.ORGAN, "130102", Category.ADMIN),
        (OrgKind.ORGAN, "130104", Category.ADMIN),
        (OrgKind.ORGAN, "130181", Category.ADMIN),
        (OrgKind.ORGAN, "130100", Category.ADMIN),
        (OrgKind.ORGAN, "130203", Category.ADMIN),
        (OrgKind.ORGAN, "130000", Category.ADMIN),
        (OrgKind.PUBLIC_INSTITUTION, "130104", Category.INSTITUTIONAL),
        (OrgKind.PUBLIC_INSTITUTION, "130203", Category.INSTITUTIONAL),
        (OrgKind.PUBLIC_INSTITUTION, "130102", Category.INSTITUTIONAL),
        (OrgKind.PUBLIC_INSTITUTION, "130000", Category.INSTITUTIONAL),
    ]
    for kind, division, category in layout:
        org_id = await org(projection, kind=kind, division_code=division, name="机构")
        office.orgs.append((org_id, category))
        office.kinds[org_id] = kind
        office.units[org_id] = uuid.uuid4()
    await office.send(
        SetRegionLimit(
            division_code="130000", category=Category.ADMIN, limit=400, document=doc(START)
        )
    )
    for org_id, category in office.orgs:
        await office.send(
            ApproveQuota(
                org_id=org_id,
                category=category,
                approved=20,
                document=doc(START),
                effective_date=START,
            )
        )
        if office.kinds[org_id] is OrgKind.ORGAN:  # organs also hold support staff places
            await office.send(
                ApproveQuota(
                    org_id=org_id,
                    category=Category.SUPPORT,
                    approved=3,
                    document=doc(START),
                    effective_date=START,
                )
            )
        await office.send(SetLeaderPosts(org_id=org_id, principal=1, deputy=3, document=doc(START)))
    await check_totals(rt)
    merges = 0
    for i in range(320):
        roll = office.rng.random()
        if roll < 0.07:
            await office.move_org(projection)
        elif roll < 0.09 and merges < 3:
            await office.merge()
            merges += 1
        else:
            await office.step()
        if i % 40 == 39:  # the totals agree at every point, not only at the end
            await check_totals(rt)
    await check_totals(rt)
    return office


@pytest.mark.parametrize("seed", [7, 23])
async def test_the_totals_equal_a_fresh_sum_after_a_realistic_mix(
    quota: ServiceRuntime, projection: Any, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    office = await run_mix(quota, projection, monkeypatch, seed)
    seen = office.outcomes
    for needed in (
        "ApproveQuota:ok",
        "TransferQuota:ok",
        "IssueQuotaUseNotice:ok",
        "CancelQuotaUseNotice:ok",
        "OccupySlot:ok",
        "ReleaseSlot:ok",
        "MoveSlot:ok",
        "MergeEstablishments:ok",
        "org_moved",
        "expired",
    ):
        assert seen[needed] > 0, (needed, seen)
    async with quota.sessions() as session:
        stored = await DivisionTotals(session).stored()
    # Every level is kept, and the orgs moved to Shanxi are counted there.
    widths = {len(prefix) for prefix, _ in stored}
    assert widths == {2, 4, 6}, stored
    assert {prefix for prefix, _ in stored} >= {"13", "1301", "130102"}


# --- each kind of write, on the tables directly --------------------------------------------


def est(org_id: str, category: str, approved: int, occupied: int, reserved: int) -> dict:
    return {
        "org_id": org_id,
        "category": category,
        "approved": approved,
        "occupied": occupied,
        "reserved": reserved,
        "funding": None,
        "version": 1,
        "updated_at": datetime.now(UTC),
    }


def projected(org_id: str, division_code: str | None) -> dict:
    return {
        "org_id": org_id,
        "kind": "organ" if division_code else None,
        "division_code": division_code,
        "parent_org_id": None,
        "status": "active",
        "name": None,
        "updated_at": datetime.now(UTC),
    }


async def write(rt: ServiceRuntime, *statements: Any) -> None:
    async with rt.sessions() as session:
        for statement in statements:
            await session.execute(statement)
        await session.commit()


async def rollup(rt: ServiceRuntime, code: str) -> dict[str, Totals]:
    async with rt.sessions() as session:
        return await DivisionTotals(session).of(code)


async def test_every_kind_of_write_keeps_the_totals(quota: ServiceRuntime) -> None:
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    key = (establishment.c.org_id == a, establishment.c.category == "admin")

    async def step(*statements: Any) -> None:
        await write(quota, *statements)
        await check_totals(quota, ["130000", "130100", "130102", "130203", "140000"])

    # A row of an org the projection does not know yet adds nothing; its registration adds it.
    await step(insert(establishment).values(est(a, "admin", 10, 4, 2)))
    assert await rollup(quota, "130000") == {}
    await step(insert(org_projection).values(projected(a, "130102")))
    assert await rollup(quota, "130102") == {"admin": Totals(10, 4, 2, 1)}
    # An org first seen bare (a merge before its registration), then given its division.
    await step(
        insert(org_projection).values(projected(b, None)),
        insert(establishment).values(est(b, "admin", 5, 0, 0)),
    )
    assert await rollup(quota, "130000") == {"admin": Totals(10, 4, 2, 1)}
    await step(
        update(org_projection).where(org_projection.c.org_id == b).values(division_code="130203")
    )
    assert await rollup(quota, "130000") == {"admin": Totals(15, 4, 2, 2)}
    # Counts change; a change of version or stamp only is no change.
    await step(update(establishment).where(*key).values(occupied=5, reserved=1))
    await step(update(establishment).where(*key).values(version=establishment.c.version + 1))
    assert await rollup(quota, "130100") == {"admin": Totals(10, 5, 1, 1)}
    # A row changing its key moves with it.
    await step(update(establishment).where(*key).values(category="support"))
    assert await rollup(quota, "130102") == {"support": Totals(10, 5, 1, 1)}
    await step(
        update(establishment)
        .where(establishment.c.org_id == a, establishment.c.category == "support")
        .values(org_id=c)
    )
    assert await rollup(quota, "130102") == {}
    await step(insert(org_projection).values(projected(c, "130104")))
    assert await rollup(quota, "130100") == {"support": Totals(10, 5, 1, 1)}
    # An org moving to another province takes its rows along; a renamed or closed one does not.
    await step(
        update(org_projection).where(org_projection.c.org_id == c).values(division_code="140105")
    )
    assert await rollup(quota, "140000") == {"support": Totals(10, 5, 1, 1)}
    assert await rollup(quota, "130100") == {}
    await step(
        update(org_projection)
        .where(org_projection.c.org_id == c)
        .values(name="新名称", status="merged")
    )
    assert await rollup(quota, "140105") == {"support": Totals(10, 5, 1, 1)}
    # Deleting rows takes them off.
    await step(delete(establishment).where(establishment.c.org_id == c))
    await step(delete(org_projection).where(org_projection.c.org_id == b))
    assert await rollup(quota, "130000") == {}
    assert await rollup(quota, "140000") == {}


async def test_the_comparison_finds_a_total_that_drifted(quota: ServiceRuntime) -> None:
    a = str(uuid.uuid4())
    await write(
        quota,
        insert(org_projection).values(projected(a, "130102")),
        insert(establishment).values(est(a, "admin", 7, 3, 1)),
    )
    await check_totals(quota)
    await write(
        quota,
        update(division_totals)
        .where(division_totals.c.prefix == "1301", division_totals.c.category == "admin")
        .values(occupied=division_totals.c.occupied + 2),
    )
    async with quota.sessions() as session:
        found = await DivisionTotals(session).mismatches()
    assert found == [TotalsMismatch("1301", "admin", "occupied", 5, 3)]
    assert (await get(quota, "/divisions/130100/establishment"))["categories"][0]["occupied"] == 5


# --- the migration -------------------------------------------------------------------------


async def test_the_migration_fills_the_totals_from_the_rows_there_are(
    db_backend: str, tmp_path: Path
) -> None:
    spec = definition()
    rng = random.Random(5)
    async with database(db_backend, tmp_path, "quota") as url:
        await upgrade("quota", spec.migrations_dir, url, "0002")
        engine = create_engine(url)
        try:
            orgs, rows = [], []
            for _ in range(60):
                org_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                orgs.append(projected(org_id, rng.choice([*PLACES, None])))
                for category in rng.sample(["admin", "support", "institutional"], 2):
                    approved = rng.randint(0, 30)
                    occupied = rng.randint(0, approved)
                    rows.append(est(org_id, category, approved, occupied, approved - occupied))
            async with engine.begin() as conn:
                await conn.execute(insert(org_projection), orgs)
                await conn.execute(insert(establishment), rows)
            await upgrade("quota", spec.migrations_dir, url)
            async with AsyncSession(engine) as session:
                totals = DivisionTotals(session)
                assert await totals.mismatches() == []
                assert len(await totals.stored()) > 20
                for code in QUERIED:
                    assert await totals.of(code) == await scanned(session, code), code
            # Downgrading removes the table and its triggers: the ledger is writable without them.
            cfg = alembic_config("quota", spec.migrations_dir, url)
            await asyncio.to_thread(command.downgrade, cfg, "0002")
            async with engine.begin() as conn:
                await conn.execute(
                    update(establishment).values(approved=establishment.c.approved + 1)
                )
                await conn.execute(delete(org_projection))
        finally:
            await engine.dispose()


# --- concurrent writers ----------------------------------------------------------------------


async def retrying(op: Callable[[], Awaitable[None]]) -> int:
    """Run ``op`` until it commits, as the consumers do with transient failures (a deadlock, a
    busy database); how many attempts failed."""
    failed = 0
    while True:
        try:
            await op()
            return failed
        except Exception as exc:
            if not is_transient(exc):
                raise
            failed += 1
            await asyncio.sleep(0.01 * failed)


async def test_concurrent_slot_changes_and_org_moves_keep_the_totals(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers changing counts of orgs of one province while the projection moves some of those
    orgs between divisions: on PostgreSQL a count change and a move of the same org cannot
    interleave so that the change lands on the division the org just left."""
    monkeypatch.setenv("BIANZHI_QUOTA_DATABASE_URL", db_url)
    rt = build(service_settings(tmp_path, "localhost:1"))
    await rt.migrate()
    rng = random.Random(17)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(24)]
    try:
        await write(
            rt,
            insert(org_projection).values([projected(o, rng.choice(PLACES)) for o in ids]),
            insert(establishment).values(
                [est(o, cat, 500, 100, 100) for o in ids for cat in ("admin", "support")]
            ),
        )

        async def writer(seed: int) -> int:
            local = random.Random(seed)
            failed = 0
            for _ in range(25):
                picks = [(local.choice(ids), local.choice(["admin", "support"])) for _ in range(3)]
                delta = local.choice([-1, 1])

                async def once(picks: list[tuple[str, str]] = picks, delta: int = delta) -> None:
                    async with rt.sessions() as session:
                        for org_id, category in picks:
                            await session.execute(
                                update(establishment)
                                .where(
                                    establishment.c.org_id == org_id,
                                    establishment.c.category == category,
                                )
                                .values(
                                    occupied=establishment.c.occupied + delta,
                                    reserved=establishment.c.reserved - delta,
                                )
                            )
                            await asyncio.sleep(0)
                        await session.commit()

                failed += await retrying(once)
            return failed

        async def mover() -> int:
            failed = 0
            for _ in range(40):
                org_id, place = rng.choice(ids), rng.choice(PLACES)

                async def once(org_id: str = org_id, place: str = place) -> None:
                    async with rt.sessions() as session:
                        await session.execute(
                            update(org_projection)
                            .where(org_projection.c.org_id == org_id)
                            .values(division_code=place)
                        )
                        await asyncio.sleep(0)
                        await session.commit()

                failed += await retrying(once)
            return failed

        await asyncio.gather(*(writer(s) for s in range(4)), mover())
        await check_totals(rt)
        async with rt.sessions() as session:
            province = (await DivisionTotals(session).of("130000")).get("admin", Totals())
            shanxi = (await DivisionTotals(session).of("140000")).get("admin", Totals())
        assert province.orgs + shanxi.orgs == len(ids)
        assert province.occupied + province.reserved + shanxi.occupied + shanxi.reserved == (
            200 * len(ids)
        )
    finally:
        await rt.engine.dispose()
        await rt.read_engine.dispose()
