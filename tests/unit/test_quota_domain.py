"""The pure rules of the establishment ledger (services/quota/domain/model.py)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from contracts.codes import Category, OrgKind, OrgStatus, ReasonCode
from services.quota.domain import model
from services.quota.domain.model import Establishment, LeaderPosts, OrgRef, RegionUse
from services.runtime.rules import Rejection


def org(**kw: Any) -> OrgRef:
    fields: dict[str, Any] = {
        "org_id": uuid.uuid4(),
        "status": OrgStatus.ACTIVE,
        "kind": OrgKind.ORGAN,
        "division_code": "130102",
        "name": "石家庄市长安区财政局",
    }
    fields.update(kw)
    return OrgRef(**fields)


def est(approved: int = 0, occupied: int = 0, reserved: int = 0) -> Establishment:
    return Establishment(uuid.uuid4(), Category.ADMIN, approved, occupied, reserved)


def refused(code: ReasonCode, fn: Any, *args: Any, **kw: Any) -> dict[str, Any]:
    with pytest.raises(Rejection) as caught:
        fn(*args, **kw)
    assert caught.value.code is code, caught.value.message
    return caught.value.details


@pytest.mark.parametrize("status", [OrgStatus.MERGED, OrgStatus.ABOLISHED])
def test_only_active_orgs_take_quota(status: OrgStatus) -> None:
    model.require_active(org())
    details = refused(ReasonCode.ORG_NOT_ACTIVE, model.require_active, org(status=status))
    assert details["status"] == status.value


@pytest.mark.parametrize(
    ("kind", "category", "allowed"),
    [
        (OrgKind.ORGAN, Category.ADMIN, True),
        (OrgKind.ORGAN, Category.POLITICAL_LEGAL, True),
        (OrgKind.ORGAN, Category.SUPPORT, True),
        (OrgKind.ORGAN, Category.INSTITUTIONAL, False),
        (OrgKind.PUBLIC_INSTITUTION, Category.INSTITUTIONAL, True),
        (OrgKind.PUBLIC_INSTITUTION, Category.INSTITUTIONAL_CSR, True),
        (OrgKind.PUBLIC_INSTITUTION, Category.ADMIN, False),
        (OrgKind.MASS_ORG, Category.ADMIN, False),
        (OrgKind.ENTERPRISE, Category.SUPPORT, False),
    ],
)
def test_categories_follow_the_org_kind(kind: OrgKind, category: Category, allowed: bool) -> None:
    subject = org(kind=kind)
    if allowed:
        model.require_category(subject, category)
    else:
        details = refused(
            ReasonCode.CATEGORY_NOT_ALLOWED, model.require_category, subject, category
        )
        assert details == {
            "org_id": str(subject.org_id),
            "kind": kind.value,
            "category": category.value,
        }


def test_an_org_known_only_from_a_merge_is_not_registered() -> None:
    assert org().registered
    assert not OrgRef(org_id=uuid.uuid4(), status=OrgStatus.MERGED).registered


def test_approved_may_fall_to_but_not_below_occupied_plus_reserved() -> None:
    current = est(approved=10, occupied=5, reserved=2)
    assert current.held == 7 and current.vacant == 3
    model.check_not_below_held(current, 7)
    details = refused(ReasonCode.BELOW_OCCUPIED, model.check_not_below_held, current, 6)
    assert details | {"org_id": None} == {
        "org_id": None,
        "category": "admin",
        "approved": 6,
        "occupied": 5,
        "reserved": 2,
    }


def test_vacant_is_never_negative_for_an_over_quota_org() -> None:
    assert est(approved=3, occupied=5).vacant == 0


def test_a_region_may_gain_up_to_its_limit_and_no_further() -> None:
    regions = [RegionUse("130100", limit=100, used=90), RegionUse("130000", limit=500, used=10)]
    model.check_within_limits(regions, {"130100": 10, "130000": 10}, Category.ADMIN)
    details = refused(
        ReasonCode.REGION_LIMIT_EXCEEDED,
        model.check_within_limits,
        regions,
        {"130100": 11, "130000": 11},
        Category.ADMIN,
    )
    assert details == {
        "division_code": "130100",
        "category": "admin",
        "limit": 100,
        "used": 90,
        "asked": 11,
    }


def test_a_region_already_over_its_limit_may_still_shrink() -> None:
    model.check_within_limits([RegionUse("130100", 10, 12)], {"130100": -1}, Category.ADMIN)


def test_a_limit_may_not_fall_below_what_is_approved_inside() -> None:
    kw: dict[str, Any] = {"ancestor_limits": {}, "descendant_limits": {}}
    model.check_region_limit("130100", Category.ADMIN, 40, used=40, **kw)
    details = refused(
        ReasonCode.REGION_LIMIT_EXCEEDED,
        model.check_region_limit,
        "130100",
        Category.ADMIN,
        39,
        used=40,
        **kw,
    )
    assert details == {"division_code": "130100", "category": "admin", "limit": 39, "used": 40}


def test_a_child_limit_may_not_exceed_a_parent_limit() -> None:
    details = refused(
        ReasonCode.REGION_LIMIT_EXCEEDED,
        model.check_region_limit,
        "130102",
        Category.ADMIN,
        60,
        used=0,
        ancestor_limits={"130100": 50, "130000": 1000},
        descendant_limits={},
    )
    assert details["parent_division_code"] == "130100"
    assert details["parent_limit"] == 50


def test_a_parent_limit_may_not_fall_below_a_child_limit() -> None:
    details = refused(
        ReasonCode.REGION_LIMIT_EXCEEDED,
        model.check_region_limit,
        "130100",
        Category.ADMIN,
        20,
        used=0,
        ancestor_limits={},
        descendant_limits={"130102": 30},
    )
    assert details["child_division_code"] == "130102"
    assert details["child_limit"] == 30


@pytest.mark.parametrize(
    ("limit_before", "used_before", "limit_after", "used_after", "crossed"),
    [
        (100, 80, 100, 89, []),
        (100, 80, 100, 90, [90]),
        (100, 89, 100, 100, [90, 100]),
        (100, 90, 100, 100, [100]),
        (100, 95, 100, 96, []),
        (100, 100, 100, 90, []),
        (0, 50, 60, 50, []),  # no limit before, 83 % after
        (0, 55, 60, 55, [90]),
        (100, 95, 95, 95, [100]),  # lowering the limit onto what is used
        (0, 0, 0, 0, []),  # a zero limit reaches nothing
    ],
)
def test_thresholds_are_reported_when_crossed(
    limit_before: int, used_before: int, limit_after: int, used_after: int, crossed: list[int]
) -> None:
    assert model.crossed_thresholds(limit_before, used_before, limit_after, used_after) == crossed


def test_leader_posts_may_not_fall_below_the_posts_held() -> None:
    held = LeaderPosts(principal=1, deputy=3, principal_held=1, deputy_held=2)
    model.check_leader_posts(held, 1, 2)
    details = refused(ReasonCode.CONFLICT, model.check_leader_posts, held, 1, 1)
    assert details == {"principal": 1, "deputy": 1, "principal_held": 1, "deputy_held": 2}
    refused(ReasonCode.CONFLICT, model.check_leader_posts, held, 0, 3)


@pytest.mark.parametrize(
    ("code", "province"), [("130102", "130000"), ("130100", "130000"), ("140000", "140000")]
)
def test_province_of(code: str, province: str) -> None:
    assert model.province_of(code) == province
