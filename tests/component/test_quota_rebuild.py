"""Replaying the quota events rebuilds every count (WIRE-CONTRACT §7.5), on SQLite and PostgreSQL.

A seeded sequence of a few hundred commands — approvals, transfers, limits, leader posts,
notices issued, cancelled and expired, slots occupied, released and moved, refusals and
re-sent commands — runs through the service; then the events alone, fed to a fresh projection
in publishing order, must give every approved, occupied, reserved and leader-post count the
database holds.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from contracts.base import Message
from contracts.codes import Category, LeaderPost, OrgKind
from contracts.common import Document
from contracts.envelope import Envelope
from contracts.quota import (
    ApproveQuota,
    CancelQuotaUseNotice,
    IssueQuotaUseNotice,
    MoveSlot,
    OccupySlot,
    ReleaseSlot,
    SetLeaderPosts,
    SetRegionLimit,
    TransferQuota,
)
from contracts.topics import QUOTA_COMMANDS
from services.quota.adapters.orm import establishment, leader_posts
from services.quota.service_layer import handlers
from services.quota.service_layer.expiry import sweep_once
from services.quota.service_layer.rebuild import (
    Mismatch,
    compare,
    live_counts,
    outbox_events,
    rebuild,
)
from services.runtime.app import ServiceRuntime
from tests.component import test_quota_handlers
from tests.component.test_quota_handlers import envelope, org, raw, result

quota = test_quota_handlers.quota
projection = test_quota_handlers.projection

COMPLETED = "bianzhi.CommandCompleted.v1"
START = date(2026, 3, 1)


def doc(day: date) -> Document:
    return Document(title="关于核定编制的批复", number=f"冀编〔2026〕{day.toordinal()}号", date=day)


@dataclass
class Office:
    """What the driver knows: orgs with their categories, open notices, who holds a slot."""

    rt: ServiceRuntime
    rng: random.Random
    day: date = START
    orgs: list[tuple[uuid.UUID, Category]] = field(default_factory=list)
    units: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)
    notices: dict[str, tuple[uuid.UUID, Category]] = field(default_factory=dict)
    holders: dict[uuid.UUID, tuple[uuid.UUID, Category]] = field(default_factory=dict)
    sent: list[Envelope] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    async def send(self, payload: Message, *, again: Envelope | None = None) -> bool:
        slot_step = isinstance(payload, OccupySlot | ReleaseSlot | MoveSlot)
        actor = {"actorroles": "clerk"} if slot_step else {}
        env = again or envelope(payload, **actor)
        await self.rt.command_consumer.process(raw(QUOTA_COMMANDS, env))
        res = await result(self.rt, env.id)
        self.sent.append(env)
        ok = res.type == COMPLETED
        name = type(payload).__name__
        self.outcomes[f"{name}:{'ok' if ok else res.data['code']}"] += 1
        return ok

    def new_id(self) -> uuid.UUID:
        """An id from the seeded generator, so a seed gives the same sequence every run."""
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def pick_org(self) -> tuple[uuid.UUID, Category]:
        return self.rng.choice(self.orgs)

    async def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.08:
            await self.approve()
        elif roll < 0.14:
            await self.transfer()
        elif roll < 0.30:
            await self.issue()
        elif roll < 0.35:
            await self.cancel()
        elif roll < 0.60:
            await self.occupy()
        elif roll < 0.70:
            await self.release()
        elif roll < 0.80:
            await self.move()
        elif roll < 0.85:
            await self.leader_posts()
        elif roll < 0.93:
            await self.next_day()
        elif roll < 0.97:
            await self.compensate()
        else:
            await self.resend()

    async def approve(self) -> None:
        org_id, category = self.pick_org()
        await self.send(
            ApproveQuota(
                org_id=org_id,
                category=category,
                approved=self.rng.randint(4, 30),
                document=doc(self.day),
                effective_date=self.day,
            )
        )

    async def transfer(self) -> None:
        (a, cat_a), (b, cat_b) = self.rng.sample(self.orgs, 2)
        if cat_a is not cat_b:
            return
        await self.send(
            TransferQuota(
                from_org_id=a,
                to_org_id=b,
                category=cat_a,
                amount=self.rng.randint(1, 4),
                document=doc(self.day),
            )
        )

    async def issue(self) -> None:
        org_id, category = self.pick_org()
        number = f"冀编用〔2026〕{len(self.sent)}/{self.rng.randint(1, 9)}号"
        valid = self.day + timedelta(days=self.rng.randint(0, 6))
        cmd = IssueQuotaUseNotice(
            notice_no=number,
            org_id=org_id,
            category=category,
            count=self.rng.randint(1, 4),
            valid_until=valid,
            document=doc(self.day),
        )
        if await self.send(cmd):
            self.notices[number] = (org_id, category)

    async def cancel(self) -> None:
        if self.notices:
            number = self.rng.choice(sorted(self.notices))
            await self.send(CancelQuotaUseNotice(notice_no=number))
            self.notices.pop(number)

    def post(self) -> LeaderPost | None:
        return self.rng.choice([None, None, None, LeaderPost.PRINCIPAL, LeaderPost.DEPUTY])

    async def occupy(self) -> None:
        if not self.notices:
            return
        number = self.rng.choice(sorted(self.notices))
        org_id, category = self.notices[number]
        person = self.new_id()
        post = self.post()
        unit = self.units.get(org_id) if post and self.rng.random() < 0.5 else None
        cmd = OccupySlot(
            request_id=uuid.uuid4(),
            person_id=person,
            org_id=org_id,
            category=category,
            notice_no=number,
            leader_post=post,
            unit_id=unit,
        )
        if await self.send(cmd):
            self.holders[person] = (org_id, category)
            self.outcomes["leader_post_taken"] += post is not None

    async def release(self) -> None:
        if not self.holders:
            return
        person = self.rng.choice(sorted(self.holders))
        org_id, category = self.holders[person]
        cmd = ReleaseSlot(
            request_id=uuid.uuid4(), person_id=person, org_id=org_id, category=category
        )
        if await self.send(cmd):
            self.holders.pop(person)

    async def compensate(self) -> None:
        """A saga undoes its occupation: the place goes back to the notice while it is open;
        an occupation not yet taken is cancelled and refused when it arrives late."""
        if not self.notices:
            return
        number = self.rng.choice(sorted(self.notices))
        org_id, category = self.notices[number]
        person, request = self.new_id(), uuid.uuid4()
        occupy = OccupySlot(
            request_id=request,
            person_id=person,
            org_id=org_id,
            category=category,
            notice_no=number,
            leader_post=self.post(),
        )
        taken = self.rng.random() < 0.7
        if taken and not await self.send(occupy):
            return
        undo = ReleaseSlot(
            request_id=uuid.uuid4(),
            person_id=person,
            org_id=org_id,
            category=category,
            occupy_request_id=request,
        )
        assert await self.send(undo)
        if not taken:
            assert not await self.send(occupy)
        self.outcomes["compensated" if taken else "cancelled_before"] += 1

    async def move(self) -> None:
        if not self.holders or not self.notices:
            return
        person = self.rng.choice(sorted(self.holders))
        source, _ = self.holders[person]
        targets = [n for n, (o, _) in self.notices.items() if o != source]
        if not targets:
            return
        number = self.rng.choice(sorted(targets))
        target, category = self.notices[number]
        post = self.post()
        cmd = MoveSlot(
            request_id=uuid.uuid4(),
            person_id=person,
            from_org_id=source,
            to_org_id=target,
            category=category,
            notice_no=number,
            leader_post=post,
            unit_id=self.units.get(target) if post else None,
        )
        if await self.send(cmd):
            self.holders[person] = (target, category)
            self.outcomes["leader_post_taken"] += post is not None

    async def leader_posts(self) -> None:
        org_id, _ = self.pick_org()
        unit = self.units.get(org_id) if self.rng.random() < 0.5 else None
        await self.send(
            SetLeaderPosts(
                org_id=org_id,
                unit_id=unit,
                principal=self.rng.randint(0, 2),
                deputy=self.rng.randint(0, 4),
                document=doc(self.day),
            )
        )

    async def next_day(self) -> None:
        """The calendar moves on; the sweep expires what lapsed (as the service does)."""
        self.day += timedelta(days=self.rng.randint(1, 3))
        expired = await sweep_once(self.rt)
        self.outcomes["expired"] += len(expired)
        for number in expired:
            self.notices.pop(number, None)

    async def resend(self) -> None:
        """A command delivered twice has no second effect (and, replayed, no second event)."""
        if self.sent:
            again = self.rng.choice(self.sent)
            before = len(await outbox_events_of(self.rt))
            await self.rt.command_consumer.process(raw(QUOTA_COMMANDS, again))
            assert len(await outbox_events_of(self.rt)) == before
            self.outcomes["resent"] += 1


async def outbox_events_of(rt: ServiceRuntime) -> list[Envelope]:
    async with rt.sessions() as session:
        return await outbox_events(session)


async def drive(rt: ServiceRuntime, projection: Any, monkeypatch: Any, seed: int) -> Office:
    office = Office(rt, random.Random(seed))
    monkeypatch.setattr(handlers, "today", lambda: office.day)
    places = [
        (OrgKind.ORGAN, "130102", Category.ADMIN),
        (OrgKind.ORGAN, "130102", Category.ADMIN),
        (OrgKind.ORGAN, "130104", Category.ADMIN),
        (OrgKind.ORGAN, "130203", Category.ADMIN),
        (OrgKind.PUBLIC_INSTITUTION, "130104", Category.INSTITUTIONAL),
        (OrgKind.PUBLIC_INSTITUTION, "130203", Category.INSTITUTIONAL),
    ]
    for kind, division, category in places:
        org_id = await org(projection, kind=kind, division_code=division, name="机构")
        office.orgs.append((org_id, category))
        office.units[org_id] = uuid.uuid4()
    for division, limit in (("130100", 90), ("130000", 160)):
        await office.send(
            SetRegionLimit(
                division_code=division, category=Category.ADMIN, limit=limit, document=doc(START)
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
        await office.send(SetLeaderPosts(org_id=org_id, principal=1, deputy=3, document=doc(START)))
        await office.send(
            SetLeaderPosts(
                org_id=org_id,
                unit_id=office.units[org_id],
                principal=1,
                deputy=2,
                document=doc(START),
            )
        )
    for i in range(260):
        await office.step()
        if i % 65 == 64:  # the replay agrees at every point, not only at the end
            assert await mismatches(rt) == []
    return office


async def mismatches(rt: ServiceRuntime) -> list[Mismatch]:
    events = await outbox_events_of(rt)
    async with rt.sessions() as session:
        return compare(rebuild(events), await live_counts(session))


@pytest.mark.parametrize("seed", [3, 11])
async def test_replaying_the_events_rebuilds_every_count(
    quota: ServiceRuntime, projection: Any, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    office = await drive(quota, projection, monkeypatch, seed)
    seen = office.outcomes
    # The sequence did exercise what the rebuild has to get right.
    for needed in (
        "OccupySlot:ok",
        "ReleaseSlot:ok",
        "MoveSlot:ok",
        "CancelQuotaUseNotice:ok",
        "TransferQuota:ok",
        "ApproveQuota:ok",
        "expired",
        "resent",
        "compensated",
        "leader_post_taken",
    ):
        assert seen[needed] > 0, (needed, seen)
    assert sum(n for k, n in seen.items() if k.endswith(("no_vacancy", "notice_exhausted"))) > 0

    events = await outbox_events_of(quota)
    rebuilt = rebuild(events)
    async with quota.sessions() as session:
        live = await live_counts(session)
    assert compare(rebuilt, live) == []
    assert rebuilt.applied > 100

    # A count the events do not explain is found, and only that one.
    (org_id, category), tally = next(iter(sorted(live.establishment.items())))
    (post_org, unit), _ = next(iter(sorted(live.posts.items())))
    async with quota.sessions() as session:
        await session.execute(
            update(establishment)
            .where(establishment.c.org_id == org_id, establishment.c.category == category)
            .values(approved=establishment.c.approved + 1)
        )
        await session.execute(
            update(leader_posts)
            .where(leader_posts.c.org_id == post_org, leader_posts.c.unit_id == unit)
            .values(deputy=leader_posts.c.deputy + 2)
        )
        await session.commit()
        tampered = await live_counts(session)
    found = compare(rebuilt, tampered)
    assert found == [
        Mismatch(
            "establishment", (org_id, category), "approved", tally.approved, tally.approved + 1
        ),
        Mismatch(
            "leader_posts",
            (post_org, unit),
            "deputy",
            rebuilt.posts[(post_org, unit)].deputy,
            rebuilt.posts[(post_org, unit)].deputy + 2,
        ),
    ]


async def test_a_replay_missing_an_event_does_not_agree(
    quota: ServiceRuntime, projection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await drive(quota, projection, monkeypatch, 5)
    events = await outbox_events_of(quota)
    slot_events = [i for i, e in enumerate(events) if e.type.endswith(".SlotOccupied.v1")]
    assert slot_events
    lost = events[slot_events[0]]
    rebuilt = rebuild(events[: slot_events[0]] + events[slot_events[0] + 1 :])
    async with quota.sessions() as session:
        live = await live_counts(session)
    found = {(m.what, m.field) for m in compare(rebuilt, live)}
    assert ("establishment", "occupied") in found
    assert ("notice_used", "used") in found
    assert lost.data["org_id"] in {m.key[0] for m in compare(rebuilt, live)}
