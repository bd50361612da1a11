"""Commands and events of the quota service (编制): the establishment ledger.

Approved quota per org and category (核定编制), region limits (总量控制), leader posts (领导职数),
quota-use notices (用编通知单) and slot occupancy (占编). The slot commands (``OccupySlot``,
``ReleaseSlot``, ``MoveSlot``) are internal steps of the roster sagas, not for front-ends.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contracts.base import Command, Event, type_name
from contracts.codes import INSTITUTIONAL_CATEGORIES, Category, Funding, LeaderPost, ReasonCode
from contracts.common import Count, DivisionCode, Document, NoticeNo, ShortText, Uuid
from contracts.topics import QUOTA_COMMANDS, QUOTA_EVENTS

PositiveCount = Annotated[int, Field(ge=1, le=1_000_000)]


class QuotaCommand(Command):
    TOPIC: ClassVar[str] = QUOTA_COMMANDS
    SUBJECT: ClassVar[str] = "org_id"


class QuotaEvent(Event):
    TOPIC: ClassVar[str] = QUOTA_EVENTS
    SUBJECT: ClassVar[str] = "org_id"


# --- commands -----------------------------------------------------------------------------


class SetRegionLimit(QuotaCommand):
    """Set the total limit of one category for a region (编制总量控制数)."""

    TYPE: ClassVar[str] = type_name("quota", "SetRegionLimit")
    SUBJECT: ClassVar[str] = "division_code"

    division_code: DivisionCode
    category: Category
    limit: Count
    document: Document
    effective_date: date | None = None


class ApproveQuota(QuotaCommand):
    """Approve the quota of one category for an org (核定编制); ``approved`` is the new total."""

    TYPE: ClassVar[str] = type_name("quota", "ApproveQuota")

    org_id: Uuid
    category: Category
    approved: Count
    document: Document
    effective_date: date
    funding: Funding | None = None

    @model_validator(mode="after")
    def _funding_only_institutional(self) -> ApproveQuota:
        if self.funding is not None and self.category not in INSTITUTIONAL_CATEGORIES:
            raise ValueError("funding applies to institutional categories only")
        return self


class TransferQuota(QuotaCommand):
    """Move ``amount`` approved places of one category from one org to another (划转编制)."""

    TYPE: ClassVar[str] = type_name("quota", "TransferQuota")
    SUBJECT: ClassVar[str] = "from_org_id"

    from_org_id: Uuid
    to_org_id: Uuid
    category: Category
    amount: PositiveCount
    document: Document
    effective_date: date | None = None

    @model_validator(mode="after")
    def _orgs_differ(self) -> TransferQuota:
        if self.from_org_id == self.to_org_id:
            raise ValueError("from_org_id must differ from to_org_id")
        return self


class SetLeaderPosts(QuotaCommand):
    """Approve the leader posts (领导职数) of an org, or of one of its internal units."""

    TYPE: ClassVar[str] = type_name("quota", "SetLeaderPosts")

    org_id: Uuid
    unit_id: Uuid | None = None
    principal: Count
    deputy: Count
    document: Document
    effective_date: date | None = None


class IssueQuotaUseNotice(QuotaCommand):
    """Issue a quota-use notice (用编通知单): ``count`` places of a category, to use by a date.

    The places are reserved at issue and consumed one per enrolment or transfer-in.
    """

    TYPE: ClassVar[str] = type_name("quota", "IssueQuotaUseNotice")

    notice_no: NoticeNo
    org_id: Uuid
    category: Category
    count: PositiveCount
    valid_until: date
    document: Document


class CancelQuotaUseNotice(QuotaCommand):
    """Cancel a quota-use notice; its unused places are no longer reserved."""

    TYPE: ClassVar[str] = type_name("quota", "CancelQuotaUseNotice")
    SUBJECT: ClassVar[str] = "notice_no"

    notice_no: NoticeNo
    org_id: Uuid | None = None
    reason: ShortText | None = None


class OccupySlot(QuotaCommand):
    """Internal (roster saga): occupy one slot of ``org_id``, consuming a place of ``notice_no``.

    Sent by the roster service only. Idempotent per ``request_id``; answered by ``SlotOccupied``
    or ``SlotRequestRejected``.
    """

    TYPE: ClassVar[str] = type_name("quota", "OccupySlot")

    request_id: Uuid
    person_id: Uuid
    org_id: Uuid
    category: Category
    notice_no: NoticeNo
    leader_post: LeaderPost | None = None
    unit_id: Uuid | None = None


class ReleaseSlot(QuotaCommand):
    """Internal (roster saga): free the slot ``person_id`` holds in ``org_id``.

    Sent by the roster service only (release, and compensation of a failed saga). Idempotent per
    ``request_id``; answered by ``SlotReleased`` or ``SlotRequestRejected``.
    """

    TYPE: ClassVar[str] = type_name("quota", "ReleaseSlot")

    request_id: Uuid
    person_id: Uuid
    org_id: Uuid
    category: Category
    leader_post: LeaderPost | None = None
    unit_id: Uuid | None = None
    occupy_request_id: Uuid | None = None
    """A saga's compensation: release only the slot taken by this ``OccupySlot`` request.
    When that request has not taken effect it is cancelled (it never will), and the release
    completes with no event; when its slot is already gone, likewise."""


class MoveSlot(QuotaCommand):
    """Internal (roster saga): move a person's slot to another org in one step (调动).

    Sent by the roster service only. Quota frees whatever slot ``person_id`` holds in
    ``from_org_id`` and occupies one of ``category`` in ``to_org_id`` (``unit_id`` and
    ``leader_post`` describe the new slot), consuming a place of ``notice_no``, which must belong
    to ``to_org_id``. Keyed by ``to_org_id``, where the vacancy is checked. Idempotent per
    ``request_id``; answered by ``SlotMoved`` or ``SlotRequestRejected``.
    """

    TYPE: ClassVar[str] = type_name("quota", "MoveSlot")
    SUBJECT: ClassVar[str] = "to_org_id"

    request_id: Uuid
    person_id: Uuid
    from_org_id: Uuid
    to_org_id: Uuid
    category: Category
    notice_no: NoticeNo
    leader_post: LeaderPost | None = None
    unit_id: Uuid | None = None

    @model_validator(mode="after")
    def _orgs_differ(self) -> MoveSlot:
        if self.from_org_id == self.to_org_id:
            raise ValueError("from_org_id must differ from to_org_id")
        return self


class CancelSlotRequest(QuotaCommand):
    """Internal (roster saga): a step that got no answer in time is cancelled or confirmed.

    Keyed by the org the step was keyed by, so it arrives after it. When the step
    ``cancels_request_id`` has not taken effect it never will (completed, no event); when it
    has, the cancel is refused with ``conflict`` and ``details.outcome`` = ``"completed"``, and
    the saga goes on as if the step had answered."""

    TYPE: ClassVar[str] = type_name("quota", "CancelSlotRequest")

    request_id: Uuid
    cancels_request_id: Uuid
    person_id: Uuid
    org_id: Uuid


class MergeEstablishments(QuotaCommand):
    """Internal (orgs saga, 机构合并): move every source org's establishment — approved,
    occupied and reserved places per category, slots, open notices, leader posts held — to the
    target in one transaction, and close the sources. Answered by ``EstablishmentsMerged`` or a
    rejection (``category_not_allowed``, ``region_limit_exceeded``, ``org_not_active``, …)."""

    TYPE: ClassVar[str] = type_name("quota", "MergeEstablishments")
    SUBJECT: ClassVar[str] = "target_org_id"

    request_id: Uuid
    source_org_ids: Annotated[list[Uuid], Field(min_length=1, max_length=50)]
    target_org_id: Uuid
    document: Document
    effective_date: date | None = None

    @model_validator(mode="after")
    def _target_not_a_source(self) -> MergeEstablishments:
        if self.target_org_id in self.source_org_ids:
            raise ValueError("the target org cannot be one of the sources")
        if len(set(self.source_org_ids)) != len(self.source_org_ids):
            raise ValueError("source_org_ids repeat an org")
        return self


class CloseEstablishment(QuotaCommand):
    """Internal (orgs saga, 机构撤销): close an org's establishment, refused with
    ``org_not_empty`` while it holds approved, occupied or reserved places, open notices or
    leader posts held. Answered by ``EstablishmentClosed`` or that rejection."""

    TYPE: ClassVar[str] = type_name("quota", "CloseEstablishment")

    request_id: Uuid
    org_id: Uuid
    document: Document
    effective_date: date | None = None


# --- events -------------------------------------------------------------------------------


class RegionLimitSet(QuotaEvent):
    TYPE: ClassVar[str] = type_name("quota", "RegionLimitSet")
    SUBJECT: ClassVar[str] = "division_code"

    division_code: str
    category: Category
    limit: int
    previous_limit: int | None = None
    document: Document
    effective_date: date


class QuotaApproved(QuotaEvent):
    TYPE: ClassVar[str] = type_name("quota", "QuotaApproved")

    org_id: Uuid
    category: Category
    approved: int
    previous_approved: int = 0
    funding: Funding | None = None
    document: Document
    effective_date: date


class QuotaTransferred(QuotaEvent):
    TYPE: ClassVar[str] = type_name("quota", "QuotaTransferred")
    SUBJECT: ClassVar[str] = "from_org_id"

    from_org_id: Uuid
    to_org_id: Uuid
    category: Category
    amount: int
    from_approved: int | None = None
    to_approved: int | None = None
    document: Document
    effective_date: date


class LeaderPostsSet(QuotaEvent):
    TYPE: ClassVar[str] = type_name("quota", "LeaderPostsSet")

    org_id: Uuid
    unit_id: Uuid | None = None
    principal: int
    deputy: int
    previous_principal: int | None = None
    previous_deputy: int | None = None
    document: Document
    effective_date: date


class QuotaUseNoticeIssued(QuotaEvent):
    TYPE: ClassVar[str] = type_name("quota", "QuotaUseNoticeIssued")

    notice_no: str
    org_id: Uuid
    category: Category
    count: int
    valid_until: date
    document: Document


class QuotaUseNoticeCancelled(QuotaEvent):
    """Keyed by ``org_id`` like every notice event, so one org's notice history stays in order."""

    TYPE: ClassVar[str] = type_name("quota", "QuotaUseNoticeCancelled")

    notice_no: str
    org_id: Uuid
    category: Category | None = None
    remaining: int | None = None
    reason: str | None = None


class QuotaUseNoticeExpired(QuotaEvent):
    TYPE: ClassVar[str] = type_name("quota", "QuotaUseNoticeExpired")

    notice_no: str
    org_id: Uuid
    category: Category | None = None
    valid_until: date
    remaining: int | None = None


class SlotOccupied(QuotaEvent):
    TYPE: ClassVar[str] = type_name("quota", "SlotOccupied")

    request_id: Uuid
    person_id: Uuid
    org_id: Uuid
    category: Category
    notice_no: str
    leader_post: LeaderPost | None = None
    unit_id: Uuid | None = None
    occupied: int | None = None


class SlotReleased(QuotaEvent):
    TYPE: ClassVar[str] = type_name("quota", "SlotReleased")

    request_id: Uuid
    person_id: Uuid
    org_id: Uuid
    category: Category
    leader_post: LeaderPost | None = None
    unit_id: Uuid | None = None
    occupied: int | None = None
    returned_to_notice: str | None = None
    """Set when the release undid an occupation (a saga's compensation) and the place went back
    to this notice's reservation instead of becoming vacant."""


class SlotMoved(QuotaEvent):
    TYPE: ClassVar[str] = type_name("quota", "SlotMoved")
    SUBJECT: ClassVar[str] = "to_org_id"

    request_id: Uuid
    person_id: Uuid
    from_org_id: Uuid
    to_org_id: Uuid
    from_category: Category | None = None
    category: Category
    notice_no: str
    leader_post: LeaderPost | None = None
    unit_id: Uuid | None = None


class SlotRequestRejected(QuotaEvent):
    """Quota's refusal of a saga step (``OccupySlot``/``ReleaseSlot``/``MoveSlot``).

    ``org_id`` is the subject of the refused request (``to_org_id`` for ``MoveSlot``).
    """

    TYPE: ClassVar[str] = type_name("quota", "SlotRequestRejected")

    request_id: Uuid
    request_type: str | None = None
    person_id: Uuid | None = None
    org_id: Uuid
    code: ReasonCode
    message: str = ""
    details: dict[str, Any] = Field(default_factory=dict)


class MergedCategory(BaseModel):
    """What one category of the sources brought to the target in a merge."""

    model_config = ConfigDict(extra="ignore")

    category: Category
    approved: int
    occupied: int
    reserved: int
    target_approved: int
    target_occupied: int
    target_reserved: int


class EstablishmentsMerged(QuotaEvent):
    """The sources' establishment now belongs to the target (机构合并); the sources are closed."""

    TYPE: ClassVar[str] = type_name("quota", "EstablishmentsMerged")
    SUBJECT: ClassVar[str] = "target_org_id"

    request_id: Uuid
    source_org_ids: list[Uuid]
    target_org_id: Uuid
    categories: list[MergedCategory] = Field(default_factory=list)
    slots_moved: int = 0
    notices_moved: list[str] = Field(default_factory=list)
    document: Document
    effective_date: date


class EstablishmentClosed(QuotaEvent):
    """An empty org's establishment is closed (机构撤销): nothing may be approved or occupied."""

    TYPE: ClassVar[str] = type_name("quota", "EstablishmentClosed")

    request_id: Uuid
    org_id: Uuid
    document: Document
    effective_date: date


class OverQuotaDetected(QuotaEvent):
    """An org holds more than approved (after a reduction or merge); its enrolment is blocked.

    Without ``leader_post`` the numbers are slots of ``category``; with it, leader-post holders.
    """

    TYPE: ClassVar[str] = type_name("quota", "OverQuotaDetected")

    org_id: Uuid
    category: Category | None = None
    leader_post: LeaderPost | None = None
    unit_id: Uuid | None = None
    approved: int
    occupied: int


class RegionLimitReached(QuotaEvent):
    """The approved quota inside a region reached 90 % or 100 % of its limit."""

    TYPE: ClassVar[str] = type_name("quota", "RegionLimitReached")
    SUBJECT: ClassVar[str] = "division_code"

    division_code: str
    category: Category
    limit: int
    used: int
    threshold_percent: Literal[90, 100]
