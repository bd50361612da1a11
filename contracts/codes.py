"""Reference codes of the wire contract (WIRE-CONTRACT §3 and §4): stable strings, never renamed."""

from __future__ import annotations

from enum import StrEnum


class ReasonCode(StrEnum):
    """Why a command was rejected (``CommandRejected.code``)."""

    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    INVALID_CITIZEN_ID = "invalid_citizen_id"
    INVALID_USCC = "invalid_uscc"
    UNKNOWN_DIVISION = "unknown_division"
    ORG_NOT_ACTIVE = "org_not_active"
    ORG_NOT_EMPTY = "org_not_empty"
    CATEGORY_NOT_ALLOWED = "category_not_allowed"
    REGION_LIMIT_EXCEEDED = "region_limit_exceeded"
    BELOW_OCCUPIED = "below_occupied"
    NO_VACANCY = "no_vacancy"
    NOTICE_INVALID = "notice_invalid"
    NOTICE_EXHAUSTED = "notice_exhausted"
    NOTICE_EXPIRED = "notice_expired"
    LEADER_POSTS_EXCEEDED = "leader_posts_exceeded"
    ALREADY_ENROLLED = "already_enrolled"
    NOT_ENROLLED = "not_enrolled"
    # Extension: a saga step got no answer in time; the saga compensated and nothing changed.
    TIMEOUT = "timeout"


class Category(StrEnum):
    """Establishment category (编制类别)."""

    ADMIN = "admin"  # 行政编制
    POLITICAL_LEGAL = "political_legal"  # 政法专项编制
    INSTITUTIONAL = "institutional"  # 事业编制
    INSTITUTIONAL_CSR = "institutional_csr"  # 参照公务员法管理事业编制
    SUPPORT = "support"  # 工勤编制


class Funding(StrEnum):
    """Funding form of an institutional establishment (经费形式)."""

    FULL = "full"  # 全额拨款
    PARTIAL = "partial"  # 差额拨款
    SELF = "self"  # 自收自支


class OrgKind(StrEnum):
    """Kind of organization (机构类别)."""

    ORGAN = "organ"  # 机关
    PUBLIC_INSTITUTION = "public_institution"  # 事业单位
    MASS_ORG = "mass_org"  # 群团
    ENTERPRISE = "enterprise"


class OrgStatus(StrEnum):
    """Lifecycle state of an organization."""

    ACTIVE = "active"
    MERGED = "merged"
    ABOLISHED = "abolished"


class EntryMethod(StrEnum):
    """How a person entered the establishment (进入形式)."""

    EXAM = "exam"  # 考录/招考
    TRANSFER_IN = "transfer_in"  # 调入
    MILITARY_RESETTLEMENT = "military_resettlement"  # 军转安置
    APPOINTMENT = "appointment"  # 选调/任命
    OTHER = "other"


class ReleaseReason(StrEnum):
    """Why a person left the establishment (出编原因)."""

    RETIRED = "retired"
    RESIGNED = "resigned"
    DISMISSED = "dismissed"
    DECEASED = "deceased"
    TRANSFERRED_OUT = "transferred_out"
    OTHER = "other"


class LeaderPost(StrEnum):
    """A leader post (领导职数): principal (正职) or deputy (副职)."""

    PRINCIPAL = "principal"
    DEPUTY = "deputy"


class Role(StrEnum):
    """Actor roles; each includes the powers of the ones before it."""

    CLERK = "clerk"
    APPROVER = "approver"
    ADMIN = "admin"


# WIRE-CONTRACT §4: which categories each kind of org may hold. Kinds not listed hold none.
CATEGORIES_BY_KIND: dict[OrgKind, frozenset[Category]] = {
    OrgKind.ORGAN: frozenset({Category.ADMIN, Category.POLITICAL_LEGAL, Category.SUPPORT}),
    OrgKind.PUBLIC_INSTITUTION: frozenset(
        {Category.INSTITUTIONAL, Category.INSTITUTIONAL_CSR, Category.SUPPORT}
    ),
}

INSTITUTIONAL_CATEGORIES: frozenset[Category] = frozenset(
    {Category.INSTITUTIONAL, Category.INSTITUTIONAL_CSR}
)


def category_allowed(kind: OrgKind | str, category: Category | str) -> bool:
    """Whether an org of ``kind`` may hold establishment of ``category`` (WIRE-CONTRACT §4)."""
    try:
        allowed = CATEGORIES_BY_KIND.get(OrgKind(kind), frozenset())
        return Category(category) in allowed
    except ValueError:
        return False
