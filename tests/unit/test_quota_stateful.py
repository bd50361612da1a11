"""Hypothesis stateful tests of the quota rules (WIRE-CONTRACT §7) against a simple model.

Random sequences of region limits, approvals, transfers, leader posts, quota-use notices (issue,
cancel, expiry as days pass), slot occupation, release, moves and saga compensations, rule-
breaking attempts among them, run against a model of a few dicts. The model predicts each
command's outcome (completed, or the rejection's reason code) and the ledger after it; after
every step the ledger must equal the model's, and §7 must hold on the ledger itself:
occupied + reserved ≤ approved for every org and category; approved summed over a region ≤ its
limit; held leader posts ≤ approved ones; a notice uses at most its count; reserved = what the
open notices still hold; occupied = the slots held; a person holds one slot at most.

Here the system under test is the pure domain (``services.quota.domain.model``) applied the way
the handlers apply it, over dicts: 1,000 sequences. ``tests/component/test_quota_stateful.py``
runs the same machine through the real handlers on SQLite and PostgreSQL.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from contracts import identifiers
from contracts.base import Message
from contracts.codes import Category, LeaderPost, OrgKind, OrgStatus, ReasonCode
from contracts.common import Document
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
from services.quota.domain import model
from services.runtime.rules import Rejection

# --- the world: a province, two cities, three counties, five orgs, five people ---------------

DIVISIONS = ("130000", "130100", "130102", "130104", "130200", "130203")
# name → (kind, county); E is never registered (quota does not know it).
ORGS: dict[str, tuple[OrgKind, str] | None] = {
    "A": (OrgKind.ORGAN, "130102"),
    "B": (OrgKind.ORGAN, "130104"),
    "C": (OrgKind.ORGAN, "130203"),
    "D": (OrgKind.PUBLIC_INSTITUTION, "130102"),
    "E": None,
}
CATEGORIES = (Category.ADMIN, Category.SUPPORT, Category.INSTITUTIONAL)
# WIRE-CONTRACT §4, written out again here rather than imported.
ALLOWED = {
    OrgKind.ORGAN: {Category.ADMIN, Category.POLITICAL_LEGAL, Category.SUPPORT},
    OrgKind.PUBLIC_INSTITUTION: {
        Category.INSTITUTIONAL,
        Category.INSTITUTIONAL_CSR,
        Category.SUPPORT,
    },
}
PEOPLE = ("p0", "p1", "p2", "p3", "p4")
# The org and category pairs the rules allow; rule-breaking pairs are drawn a quarter of the time.
VALID_PAIRS = [
    (org, category)
    for org, place in ORGS.items()
    if place is not None
    for category in CATEGORIES
    if category in ALLOWED[place[0]]
]
VALID_PAIRS_OF_ORGS = [
    (a, b) for a in ORGS for b in ORGS if a != b and ORGS[a] is not None and ORGS[b] is not None
]
PAIRS = st.one_of(
    st.sampled_from(VALID_PAIRS),
    st.sampled_from(VALID_PAIRS),
    st.sampled_from(VALID_PAIRS),
    st.tuples(st.sampled_from(sorted(ORGS)), st.sampled_from(CATEGORIES)),
)
# Mostly no leader post; a principal or deputy post a third of the time.
POSTS = st.one_of(st.none(), st.none(), st.sampled_from(LeaderPost))
START = date(2026, 6, 1)
UNKNOWN_NOTICE = "冀编用〔2026〕未发"
DOC = Document(title="关于核定编制的批复", number="冀编〔2026〕7号", date=date(2026, 2, 1))
COMPLETED = "completed"

_NS = uuid.UUID("0b1c6a52-8d0e-4f4e-9a57-3c1f2d9e7a10")
ORG_IDS = {name: uuid.uuid5(_NS, f"org/{name}") for name in ORGS}
PERSON_IDS = {name: uuid.uuid5(_NS, f"person/{name}") for name in PEOPLE}
ORG_NAMES = {str(v): k for k, v in ORG_IDS.items()}
PERSON_NAMES = {str(v): k for k, v in PERSON_IDS.items()}


def chain(code: str) -> list[str]:
    """The division and the ones enclosing it, nearest first (six-digit codes, GB/T 2260)."""
    if code.endswith("0000"):
        return [code]
    if code.endswith("00"):
        return [code, code[:2] + "0000"]
    return [code, code[:4] + "00", code[:2] + "0000"]


def inside(code: str, region: str) -> bool:
    return region in chain(code)


# --- what the ledger looks like, to compare and to check §7 on -------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The ledger by name: rows that are all zero are left out."""

    establishment: dict[tuple[str, str], tuple[int, int, int]]  # approved, occupied, reserved
    limits: dict[tuple[str, str], int]
    posts: dict[str, tuple[int, int, int, int]]  # principal, deputy, and held
    notices: dict[str, tuple[str, str, int, int, str]]  # org, category, count, used, status
    slots: dict[str, tuple[str, str, str, str | None]]  # person → org, category, notice, post


def check_section_7(snap: Snapshot) -> None:
    """The rules of WIRE-CONTRACT §7 on a ledger, whatever the model says."""
    for key, (approved, occupied, reserved) in snap.establishment.items():
        assert min(approved, occupied, reserved) >= 0, (key, approved, occupied, reserved)
        assert occupied + reserved <= approved, ("§7.1", key, approved, occupied, reserved)
    for (region, category), limit in snap.limits.items():
        used = sum(
            approved
            for (org, cat), (approved, _, _) in snap.establishment.items()
            if cat == category and (place := ORGS[org]) and inside(place[1], region)
        )
        assert used <= limit, ("§7.2", region, category, used, limit)
    open_places: dict[tuple[str, str], int] = {}
    for number, (org, category, count, used, status) in snap.notices.items():
        assert 0 <= used <= count, ("notice", number, count, used)
        if status == "issued":
            key = (org, category)
            open_places[key] = open_places.get(key, 0) + count - used
    held: dict[tuple[str, str], int] = {}
    held_posts: dict[str, list[int]] = {}
    for person, (org, category, number, post) in snap.slots.items():
        held[(org, category)] = held.get((org, category), 0) + 1
        assert snap.notices[number][:2] == (org, category), ("§7.3", person, number)
        if post is not None:
            counts = held_posts.setdefault(org, [0, 0])
            counts[0 if post == LeaderPost.PRINCIPAL.value else 1] += 1
    for key in set(snap.establishment) | set(open_places) | set(held):
        _, occupied, reserved = snap.establishment.get(key, (0, 0, 0))
        assert reserved == open_places.get(key, 0), ("reserved = open notices", key)
        assert occupied == held.get(key, 0), ("occupied = slots", key)
    for org, (principal, deputy, principal_held, deputy_held) in snap.posts.items():
        assert principal_held <= principal and deputy_held <= deputy, ("§7.4", org)
    for org, (principal_held, deputy_held) in held_posts.items():
        posts = snap.posts.get(org, (0, 0, 0, 0))
        assert (posts[2], posts[3]) == (principal_held, deputy_held), ("posts = slots", org)


# --- the model: a few dicts and the rules written out plainly --------------------------------


class Refused(Exception):
    def __init__(self, code: ReasonCode) -> None:
        super().__init__(code.value)
        self.code = code


@dataclass
class NoticeRow:
    org: str
    category: Category
    count: int
    used: int
    valid_until: date
    status: str = "issued"


@dataclass
class SlotRow:
    org: str
    category: Category
    notice: str
    post: LeaderPost | None
    request: uuid.UUID


@dataclass
class Model:
    today: date = START
    est: dict[tuple[str, Category], list[int]] = field(default_factory=dict)
    limits: dict[tuple[str, Category], int] = field(default_factory=dict)
    posts: dict[str, list[int]] = field(default_factory=dict)
    notices: dict[str, NoticeRow] = field(default_factory=dict)
    slots: dict[str, SlotRow] = field(default_factory=dict)
    claimed: set[uuid.UUID] = field(default_factory=set)

    def run(self, step: Callable[..., None], *args: Any) -> str:
        try:
            step(*args)
        except Refused as refused:
            return refused.code.value
        return COMPLETED

    # what the rules look at

    def known(self, org: str) -> str:
        place = ORGS[org]
        if place is None:
            raise Refused(ReasonCode.NOT_FOUND)
        return place[1]

    def holder(self, org: str, category: Category) -> str:
        county = self.known(org)
        place = ORGS[org]
        assert place is not None
        if category not in ALLOWED[place[0]]:
            raise Refused(ReasonCode.CATEGORY_NOT_ALLOWED)
        return county

    def row(self, org: str, category: Category) -> list[int]:
        return self.est.setdefault((org, category), [0, 0, 0])

    def lapsed(self, org: str | None = None, category: Category | None = None) -> list[str]:
        return [
            number
            for number, n in sorted(self.notices.items())
            if n.status == "issued"
            and n.valid_until < self.today
            and org in (None, n.org)
            and category in (None, n.category)
        ]

    def unused(self, numbers: list[str]) -> int:
        return sum(self.notices[n].count - self.notices[n].used for n in numbers)

    def expire(self, numbers: list[str]) -> None:
        for number in numbers:
            n = self.notices[number]
            self.row(n.org, n.category)[2] -= n.count - n.used
            n.status = "expired"

    def used(self, region: str, category: Category) -> int:
        return sum(
            row[0]
            for (org, cat), row in self.est.items()
            if cat == category and (place := ORGS[org]) and inside(place[1], region)
        )

    def within_limits(self, regions: list[str], more: int, category: Category) -> None:
        for region in regions:
            limit = self.limits.get((region, category))
            if limit is not None and more > 0 and self.used(region, category) + more > limit:
                raise Refused(ReasonCode.REGION_LIMIT_EXCEEDED)

    def usable(self, number: str, org: str, category: Category) -> NoticeRow:
        n = self.notices.get(number)
        if n is None or n.org != org or n.category != category or n.status == "cancelled":
            raise Refused(ReasonCode.NOTICE_INVALID)
        if n.status == "expired" or n.valid_until < self.today:
            raise Refused(ReasonCode.NOTICE_EXPIRED)
        if n.used >= n.count:
            raise Refused(ReasonCode.NOTICE_EXHAUSTED)
        return n

    def take_post(self, org: str, post: LeaderPost | None) -> None:
        if post is None:
            return
        posts = self.posts.get(org)
        i = 0 if post is LeaderPost.PRINCIPAL else 1
        if posts is None or posts[2 + i] + 1 > posts[i]:
            raise Refused(ReasonCode.LEADER_POSTS_EXCEEDED)

    def hold_post(self, org: str, post: LeaderPost | None, delta: int) -> None:
        if post is not None:
            posts = self.posts[org]
            i = 2 if post is LeaderPost.PRINCIPAL else 3
            posts[i] = max(posts[i] + delta, 0)

    # the commands: every check first, then the changes

    def set_limit(self, region: str, category: Category, limit: int) -> None:
        if limit < self.used(region, category):
            raise Refused(ReasonCode.REGION_LIMIT_EXCEEDED)
        for (code, cat), other in self.limits.items():
            if cat != category or code == region:
                continue
            if inside(region, code) and limit > other:  # an enclosing region's limit
                raise Refused(ReasonCode.REGION_LIMIT_EXCEEDED)
            if inside(code, region) and other > limit:  # a region inside this one
                raise Refused(ReasonCode.REGION_LIMIT_EXCEEDED)
        self.limits[(region, category)] = limit

    def approve(self, org: str, category: Category, approved: int) -> None:
        county = self.holder(org, category)
        lapsed = self.lapsed(org, category)
        current, occupied, reserved = self.row(org, category)
        if approved < occupied + reserved - self.unused(lapsed):
            raise Refused(ReasonCode.BELOW_OCCUPIED)
        self.within_limits(chain(county), approved - current, category)
        self.expire(lapsed)
        self.row(org, category)[0] = approved

    def transfer(self, source: str, target: str, category: Category, amount: int) -> None:
        from_county = self.holder(source, category)
        to_county = self.holder(target, category)
        lapsed = self.lapsed(source, category)
        approved, occupied, reserved = self.row(source, category)
        if approved - amount < occupied + reserved - self.unused(lapsed):
            raise Refused(ReasonCode.BELOW_OCCUPIED)
        gaining = [c for c in chain(to_county) if c not in chain(from_county)]
        self.within_limits(gaining, amount, category)
        self.expire(lapsed)
        self.row(source, category)[0] -= amount
        self.row(target, category)[0] += amount

    def leader_posts(self, org: str, principal: int, deputy: int) -> None:
        self.known(org)
        posts = self.posts.get(org, [0, 0, 0, 0])
        if principal < posts[2] or deputy < posts[3]:
            raise Refused(ReasonCode.CONFLICT)
        self.posts[org] = [principal, deputy, posts[2], posts[3]]

    def issue(self, number: str, org: str, category: Category, count: int, until: date) -> None:
        self.holder(org, category)
        if until < self.today:
            raise Refused(ReasonCode.INVALID_MESSAGE)
        lapsed = self.lapsed(org, category)
        if number in self.notices:
            raise Refused(ReasonCode.CONFLICT)
        approved, occupied, reserved = self.row(org, category)
        if approved - occupied - (reserved - self.unused(lapsed)) < count:
            raise Refused(ReasonCode.NO_VACANCY)
        self.expire(lapsed)
        self.row(org, category)[2] += count
        self.notices[number] = NoticeRow(org, category, count, 0, until)

    def cancel(self, number: str) -> None:
        n = self.notices.get(number)
        if n is None or n.status != "issued" or n.valid_until < self.today:
            raise Refused(ReasonCode.NOTICE_INVALID)
        self.row(n.org, n.category)[2] -= n.count - n.used
        n.status = "cancelled"

    def occupy(
        self,
        request: uuid.UUID,
        person: str,
        org: str,
        category: Category,
        number: str,
        post: LeaderPost | None,
    ) -> None:
        if request in self.claimed:
            raise Refused(ReasonCode.CONFLICT)
        self.holder(org, category)
        n = self.usable(number, org, category)
        if person in self.slots:
            raise Refused(ReasonCode.ALREADY_ENROLLED)
        approved, occupied, reserved = self.row(org, category)
        if reserved < 1 or occupied + reserved > approved:
            raise Refused(ReasonCode.NO_VACANCY)
        self.take_post(org, post)
        self.claimed.add(request)
        n.used += 1
        row = self.row(org, category)
        row[1] += 1
        row[2] -= 1
        self.slots[person] = SlotRow(org, category, number, post, request)
        self.hold_post(org, post, 1)

    def release(self, request: uuid.UUID, person: str, org: str, category: Category) -> None:
        if request in self.claimed:
            raise Refused(ReasonCode.CONFLICT)
        self.known(org)
        slot = self.slots.get(person)
        if slot is None or slot.org != org or slot.category != category:
            raise Refused(ReasonCode.NOT_ENROLLED)
        self.claimed.add(request)
        del self.slots[person]
        self.row(org, category)[1] -= 1
        self.hold_post(org, slot.post, -1)

    def compensate(
        self, request: uuid.UUID, occupy_request: uuid.UUID, person: str, org: str
    ) -> None:
        """A saga undoes its OccupySlot: cancelled if it has not taken effect, else its slot
        goes back to its notice (while the notice is open)."""
        if request in self.claimed:
            raise Refused(ReasonCode.CONFLICT)
        self.known(org)
        self.claimed.add(request)
        if occupy_request not in self.claimed:
            self.claimed.add(occupy_request)  # it never will take effect now
            return
        slot = self.slots.get(person)
        if slot is None or slot.request != occupy_request:
            return
        del self.slots[person]
        row = self.row(slot.org, slot.category)
        row[1] -= 1
        n = self.notices[slot.notice]
        if n.status == "issued" and n.used >= 1:
            n.used -= 1
            row[2] += 1
        self.hold_post(slot.org, slot.post, -1)

    def move(
        self,
        request: uuid.UUID,
        person: str,
        source: str,
        target: str,
        category: Category,
        number: str,
        post: LeaderPost | None,
    ) -> None:
        if request in self.claimed:
            raise Refused(ReasonCode.CONFLICT)
        self.known(source)
        self.holder(target, category)
        slot = self.slots.get(person)
        if slot is None or slot.org != source:
            raise Refused(ReasonCode.NOT_ENROLLED)
        n = self.usable(number, target, category)
        approved, occupied, reserved = self.row(target, category)
        if reserved < 1 or occupied + reserved > approved:
            raise Refused(ReasonCode.NO_VACANCY)
        self.take_post(target, post)
        self.claimed.add(request)
        self.row(source, slot.category)[1] -= 1
        self.hold_post(source, slot.post, -1)
        n.used += 1
        row = self.row(target, category)
        row[1] += 1
        row[2] -= 1
        self.slots[person] = SlotRow(target, category, number, post, request)
        self.hold_post(target, post, 1)

    def sweep(self) -> None:
        self.expire(self.lapsed())

    def snapshot(self) -> Snapshot:
        return Snapshot(
            establishment={
                (org, cat.value): (a, o, r)
                for (org, cat), (a, o, r) in self.est.items()
                if a or o or r
            },
            limits={(code, cat.value): limit for (code, cat), limit in self.limits.items()},
            posts={
                org: (p, d, ph, dh)
                for org, (p, d, ph, dh) in self.posts.items()
                if p or d or ph or dh
            },
            notices={
                no: (n.org, n.category.value, n.count, n.used, n.status)
                for no, n in self.notices.items()
            },
            slots={
                person: (s.org, s.category.value, s.notice, s.post.value if s.post else None)
                for person, s in self.slots.items()
            },
        )


# --- the commands as the quota service receives them ------------------------------------------


def org_id(name: str) -> uuid.UUID:
    return ORG_IDS[name]


def person_id(name: str) -> uuid.UUID:
    return PERSON_IDS[name]


class Ledger:
    """What a quota machine runs its commands against."""

    def execute(self, command: Message) -> str:
        """Apply ``command``: ``"completed"`` or the rejection's reason code."""
        raise NotImplementedError

    def observe(self) -> Snapshot:
        raise NotImplementedError

    def set_today(self, day: date) -> None:
        raise NotImplementedError

    def sweep(self) -> None:
        """The periodic expiry of lapsed notices."""
        raise NotImplementedError

    def replay_mismatches(self) -> list[Any]:
        """Counts that replaying the events emitted so far does not rebuild (§7.5); none where
        the ledger emits no events."""
        return []


class QuotaMachine(RuleBasedStateMachine):
    """Rules that send quota commands, good and rule-breaking, and compare with the model."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.ledger = self.make_ledger()
        self.ledger.set_today(START)
        self.numbers = 0
        self.occupations: list[tuple[OccupySlot, str]] = []  # sent, with the person's name

    def make_ledger(self) -> Ledger:
        raise NotImplementedError

    def expect(self, command: Message, expected: str) -> None:
        got = self.ledger.execute(command)
        event(f"{type(command).__name__}: {expected}")
        assert got == expected, f"{type(command).__name__} {command!r}: model {expected}, got {got}"

    # region limits, approvals, transfers, leader posts

    @rule(
        region=st.sampled_from(DIVISIONS),
        category=st.sampled_from(CATEGORIES),
        slack=st.one_of(st.integers(-2, 3), st.integers(-2, 3), st.just(None)),
        limit=st.integers(0, 14),
    )
    def set_region_limit(
        self, region: str, category: Category, slack: int | None, limit: int
    ) -> None:
        """A limit near what the region holds now (tight: the next approval or transfer into
        the region may break it), or any limit."""
        if slack is not None:
            limit = max(self.model.used(region, category) + slack, 0)
        self.send_limit(region, category, limit)

    def send_limit(self, region: str, category: Category, limit: int) -> None:
        expected = self.model.run(self.model.set_limit, region, category, limit)
        self.expect(
            SetRegionLimit(division_code=region, category=category, limit=limit, document=DOC),
            expected,
        )

    @initialize(
        sizes=st.lists(st.integers(0, 6), min_size=len(VALID_PAIRS), max_size=len(VALID_PAIRS)),
        notices=st.lists(st.integers(0, 3), min_size=len(VALID_PAIRS), max_size=len(VALID_PAIRS)),
        posts=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=4, max_size=4),
        limit=st.one_of(
            st.none(),
            st.tuples(st.sampled_from(DIVISIONS), st.sampled_from(CATEGORIES), st.integers(0, 2)),
        ),
    )
    def establish(
        self,
        sizes: list[int],
        notices: list[int],
        posts: list[tuple[int, int]],
        limit: tuple[str, Category, int] | None,
    ) -> None:
        """Approved quota, notices, leader posts and a region limit (tight: at most two places
        above what the region holds) to start from, some of them none."""
        for (org, category), n in zip(VALID_PAIRS, sizes, strict=True):
            self.send_approval(org, category, n)
        for (org, category), n, count in zip(VALID_PAIRS, sizes, notices, strict=True):
            if min(n, count):
                self.send_notice(org, category, min(n, count), 3, None)
        registered = [org for org, place in ORGS.items() if place is not None]
        for org, (principal, deputy) in zip(registered, posts, strict=True):
            if principal or deputy:
                self.set_leader_posts(org, principal, deputy)
        if limit is not None:
            region, category, slack = limit
            self.send_limit(region, category, self.model.used(region, category) + slack)

    @rule(pair=PAIRS, n=st.integers(0, 10))
    def approve(self, pair: tuple[str, Category], n: int) -> None:
        self.send_approval(*pair, n)

    def send_approval(self, org: str, category: Category, n: int) -> None:
        expected = self.model.run(self.model.approve, org, category, n)
        command = ApproveQuota(
            org_id=org_id(org), category=category, approved=n, document=DOC, effective_date=START
        )
        self.expect(command, expected)

    @rule(pair=PAIRS, amount=st.integers(1, 4), data=st.data())
    def transfer(self, pair: tuple[str, Category], amount: int, data: Any) -> None:
        source, category = pair
        target = data.draw(self.target_strategy(source, category), label="to")
        if source != target:
            self.send_transfer(source, target, category, amount)

    @precondition(lambda self: bool(self.model.limits))
    @rule(amount=st.integers(1, 3), over=st.booleans(), data=st.data())
    def transfer_inside_a_limited_region(self, amount: int, over: bool, data: Any) -> None:
        """Between two orgs of a region with a limit (with ``over``: more places than the limit
        leaves room for): the region's total does not change, so its limit does not stand in
        the way, however tight."""
        choices = sorted(
            (region, source, target, category)
            for region, category in self.model.limits
            for source, target in VALID_PAIRS_OF_ORGS
            if all(
                (place := ORGS[org]) and category in ALLOWED[place[0]] and inside(place[1], region)
                for org in (source, target)
            )
        )
        if not choices:
            return
        region, source, target, category = data.draw(st.sampled_from(choices), label="orgs")
        if over:
            room = self.model.limits[(region, category)] - self.model.used(region, category)
            amount = max(room + 1, 1)
        self.send_transfer(source, target, category, amount)

    def send_transfer(self, source: str, target: str, category: Category, amount: int) -> None:
        expected = self.model.run(self.model.transfer, source, target, category, amount)
        command = TransferQuota(
            from_org_id=org_id(source),
            to_org_id=org_id(target),
            category=category,
            amount=amount,
            document=DOC,
        )
        self.expect(command, expected)

    @rule(
        principal=st.integers(0, 2),
        deputy=st.integers(0, 2),
        near_held=st.booleans(),
        data=st.data(),
    )
    def change_leader_posts(self, principal: int, deputy: int, near_held: bool, data: Any) -> None:
        """Any counts, or counts around the posts held now (one below them is a conflict), of
        an org whose posts are held, mostly."""
        holding = sorted({s.org for s in self.model.slots.values() if s.post is not None})
        anyone = st.sampled_from(sorted(ORGS))
        org = data.draw(st.one_of(st.sampled_from(holding), anyone) if holding else anyone)
        if near_held:
            held = self.model.posts.get(org, [0, 0, 0, 0])
            principal, deputy = max(held[2] + principal - 1, 0), max(held[3] + deputy - 1, 0)
        self.set_leader_posts(org, principal, deputy)

    def set_leader_posts(self, org: str, principal: int, deputy: int) -> None:
        expected = self.model.run(self.model.leader_posts, org, principal, deputy)
        command = SetLeaderPosts(
            org_id=org_id(org), principal=principal, deputy=deputy, document=DOC
        )
        self.expect(command, expected)

    # quota-use notices

    @rule(
        pair=PAIRS,
        count=st.integers(1, 3),
        days=st.integers(-1, 5),
        again=st.integers(0, 9),
        data=st.data(),
    )
    def issue_notice(
        self, pair: tuple[str, Category], count: int, days: int, again: int, data: Any
    ) -> None:
        number = None
        if again == 0 and self.model.notices:  # a number already issued: a conflict
            number = data.draw(st.sampled_from(sorted(self.model.notices)), label="number")
        self.send_notice(*pair, count, days, number)

    def send_notice(
        self, org: str, category: Category, count: int, days: int, number: str | None
    ) -> None:
        if number is None:
            self.numbers += 1
            number = f"冀编用〔2026〕{self.numbers}号"
        until = self.model.today + timedelta(days=days)
        expected = self.model.run(self.model.issue, number, org, category, count, until)
        command = IssueQuotaUseNotice(
            notice_no=number,
            org_id=org_id(org),
            category=category,
            count=count,
            valid_until=until,
            document=DOC,
        )
        self.expect(command, expected)

    @rule(data=st.data())
    def cancel_notice(self, data: Any) -> None:
        number = data.draw(st.sampled_from([UNKNOWN_NOTICE, *sorted(self.model.notices)]))
        expected = self.model.run(self.model.cancel, number)
        self.expect(CancelQuotaUseNotice(notice_no=number), expected)

    @rule(days=st.integers(1, 3))
    def time_passes(self, days: int) -> None:
        self.model.today += timedelta(days=days)
        self.ledger.set_today(self.model.today)

    @rule()
    def expiry_sweep(self) -> None:
        self.model.sweep()
        self.ledger.sweep()

    # slots: the steps of the roster sagas

    def target_strategy(self, source: str, category: Category) -> st.SearchStrategy[str]:
        """Where a transfer goes: an org of a region with a limit of the category (inside or
        outside the source's), an org of the same city, or any org."""
        limited = sorted(
            org
            for org, place in ORGS.items()
            if place is not None and org != source
            for region, cat in self.model.limits
            if cat == category and inside(place[1], region)
        )
        near = st.sampled_from(["A", "B", "D"])
        anyone = st.sampled_from(sorted(ORGS))
        return (
            st.one_of(st.sampled_from(limited), near, anyone)
            if limited
            else st.one_of(near, anyone)
        )

    def person_strategy(self) -> st.SearchStrategy[str]:
        """Someone holding a slot, mostly; anyone now and then."""
        anyone = st.sampled_from(PEOPLE)
        if not self.model.slots:
            return anyone
        holders = st.sampled_from(sorted(self.model.slots))
        return st.one_of(holders, holders, holders, anyone)

    def notice_strategy(self) -> st.SearchStrategy[str]:
        """A notice issued (or refused) before, mostly; now and then one never issued."""
        if not self.model.notices:
            return st.just(UNKNOWN_NOTICE)
        issued = st.sampled_from(sorted(self.model.notices))
        return st.one_of(issued, issued, issued, st.just(UNKNOWN_NOTICE))

    @rule(
        person=st.sampled_from(PEOPLE),
        post=POSTS,
        elsewhere=st.one_of(st.none(), st.none(), st.none(), st.sampled_from(sorted(ORGS))),
        category=st.sampled_from(CATEGORIES),
        data=st.data(),
    )
    def occupy(
        self,
        person: str,
        post: LeaderPost | None,
        elsewhere: str | None,
        category: Category,
        data: Any,
    ) -> None:
        number = data.draw(self.notice_strategy(), label="notice")
        notice = self.model.notices.get(number)
        if notice is not None and elsewhere is None:  # the notice's own org and category
            org, category = notice.org, notice.category
        else:
            org = elsewhere or "A"
        self._occupy(person, org, category, number, post)

    def _occupy(
        self, person: str, org: str, category: Category, number: str, post: LeaderPost | None
    ) -> None:
        """Send one OccupySlot and expect what the model says of it."""
        command = OccupySlot(
            request_id=uuid.uuid4(),
            person_id=person_id(person),
            org_id=org_id(org),
            category=category,
            notice_no=number,
            leader_post=post,
        )
        expected = self.model.run(
            self.model.occupy, command.request_id, person, org, category, number, post
        )
        self.expect(command, expected)
        self.occupations.append((command, person))

    @rule(person=st.sampled_from(PEOPLE), post=st.sampled_from(LeaderPost), data=st.data())
    def occupy_leader_post(self, person: str, post: LeaderPost, data: Any) -> None:
        """An enrolment into a leader post: with a notice that has places left, of an org with
        that post free, when there is one."""
        i = 0 if post is LeaderPost.PRINCIPAL else 1
        usable = sorted(
            number
            for number, n in self.model.notices.items()
            if n.status == "issued"
            and n.valid_until >= self.model.today
            and n.used < n.count
            and (posts := self.model.posts.get(n.org)) is not None
            and posts[2 + i] < posts[i]
        )
        number = data.draw(st.sampled_from(usable) if usable else self.notice_strategy())
        notice = self.model.notices.get(number)
        org, category = (notice.org, notice.category) if notice else ("A", Category.ADMIN)
        self._occupy(person, org, category, number, post)

    @precondition(lambda self: bool(self.occupations))
    @rule(data=st.data())
    def occupy_again(self, data: Any) -> None:
        """An OccupySlot sent again under a new message id: no second effect."""
        command, person = data.draw(st.sampled_from(self.occupations), label="occupation")
        org = ORG_NAMES[str(command.org_id)]
        expected = self.model.run(
            self.model.occupy,
            command.request_id,
            person,
            org,
            command.category,
            command.notice_no,
            command.leader_post,
        )
        self.expect(command, expected)

    @rule(
        org=st.one_of(st.none(), st.none(), st.sampled_from(sorted(ORGS))),
        category=st.one_of(st.none(), st.none(), st.sampled_from(CATEGORIES)),
        data=st.data(),
    )
    def release(self, org: str | None, category: Category | None, data: Any) -> None:
        person = data.draw(self.person_strategy(), label="person")
        held = self.model.slots.get(person)
        org = org or (held.org if held else "A")
        category = category or (held.category if held else Category.ADMIN)
        command = ReleaseSlot(
            request_id=uuid.uuid4(),
            person_id=person_id(person),
            org_id=org_id(org),
            category=category,
        )
        expected = self.model.run(self.model.release, command.request_id, person, org, category)
        self.expect(command, expected)

    @precondition(lambda self: bool(self.occupations))
    @rule(data=st.data(), pending=st.booleans())
    def compensate(self, data: Any, pending: bool) -> None:
        """A saga's compensation of an OccupySlot (one that took effect, was refused, or — with
        ``pending`` — one never sent, which is cancelled and may not take effect later)."""
        command, person = data.draw(st.sampled_from(self.occupations), label="occupation")
        if pending:
            command = command.model_copy(update={"request_id": uuid.uuid4()})
            self.occupations.append((command, person))
        org = ORG_NAMES[str(command.org_id)]
        undo = ReleaseSlot(
            request_id=uuid.uuid4(),
            person_id=command.person_id,
            org_id=command.org_id,
            category=command.category,
            occupy_request_id=command.request_id,
        )
        expected = self.model.run(
            self.model.compensate, undo.request_id, command.request_id, person, org
        )
        self.expect(undo, expected)

    @rule(
        source=st.one_of(st.none(), st.none(), st.none(), st.sampled_from(sorted(ORGS))),
        post=POSTS,
        data=st.data(),
    )
    def move(self, source: str | None, post: LeaderPost | None, data: Any) -> None:
        person = data.draw(self.person_strategy(), label="person")
        number = data.draw(self.notice_strategy(), label="notice")
        notice = self.model.notices.get(number)
        target, category = (notice.org, notice.category) if notice else ("B", Category.ADMIN)
        held = self.model.slots.get(person)
        source = source or (held.org if held else "A")
        if source == target:
            return
        command = MoveSlot(
            request_id=uuid.uuid4(),
            person_id=person_id(person),
            from_org_id=org_id(source),
            to_org_id=org_id(target),
            category=category,
            notice_no=number,
            leader_post=post,
        )
        expected = self.model.run(
            self.model.move, command.request_id, person, source, target, category, number, post
        )
        self.expect(command, expected)

    @invariant()
    def ledger_is_the_model_and_keeps_section_7(self) -> None:
        seen = self.ledger.observe()
        check_section_7(seen)
        expected = self.model.snapshot()
        for part in ("establishment", "limits", "posts", "notices", "slots"):
            assert getattr(seen, part) == getattr(expected, part), part
        assert self.ledger.replay_mismatches() == [], "§7.5: the events rebuild every count"


# --- the pure domain, applied as the handlers apply it ----------------------------------------


@dataclass(frozen=True)
class Slot:
    org_id: uuid.UUID
    category: Category
    notice_no: str
    leader_post: LeaderPost | None
    request_id: uuid.UUID


@dataclass
class DomainState:
    est: dict[tuple[uuid.UUID, Category], model.Establishment] = field(default_factory=dict)
    limits: dict[tuple[str, Category], int] = field(default_factory=dict)
    posts: dict[uuid.UUID, model.LeaderPosts] = field(default_factory=dict)
    notices: dict[str, model.Notice] = field(default_factory=dict)
    slots: dict[uuid.UUID, Slot] = field(default_factory=dict)
    claimed: set[uuid.UUID] = field(default_factory=set)


def _rejection(code: ReasonCode) -> Rejection:
    return Rejection(code, code.value)


class DomainLedger(Ledger):
    """The rules of ``services.quota.domain.model`` in the order the handlers apply them, with
    dicts where the service has tables and a copy of them for a transaction."""

    def __init__(self) -> None:
        self.today = START
        self.orgs = {
            ORG_IDS[name]: model.OrgRef(ORG_IDS[name], OrgStatus.ACTIVE, kind, county)
            for name, place in ORGS.items()
            if place is not None
            for kind, county in [place]
        }
        self.state = DomainState()
        self.handlers: dict[type[Message], Callable[[Any], None]] = {
            SetRegionLimit: self.set_limit,
            ApproveQuota: self.approve,
            TransferQuota: self.transfer,
            SetLeaderPosts: self.leader_posts,
            IssueQuotaUseNotice: self.issue,
            CancelQuotaUseNotice: self.cancel,
            OccupySlot: self.occupy,
            ReleaseSlot: self.release,
            MoveSlot: self.move,
        }

    def execute(self, command: Message) -> str:
        before = copy.deepcopy(self.state)
        try:
            self.handlers[type(command)](command)
        except Rejection as rejection:
            self.state = before  # the transaction rolls back
            return rejection.code.value
        return COMPLETED

    def set_today(self, day: date) -> None:
        self.today = day

    def sweep(self) -> None:
        self.expire()

    def observe(self) -> Snapshot:
        s = self.state
        return Snapshot(
            establishment={
                (ORG_NAMES[str(o)], c.value): (e.approved, e.occupied, e.reserved)
                for (o, c), e in s.est.items()
                if e.approved or e.occupied or e.reserved
            },
            limits={(code, c.value): limit for (code, c), limit in s.limits.items()},
            posts={
                ORG_NAMES[str(o)]: (p.principal, p.deputy, p.principal_held, p.deputy_held)
                for o, p in s.posts.items()
                if p.principal or p.deputy or p.principal_held or p.deputy_held
            },
            notices={
                no: (ORG_NAMES[str(n.org_id)], n.category.value, n.count, n.used, n.status.value)
                for no, n in s.notices.items()
            },
            slots={
                PERSON_NAMES[str(p)]: (
                    ORG_NAMES[str(x.org_id)],
                    x.category.value,
                    x.notice_no,
                    x.leader_post.value if x.leader_post else None,
                )
                for p, x in s.slots.items()
            },
        )

    # reading and writing the dicts

    def org(self, org_id: uuid.UUID) -> model.OrgRef:
        found = self.orgs.get(org_id)
        if found is None:
            raise _rejection(ReasonCode.NOT_FOUND)
        return found

    def holder(self, org_id: uuid.UUID, category: Category) -> model.OrgRef:
        org = self.org(org_id)
        model.require_active(org)
        model.require_category(org, category)
        return org

    def est(self, org_id: uuid.UUID, category: Category) -> model.Establishment:
        return self.state.est.get((org_id, category), model.Establishment(org_id, category))

    def put(self, est: model.Establishment, **changes: int) -> None:
        self.state.est[(est.org_id, est.category)] = replace(est, **changes)

    def regions(self, codes: list[str], category: Category) -> list[model.RegionUse]:
        return [
            model.RegionUse(code, self.state.limits[(code, category)], self.used(code, category))
            for code in codes
            if (code, category) in self.state.limits
        ]

    def used(self, code: str, category: Category) -> int:
        prefix = identifiers.division_prefix(code)
        return sum(
            e.approved
            for (o, c), e in self.state.est.items()
            if c is category and (self.orgs[o].division_code or "").startswith(prefix)
        )

    def expire(self, org_id: uuid.UUID | None = None, category: Category | None = None) -> None:
        for number, n in sorted(self.state.notices.items()):
            if not n.lapsed(self.today) or org_id not in (None, n.org_id):
                continue
            if category not in (None, n.category):
                continue
            est = self.est(n.org_id, n.category)
            self.put(est, reserved=est.reserved - n.remaining)
            self.state.notices[number] = replace(n, status=model.NoticeStatus.EXPIRED)

    def take_slot(
        self,
        request_id: uuid.UUID,
        person: uuid.UUID,
        org_id: uuid.UUID,
        category: Category,
        number: str,
        post: LeaderPost | None,
    ) -> None:
        notice = model.check_notice_usable(
            self.state.notices.get(number), number, org_id, category, self.today
        )
        self.state.notices[number] = replace(notice, used=notice.used + 1)
        if person in self.state.slots:
            raise _rejection(ReasonCode.ALREADY_ENROLLED)
        est = self.est(org_id, category)
        if est.reserved < 1 or est.held > est.approved:
            raise model.no_vacancy(est, 1)
        self.put(est, reserved=est.reserved - 1, occupied=est.occupied + 1)
        if post is not None:
            posts = self.state.posts.get(org_id)
            model.check_leader_post_free(posts, post)
            assert posts is not None
            self.hold(org_id, post, 1)
        self.state.slots[person] = Slot(org_id, category, number, post, request_id)

    def hold(self, org_id: uuid.UUID, post: LeaderPost | None, delta: int) -> None:
        posts = self.state.posts.get(org_id)
        if post is None or posts is None:
            return
        if post is LeaderPost.PRINCIPAL:
            posts = replace(posts, principal_held=max(posts.principal_held + delta, 0))
        else:
            posts = replace(posts, deputy_held=max(posts.deputy_held + delta, 0))
        self.state.posts[org_id] = posts

    def claim(self, request_id: uuid.UUID) -> None:
        if request_id in self.state.claimed:
            raise _rejection(ReasonCode.CONFLICT)
        self.state.claimed.add(request_id)

    def vacate(self, person: uuid.UUID, org_id: uuid.UUID, category: Category | None) -> Slot:
        slot = self.state.slots.get(person)
        if slot is None or slot.org_id != org_id or category not in (None, slot.category):
            raise _rejection(ReasonCode.NOT_ENROLLED)
        del self.state.slots[person]
        est = self.est(org_id, slot.category)
        self.put(est, occupied=est.occupied - 1)
        self.hold(org_id, slot.leader_post, -1)
        return slot

    # the handlers

    def set_limit(self, cmd: SetRegionLimit) -> None:
        codes = chain(cmd.division_code)
        limits = {
            c: self.state.limits[(c, cmd.category)]
            for c in codes[1:]
            if (c, cmd.category) in self.state.limits
        }
        prefix = identifiers.division_prefix(cmd.division_code)
        below = {
            code: limit
            for (code, c), limit in self.state.limits.items()
            if c is cmd.category and code != cmd.division_code and code.startswith(prefix)
        }
        model.check_region_limit(
            cmd.division_code,
            cmd.category,
            cmd.limit,
            used=self.used(cmd.division_code, cmd.category),
            ancestor_limits=limits,
            descendant_limits=below,
        )
        self.state.limits[(cmd.division_code, cmd.category)] = cmd.limit

    def approve(self, cmd: ApproveQuota) -> None:
        org = self.holder(cmd.org_id, cmd.category)
        self.expire(cmd.org_id, cmd.category)
        current = self.est(cmd.org_id, cmd.category)
        model.check_not_below_held(current, cmd.approved)
        delta = cmd.approved - current.approved
        regions = self.regions(chain(org.division_code or ""), cmd.category)
        model.check_within_limits(regions, {r.division_code: delta for r in regions}, cmd.category)
        self.put(current, approved=cmd.approved)

    def transfer(self, cmd: TransferQuota) -> None:
        source = self.holder(cmd.from_org_id, cmd.category)
        target = self.holder(cmd.to_org_id, cmd.category)
        self.expire(source.org_id, cmd.category)
        giving = self.est(source.org_id, cmd.category)
        model.check_not_below_held(giving, giving.approved - cmd.amount)
        source_chain = chain(source.division_code or "")
        asked = {c: cmd.amount for c in chain(target.division_code or "") if c not in source_chain}
        model.check_within_limits(self.regions(list(asked), cmd.category), asked, cmd.category)
        self.put(giving, approved=giving.approved - cmd.amount)
        receiving = self.est(target.org_id, cmd.category)
        self.put(receiving, approved=receiving.approved + cmd.amount)

    def leader_posts(self, cmd: SetLeaderPosts) -> None:
        model.require_active(self.org(cmd.org_id))
        current = self.state.posts.get(cmd.org_id) or model.LeaderPosts()
        model.check_leader_posts(current, cmd.principal, cmd.deputy)
        self.state.posts[cmd.org_id] = replace(current, principal=cmd.principal, deputy=cmd.deputy)

    def issue(self, cmd: IssueQuotaUseNotice) -> None:
        self.holder(cmd.org_id, cmd.category)
        if cmd.valid_until < self.today:
            raise _rejection(ReasonCode.INVALID_MESSAGE)
        self.expire(cmd.org_id, cmd.category)
        if cmd.notice_no in self.state.notices:
            raise _rejection(ReasonCode.CONFLICT)
        est = self.est(cmd.org_id, cmd.category)
        model.check_vacancy(est, cmd.count)
        self.put(est, reserved=est.reserved + cmd.count)
        self.state.notices[cmd.notice_no] = model.Notice(
            cmd.notice_no,
            cmd.org_id,
            cmd.category,
            cmd.count,
            0,
            cmd.valid_until,
            model.NoticeStatus.ISSUED,
        )

    def cancel(self, cmd: CancelQuotaUseNotice) -> None:
        notice = model.check_notice_open(
            self.state.notices.get(cmd.notice_no), cmd.notice_no, self.today
        )
        est = self.est(notice.org_id, notice.category)
        self.put(est, reserved=est.reserved - notice.remaining)
        self.state.notices[cmd.notice_no] = replace(notice, status=model.NoticeStatus.CANCELLED)

    def occupy(self, cmd: OccupySlot) -> None:
        self.claim(cmd.request_id)
        self.holder(cmd.org_id, cmd.category)
        self.take_slot(
            cmd.request_id, cmd.person_id, cmd.org_id, cmd.category, cmd.notice_no, cmd.leader_post
        )

    def release(self, cmd: ReleaseSlot) -> None:
        self.claim(cmd.request_id)
        self.org(cmd.org_id)
        if cmd.occupy_request_id is None:
            self.vacate(cmd.person_id, cmd.org_id, cmd.category)
            return
        if cmd.occupy_request_id not in self.state.claimed:
            self.state.claimed.add(cmd.occupy_request_id)  # cancelled before it took effect
            return
        slot = self.state.slots.get(cmd.person_id)
        if slot is None or slot.request_id != cmd.occupy_request_id:
            return
        self.vacate(cmd.person_id, cmd.org_id, None)
        notice = self.state.notices[slot.notice_no]
        if notice.status is model.NoticeStatus.ISSUED and notice.used >= 1:
            self.state.notices[slot.notice_no] = replace(notice, used=notice.used - 1)
            est = self.est(cmd.org_id, slot.category)
            self.put(est, reserved=est.reserved + 1)

    def move(self, cmd: MoveSlot) -> None:
        self.claim(cmd.request_id)
        self.org(cmd.from_org_id)
        self.holder(cmd.to_org_id, cmd.category)
        self.vacate(cmd.person_id, cmd.from_org_id, None)
        self.take_slot(
            cmd.request_id,
            cmd.person_id,
            cmd.to_org_id,
            cmd.category,
            cmd.notice_no,
            cmd.leader_post,
        )


class DomainQuotaMachine(QuotaMachine):
    def make_ledger(self) -> Ledger:
        return DomainLedger()


DomainQuotaMachine.TestCase.settings = settings(
    max_examples=1_000,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestQuotaRulesPureDomain = DomainQuotaMachine.TestCase
