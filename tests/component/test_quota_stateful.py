"""The quota stateful machine of ``tests/unit/test_quota_stateful.py`` through the real quota
service: every command goes into the command consumer as if it came off its topic, is handled
in its own transaction by the handlers on SQLite and PostgreSQL, and its result is read from the
outbox; the ledger is read back from the tables after every step and must equal the model's and
keep WIRE-CONTRACT §7, and the quota events it emitted, replayed, must rebuild every count
(§7.5). Days pass by replacing the handlers' calendar; the expiry sweep is the
service's own (``sweep_once``).

Fewer sequences than the pure machine (each step is a database transaction and a read of the
ledger); the pure machine runs the 1,000.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from datetime import date
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from sqlalchemy import delete, select

from contracts.base import Message
from contracts.orgs import OrgRegistered
from services.quota.adapters.orm import (
    establishment,
    leader_posts,
    notices,
    quota_ledger,
    region_limits,
    slot_requests,
    slots,
)
from services.quota.service_layer import expiry, handlers, rebuild
from services.runtime.app import ServiceRuntime
from tests.component import test_quota_handlers
from tests.component.test_orgs_handlers import COMPLETED as COMPLETED_TYPE
from tests.component.test_quota_handlers import ORG_DOC, org_event, send
from tests.unit.test_quota_stateful import (
    COMPLETED,
    ORG_IDS,
    ORG_NAMES,
    ORGS,
    PERSON_NAMES,
    Ledger,
    QuotaMachine,
    Snapshot,
)

# The service and its org projection, as the handler tests build them.
quota = test_quota_handlers.quota
projection = test_quota_handlers.projection

# Sequences per database: each runs up to 25 commands, each a transaction, and reads the ledger
# (about 15-20 s per database on the 2-core machine). More for a longer search:
# BIANZHI_QUOTA_FUZZ_SEQUENCES=500.
SEQUENCES = int(os.environ.get("BIANZHI_QUOTA_FUZZ_SEQUENCES", "30"))

T = TypeVar("T")


class HandlerLedger(Ledger):
    """The quota service's command consumer and tables, driven from Hypothesis's thread."""

    def __init__(
        self, rt: ServiceRuntime, loop: asyncio.AbstractEventLoop, mp: pytest.MonkeyPatch
    ) -> None:
        self.rt = rt
        self.loop = loop
        self.mp = mp
        self.wait(self.reset())

    def wait(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)  # type: ignore[arg-type]

    async def reset(self) -> None:
        """An empty ledger for the next sequence (the org projection stays)."""
        tables = self.rt.definition.tables
        async with self.rt.sessions() as session:
            for table in (
                establishment,
                region_limits,
                leader_posts,
                notices,
                slots,
                slot_requests,
                quota_ledger,
                tables.outbox,
                tables.inbox,
                tables.command_results,
            ):
                await session.execute(delete(table))
            await session.commit()

    def execute(self, command: Message) -> str:
        result = self.wait(send(self.rt, command))
        if result.type == COMPLETED_TYPE:
            return COMPLETED
        return str(result.data["code"])

    def set_today(self, day: date) -> None:
        self.mp.setattr(handlers, "today", lambda: day)

    def sweep(self) -> None:
        self.wait(expiry.sweep_once(self.rt))

    def observe(self) -> Snapshot:
        return self.wait(self.read())

    def replay_mismatches(self) -> list[Any]:
        return self.wait(self.replay())

    async def replay(self) -> list[Any]:
        """The quota events in the outbox, replayed, against the counts in the tables."""
        async with self.rt.sessions() as session:
            rebuilt = rebuild.rebuild(await rebuild.outbox_events(session))
            return rebuild.compare(rebuilt, await rebuild.live_counts(session))

    async def read(self) -> Snapshot:
        async with self.rt.sessions() as session:

            async def rows(*columns: Any) -> list[Any]:
                return list((await session.execute(select(*columns))).all())

            est = await rows(
                establishment.c.org_id,
                establishment.c.category,
                establishment.c.approved,
                establishment.c.occupied,
                establishment.c.reserved,
            )
            limits = await rows(
                region_limits.c.division_code, region_limits.c.category, region_limits.c.limit
            )
            posts = await rows(leader_posts)
            issued = await rows(notices)
            held = await rows(slots)
        return Snapshot(
            establishment={
                (ORG_NAMES[r.org_id], r.category): (r.approved, r.occupied, r.reserved)
                for r in est
                if r.approved or r.occupied or r.reserved
            },
            limits={(r.division_code, r.category): r.limit for r in limits},
            posts={
                ORG_NAMES[r.org_id]: (r.principal, r.deputy, r.principal_held, r.deputy_held)
                for r in posts
                if r.unit_id == ""
                and (r.principal or r.deputy or r.principal_held or r.deputy_held)
            },
            notices={
                r.notice_no: (ORG_NAMES[r.org_id], r.category, r.count, r.used, r.status)
                for r in issued
            },
            slots={
                PERSON_NAMES[r.person_id]: (
                    ORG_NAMES[r.org_id],
                    r.category,
                    r.notice_no,
                    r.leader_post,
                )
                for r in held
            },
        )


@pytest.mark.timeout(1200)  # a failure is shrunk to its shortest sequence, one transaction a step
async def test_quota_rules_hold_through_the_handlers(
    quota: ServiceRuntime, projection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, place in ORGS.items():
        if place is None:
            continue  # quota never hears of org E
        kind, county = place
        await org_event(
            projection,
            OrgRegistered(
                org_id=ORG_IDS[name],
                name=f"状态机测试单位{name}",
                kind=kind,
                division_code=county,
                document=ORG_DOC,
                effective_date=ORG_DOC.date,
            ),
        )
    loop = asyncio.get_running_loop()

    class HandlerQuotaMachine(QuotaMachine):
        def make_ledger(self) -> Ledger:
            return HandlerLedger(quota, loop, monkeypatch)

    await asyncio.to_thread(
        run_state_machine_as_test,
        HandlerQuotaMachine,
        settings=settings(
            max_examples=SEQUENCES,
            stateful_step_count=25,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
