"""The establishment ledger (编制台账) and the rules that govern it. Pure: no I/O, no framework.

Approved quota per org and category (核定编制), region limits (编制总量控制数) and leader posts
(领导职数). What quota knows of an org comes from the orgs service's events (``OrgRef``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from typing import Any
from uuid import UUID

from contracts.codes import (
    Category,
    LeaderPost,
    OrgKind,
    OrgStatus,
    ReasonCode,
    category_allowed,
)
from contracts.common import office_today
from services.runtime.rules import Rejection

THRESHOLDS_PERCENT: tuple[int, ...] = (90, 100)

# The office's calendar day (China Standard Time): notices run to the end of it.
today = office_today


@dataclass(frozen=True)
class OrgRef:
    """An org as quota knows it from the orgs events (机构投影).

    ``kind`` and ``division_code`` are ``None`` while only a merge of the org has been seen
    (its registration may arrive later, from another partition).
    """

    org_id: UUID
    status: OrgStatus
    kind: OrgKind | None = None
    division_code: str | None = None
    name: str | None = None

    @property
    def registered(self) -> bool:
        return self.kind is not None and self.division_code is not None


@dataclass(frozen=True)
class Establishment:
    """The establishment of one org in one category: approved, occupied and reserved places."""

    org_id: UUID
    category: Category
    approved: int = 0
    occupied: int = 0
    reserved: int = 0

    @property
    def held(self) -> int:
        """Places in use or promised to a quota-use notice."""
        return self.occupied + self.reserved

    @property
    def vacant(self) -> int:
        return max(self.approved - self.held, 0)


@dataclass(frozen=True)
class LeaderPosts:
    """Approved and held leader posts of an org, or of one of its internal units."""

    principal: int = 0
    deputy: int = 0
    principal_held: int = 0
    deputy_held: int = 0


@dataclass(frozen=True)
class RegionUse:
    """A region's limit of one category and the approved quota inside it now."""

    division_code: str
    limit: int
    used: int


def require_active(org: OrgRef, *, role: str = "org") -> None:
    if org.status is not OrgStatus.ACTIVE:
        raise Rejection(
            ReasonCode.ORG_NOT_ACTIVE,
            f"{role} {org.org_id} is {org.status.value} / 机构已撤销或合并",
            {"org_id": str(org.org_id), "status": org.status.value},
        )


def require_category(org: OrgRef, category: Category) -> None:
    """An org may hold only the categories of its kind (WIRE-CONTRACT §4)."""
    kind = org.kind.value if org.kind else None
    if kind is None or not category_allowed(kind, category):
        raise Rejection(
            ReasonCode.CATEGORY_NOT_ALLOWED,
            f"an org of kind {kind} may not hold {category.value} establishment / "
            "该类机构不能核定此类编制",
            {"org_id": str(org.org_id), "kind": kind, "category": category.value},
        )


def check_not_below_held(est: Establishment, new_approved: int) -> None:
    """Approved quota may not fall below what is occupied or reserved."""
    if new_approved < est.held:
        raise below_occupied(est, new_approved)


def below_occupied(est: Establishment, new_approved: int) -> Rejection:
    return Rejection(
        ReasonCode.BELOW_OCCUPIED,
        f"approved {new_approved} would be below occupied {est.occupied} + reserved "
        f"{est.reserved} / 核定编制数不能少于实有人数与已预留数之和",
        {
            "org_id": str(est.org_id),
            "category": est.category.value,
            "approved": new_approved,
            "occupied": est.occupied,
            "reserved": est.reserved,
        },
    )


def check_within_limits(
    regions: Sequence[RegionUse], asked: Mapping[str, int], category: Category
) -> None:
    """Every region that gains approved quota must stay within its limit (WIRE-CONTRACT §7.2)."""
    for region in regions:
        more = asked.get(region.division_code, 0)
        if more > 0 and region.used + more > region.limit:
            raise Rejection(
                ReasonCode.REGION_LIMIT_EXCEEDED,
                f"division {region.division_code} would hold {region.used + more} {category.value} "
                f"places, above its limit {region.limit} / 超出区划编制总量控制数",
                {
                    "division_code": region.division_code,
                    "category": category.value,
                    "limit": region.limit,
                    "used": region.used,
                    "asked": more,
                },
            )


def check_region_limit(
    division_code: str,
    category: Category,
    limit: int,
    *,
    used: int,
    ancestor_limits: Mapping[str, int],
    descendant_limits: Mapping[str, int],
) -> None:
    """A limit may not be below what is approved inside the region, above an enclosing region's
    limit, or below the limit of a region inside it."""
    base = {"division_code": division_code, "category": category.value, "limit": limit}
    if limit < used:
        raise Rejection(
            ReasonCode.REGION_LIMIT_EXCEEDED,
            f"limit {limit} is below the {used} places already approved in {division_code} / "
            "控制数不能少于区划内已核定编制数",
            {**base, "used": used},
        )
    for code, parent_limit in sorted(ancestor_limits.items()):
        if limit > parent_limit:
            raise Rejection(
                ReasonCode.REGION_LIMIT_EXCEEDED,
                f"limit {limit} exceeds the limit {parent_limit} of the enclosing division "
                f"{code} / 控制数不能超过上级区划控制数",
                {**base, "parent_division_code": code, "parent_limit": parent_limit},
            )
    for code, child_limit in sorted(descendant_limits.items()):
        if child_limit > limit:
            raise Rejection(
                ReasonCode.REGION_LIMIT_EXCEEDED,
                f"limit {limit} is below the limit {child_limit} of division {code} inside it / "
                "控制数不能低于下级区划控制数",
                {**base, "child_division_code": code, "child_limit": child_limit},
            )


def reached_thresholds(limit: int | None, used: int) -> frozenset[int]:
    """The thresholds (percent of the limit) that ``used`` has reached; none without a limit."""
    if not limit:
        return frozenset()
    return frozenset(t for t in THRESHOLDS_PERCENT if used * 100 >= t * limit)


def crossed_thresholds(
    limit_before: int | None, used_before: int, limit_after: int | None, used_after: int
) -> list[int]:
    """Thresholds reached after a change that were not reached before it, lowest first."""
    before = reached_thresholds(limit_before, used_before)
    return sorted(reached_thresholds(limit_after, used_after) - before)


def check_leader_posts(current: LeaderPosts, principal: int, deputy: int) -> None:
    """Leader posts may not be set below the posts already held (WIRE-CONTRACT §7.4)."""
    if principal < current.principal_held or deputy < current.deputy_held:
        raise Rejection(
            ReasonCode.CONFLICT,
            f"leader posts {principal}/{deputy} would be below the held "
            f"{current.principal_held}/{current.deputy_held} / 领导职数不能少于实配数",
            {
                "principal": principal,
                "deputy": deputy,
                "principal_held": current.principal_held,
                "deputy_held": current.deputy_held,
            },
        )


def province_of(division_code: str) -> str:
    """The province enclosing a division (its first two digits, GB/T 2260)."""
    return division_code[:2] + "0000"


# --- quota-use notices and slots ------------------------------------------------------------


class NoticeStatus(StrEnum):
    ISSUED = "issued"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Notice:
    """A quota-use notice (用编通知单): ``count`` reserved places, ``used`` of them consumed."""

    notice_no: str
    org_id: UUID
    category: Category
    count: int
    used: int
    valid_until: date
    status: NoticeStatus

    @property
    def remaining(self) -> int:
        """Places still reserved under the notice (none once it is closed)."""
        return self.count - self.used if self.status is NoticeStatus.ISSUED else 0

    def lapsed(self, on: date) -> bool:
        """Whether the notice ran out before ``on`` (it is valid through ``valid_until``)."""
        return self.status is NoticeStatus.ISSUED and on > self.valid_until


def _notice_details(notice: Notice) -> dict[str, object]:
    return {
        "notice_no": notice.notice_no,
        "org_id": str(notice.org_id),
        "category": notice.category.value,
        "count": notice.count,
        "used": notice.used,
        "valid_until": notice.valid_until.isoformat(),
        "status": notice.status.value,
    }


def notice_invalid(number: str, reason: str, /, **details: object) -> Rejection:
    return Rejection(
        ReasonCode.NOTICE_INVALID,
        f"quota-use notice {number} cannot be used: {reason} / 用编通知单无效",
        {"notice_no": number, **details, "reason": reason},
    )


def check_notice_open(notice: Notice | None, notice_no: str, on: date) -> Notice:
    """A notice that is still issued and not lapsed (for cancelling it)."""
    if notice is None:
        raise notice_invalid(notice_no, "unknown")
    if notice.status is not NoticeStatus.ISSUED or notice.lapsed(on):
        status = NoticeStatus.EXPIRED if notice.lapsed(on) else notice.status
        raise notice_invalid(notice_no, f"already {status.value}", **_notice_details(notice))
    return notice


def check_notice_usable(
    notice: Notice | None, notice_no: str, org_id: UUID, category: Category, on: date
) -> Notice:
    """A notice that may give one place to an enrolment in ``org_id`` and ``category`` on
    ``on`` (WIRE-CONTRACT §7.3): issued to that org and category, unexpired, not used up."""
    if notice is None:
        raise notice_invalid(notice_no, "unknown")
    if notice.org_id != org_id or notice.category is not category:
        raise notice_invalid(
            notice_no,
            "issued to another org or category",
            **_notice_details(notice),
            asked_org_id=str(org_id),
            asked_category=category.value,
        )
    if notice.status is NoticeStatus.CANCELLED:
        raise notice_invalid(notice_no, "cancelled", **_notice_details(notice))
    if notice.status is NoticeStatus.EXPIRED or notice.lapsed(on):
        raise Rejection(
            ReasonCode.NOTICE_EXPIRED,
            f"quota-use notice {notice_no} expired after {notice.valid_until} / 用编通知单已过期",
            _notice_details(notice),
        )
    if notice.used >= notice.count:
        raise notice_exhausted(notice)
    return notice


def notice_exhausted(notice: Notice) -> Rejection:
    return Rejection(
        ReasonCode.NOTICE_EXHAUSTED,
        f"all {notice.count} places of quota-use notice {notice.notice_no} are used / "
        "用编通知单名额已用完",
        _notice_details(notice),
    )


def check_vacancy(est: Establishment, count: int) -> None:
    """``count`` places must be free: approved − occupied − reserved ≥ count (§7.1)."""
    if est.approved - est.held < count:
        raise no_vacancy(est, count)


def no_vacancy(est: Establishment, asked: int) -> Rejection:
    return Rejection(
        ReasonCode.NO_VACANCY,
        f"{est.org_id} has {est.vacant} vacant {est.category.value} places, {asked} asked / "
        "空编不足",
        {
            "org_id": str(est.org_id),
            "category": est.category.value,
            "approved": est.approved,
            "occupied": est.occupied,
            "reserved": est.reserved,
            "vacant": est.vacant,
            "asked": asked,
        },
    )


def check_leader_post_free(posts: LeaderPosts | None, post: LeaderPost) -> None:
    """One more holder of ``post`` must stay within the approved count (§7.4)."""
    current = posts or LeaderPosts()
    approved, held = (
        (current.principal, current.principal_held)
        if post is LeaderPost.PRINCIPAL
        else (current.deputy, current.deputy_held)
    )
    if held + 1 > approved:
        raise leader_posts_exceeded(current, post)


def leader_posts_exceeded(posts: LeaderPosts, post: LeaderPost) -> Rejection:
    return Rejection(
        ReasonCode.LEADER_POSTS_EXCEEDED,
        f"no free {post.value} leader post: {posts.principal_held}/{posts.principal} principal, "
        f"{posts.deputy_held}/{posts.deputy} deputy held / 领导职数已满",
        {
            "leader_post": post.value,
            "principal": posts.principal,
            "deputy": posts.deputy,
            "principal_held": posts.principal_held,
            "deputy_held": posts.deputy_held,
        },
    )


# --- replaying the ledger (history queries and rebuilds) -------------------------------------


@dataclass
class Tally:
    """Approved, occupied and reserved places of one org and category, as a replay sums them."""

    approved: int = 0
    occupied: int = 0
    reserved: int = 0

    @property
    def vacant(self) -> int:
        return max(self.approved - self.occupied - self.reserved, 0)


@dataclass
class PostTally:
    """Approved and held leader posts of one org or internal unit, as a replay sums them."""

    principal: int = 0
    deputy: int = 0
    principal_held: int = 0
    deputy_held: int = 0


@dataclass(frozen=True)
class Holding:
    """The slot a person holds, as a replay follows it: org, category, unit and leader post."""

    org_id: str
    category: str
    unit_id: str
    leader_post: str | None


@dataclass
class Replay:
    """Counts rebuilt by applying changes one by one (台账回放).

    Every change is a difference: approving a new total adds ``approved − previous``, a transfer
    moves ``amount``, a notice reserves its count, a slot turns a reserved place into an occupied
    one. Sums of differences do not depend on the order of changes of different orgs, so the
    replay of everything agrees with the live counts; only which slot a person holds is followed
    in order. Keys are strings: ``(org_id, category)``, ``(org_id, unit_id or "")``,
    ``(division_code, category)``.
    """

    establishment: dict[tuple[str, str], Tally] = field(default_factory=dict)
    posts: dict[tuple[str, str], PostTally] = field(default_factory=dict)
    limits: dict[tuple[str, str], int] = field(default_factory=dict)
    holdings: dict[str, Holding] = field(default_factory=dict)
    notices_used: dict[str, int] = field(default_factory=dict)

    def tally(self, org_id: str, category: str) -> Tally:
        return self.establishment.setdefault((org_id, category), Tally())

    def post_tally(self, org_id: str, unit_id: str | None) -> PostTally:
        return self.posts.setdefault((org_id, unit_id or ""), PostTally())

    def change_limit(self, division_code: str, category: str, delta: int) -> None:
        key = (division_code, category)
        self.limits[key] = self.limits.get(key, 0) + delta

    def change_approved(self, org_id: str, category: str, delta: int) -> None:
        self.tally(org_id, category).approved += delta

    def change_posts(
        self, org_id: str, unit_id: str | None, principal_delta: int, deputy_delta: int
    ) -> None:
        posts = self.post_tally(org_id, unit_id)
        posts.principal += principal_delta
        posts.deputy += deputy_delta

    def reserve(self, org_id: str, category: str, count: int) -> None:
        self.tally(org_id, category).reserved += count

    def occupy(
        self,
        person_id: str,
        org_id: str,
        category: str,
        unit_id: str | None,
        leader_post: str | None,
        notice_no: str | None,
    ) -> None:
        """One reserved place of ``org_id`` becomes the slot ``person_id`` holds."""
        tally = self.tally(org_id, category)
        tally.reserved -= 1
        tally.occupied += 1
        if notice_no is not None:
            self.notices_used[notice_no] = self.notices_used.get(notice_no, 0) + 1
        holding = Holding(org_id, category, unit_id or "", leader_post)
        self.holdings[person_id] = holding
        self._hold_post(holding, 1)

    def vacate(
        self,
        person_id: str,
        org_id: str,
        category: str | None,
        unit_id: str | None = None,
        leader_post: str | None = None,
    ) -> None:
        """``person_id`` leaves the slot held in ``org_id``; what is not given is taken from the
        slot the replay saw them take."""
        seen = self.holdings.pop(person_id, None)
        if seen is not None and seen.org_id == org_id:
            holding = Holding(
                org_id,
                category or seen.category,
                unit_id if unit_id is not None else seen.unit_id,
                leader_post if leader_post is not None else seen.leader_post,
            )
        else:
            holding = Holding(org_id, category or "", unit_id or "", leader_post)
        self.tally(org_id, holding.category).occupied -= 1
        self._hold_post(holding, -1)

    def return_to_notice(self, org_id: str, category: str, notice_no: str) -> None:
        """A cancelled occupation gave its place back to the notice it came from: the place
        vacated by ``vacate`` is reserved again and the notice has one more place left."""
        self.reserve(org_id, category, 1)
        self.notices_used[notice_no] = self.notices_used.get(notice_no, 0) - 1

    def merge(self, sources: set[str], target: str) -> None:
        """Everything the sources hold now belongs to the target (机构合并): places per category,
        the slots of their people, internal units' leader posts; the posts held at a source's
        own level join the target's own level (whose approved counts stay as they were)."""
        for (org_id, category), tally in list(self.establishment.items()):
            if org_id in sources:
                into = self.tally(target, category)
                into.approved += tally.approved
                into.occupied += tally.occupied
                into.reserved += tally.reserved
                self.establishment[(org_id, category)] = Tally()
        for person_id, holding in list(self.holdings.items()):
            if holding.org_id in sources:
                self.holdings[person_id] = Holding(
                    target, holding.category, holding.unit_id, holding.leader_post
                )
        for (org_id, unit_id), posts in list(self.posts.items()):
            if org_id not in sources:
                continue
            del self.posts[(org_id, unit_id)]
            if unit_id:
                self.posts[(target, unit_id)] = posts
            elif posts.principal_held or posts.deputy_held:
                own = self.post_tally(target, None)
                own.principal_held += posts.principal_held
                own.deputy_held += posts.deputy_held

    def _hold_post(self, holding: Holding, delta: int) -> None:
        if holding.leader_post is None:
            return
        posts = self.post_tally(holding.org_id, holding.unit_id)
        if holding.leader_post == LeaderPost.PRINCIPAL.value:
            posts.principal_held += delta
        else:
            posts.deputy_held += delta

    def apply_ledger(self, row: Mapping[str, Any]) -> None:
        """Apply one row of the ledger history (``quota_ledger``)."""
        kind = _short_type(row["event_type"])
        before: Mapping[str, Any] = row["before"] or {}
        after: Mapping[str, Any] = row["after"] or {}
        org_id, category = row["org_id"], row["category"]
        if kind == "RegionLimitSet":
            delta = after["limit"] - before.get("limit", 0)
            self.change_limit(row["division_code"], category, delta)
        elif kind in ("QuotaApproved", "QuotaTransferred"):
            self.change_approved(org_id, category, after["approved"] - before.get("approved", 0))
        elif kind == "LeaderPostsSet":
            self.change_posts(
                org_id,
                row["unit_id"],
                after["principal"] - before.get("principal", 0),
                after["deputy"] - before.get("deputy", 0),
            )
        elif kind == "QuotaUseNoticeIssued":
            self.reserve(org_id, category, after.get("notice_remaining", 0))
        elif kind in ("QuotaUseNoticeCancelled", "QuotaUseNoticeExpired"):
            self.reserve(org_id, category, -after.get("released", 0))
        elif kind == "EstablishmentsMerged":
            # One row per org and category, each with the counts before and after the merge.
            tally = self.tally(org_id, category)
            for name in ("approved", "occupied", "reserved"):
                delta = after.get(name, 0) - before.get(name, 0)
                setattr(tally, name, getattr(tally, name) + delta)
        elif kind in ("SlotReleased",) or (kind == "SlotMoved" and "moved_to" in after):
            self.vacate(
                after["person_id"], org_id, category, row["unit_id"] or "", after.get("leader_post")
            )
            if after.get("returned_to_notice"):
                self.return_to_notice(org_id, category, after["returned_to_notice"])
        elif kind in ("SlotOccupied", "SlotMoved"):
            self.occupy(
                after["person_id"],
                org_id,
                category,
                row["unit_id"],
                after.get("leader_post"),
                after.get("notice_no"),
            )


def _short_type(event_type: str) -> str:
    """``bianzhi.quota.QuotaApproved.v1`` → ``QuotaApproved``."""
    parts = event_type.split(".")
    return parts[-2] if len(parts) >= 2 else event_type
