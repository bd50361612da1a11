"""The pure rules of the orgs domain (services/orgs/domain/model.py): no database, no broker."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import date
from typing import Any

import pytest

from contracts.codes import Funding, OrgKind, OrgStatus, ReasonCode
from services.orgs.domain import model
from services.orgs.domain.model import Org, Unit
from services.runtime.rules import Rejection

DAY = date(2026, 1, 5)
ORGAN_USCC = "11610923MB2900168E"  # starts with 11: an organ's code
INSTITUTION_USCC = "121526004609138637"  # starts with 12: a public institution's code


def org(**kw: Any) -> Org:
    fields: dict[str, Any] = {
        "org_id": uuid.uuid4(),
        "name": "石家庄市人民政府",
        "kind": OrgKind.ORGAN,
        "division_code": "130100",
        "effective_date": DAY,
    }
    fields.update(kw)
    return Org(**fields)


def register(**kw: Any) -> tuple[Org, list[str]]:
    fields: dict[str, Any] = {
        "org_id": uuid.uuid4(),
        "name": "石家庄市长安区财政局",
        "kind": OrgKind.ORGAN,
        "division_code": "130102",
        "parent": None,
        "uscc": None,
        "grade": None,
        "alt_names": [],
        "functions": [],
        "funding": None,
        "effective_date": DAY,
    }
    fields.update(kw)
    return model.register(**fields)


def rejected(code: ReasonCode, fn: Any, *args: Any, **kw: Any) -> Rejection:
    with pytest.raises(Rejection) as info:
        fn(*args, **kw)
    assert info.value.code is code, (info.value.code, info.value.message)
    return info.value


INACTIVE = [OrgStatus.MERGED, OrgStatus.ABOLISHED]


# --- register -----------------------------------------------------------------------------


def test_register_makes_an_active_org_under_its_parent() -> None:
    parent = org()
    new, warnings = register(
        parent=parent,
        grade="正处级",
        functions=["预算管理", "国库集中支付", "预算管理"],
        effective_date=date(2026, 2, 1),
    )
    assert new.status is OrgStatus.ACTIVE
    assert new.parent_org_id == parent.org_id
    assert new.division_code == "130102"
    assert new.grade == "正处级"
    assert new.functions == ("预算管理", "国库集中支付")  # deduplicated, order kept
    assert new.units == ()
    assert new.effective_date == date(2026, 2, 1)
    assert warnings == []


def test_register_without_parent() -> None:
    new, _ = register()
    assert new.parent_org_id is None


@pytest.mark.parametrize("funding", list(Funding))
def test_funding_is_allowed_for_public_institutions(funding: Funding) -> None:
    new, _ = register(
        kind=OrgKind.PUBLIC_INSTITUTION, name="长安区疾病预防控制中心", funding=funding
    )
    assert new.funding is funding


@pytest.mark.parametrize(
    "kind", [OrgKind.ORGAN, OrgKind.MASS_ORG, OrgKind.ENTERPRISE], ids=lambda k: k.value
)
def test_funding_is_refused_for_other_kinds(kind: OrgKind) -> None:
    rej = rejected(ReasonCode.INVALID_MESSAGE, register, kind=kind, funding=Funding.FULL)
    assert rej.details == {"field": "funding", "kind": kind.value}


@pytest.mark.parametrize("status", INACTIVE, ids=lambda s: s.value)
def test_register_under_an_inactive_parent_is_refused(status: OrgStatus) -> None:
    parent = org(status=status)
    rej = rejected(ReasonCode.ORG_NOT_ACTIVE, register, parent=parent)
    assert rej.details == {"org_id": str(parent.org_id), "status": status.value}


@pytest.mark.parametrize(
    ("child_division", "parent_division"),
    [
        ("130202", "130100"),  # 唐山 路南区 under 石家庄市
        ("130100", "130102"),  # a city under one of its districts
        ("130104", "130102"),  # a sibling district
        ("110000", "130000"),  # another province
    ],
)
def test_child_division_outside_the_parents_is_a_conflict(
    child_division: str, parent_division: str
) -> None:
    parent = org(division_code=parent_division)
    rej = rejected(ReasonCode.CONFLICT, register, parent=parent, division_code=child_division)
    assert rej.details == {
        "division_code": child_division,
        "parent_division_code": parent_division,
    }


@pytest.mark.parametrize(
    ("child_division", "parent_division"),
    [("130102", "130100"), ("130102", "130000"), ("130100", "130100"), ("130102", "130102")],
)
def test_child_division_inside_the_parents_is_accepted(
    child_division: str, parent_division: str
) -> None:
    new, _ = register(parent=org(division_code=parent_division), division_code=child_division)
    assert new.division_code == child_division


@pytest.mark.parametrize(
    ("kind", "uscc", "warns"),
    [
        (OrgKind.ORGAN, ORGAN_USCC, False),
        (OrgKind.ORGAN, INSTITUTION_USCC, True),
        (OrgKind.PUBLIC_INSTITUTION, INSTITUTION_USCC, False),
        (OrgKind.PUBLIC_INSTITUTION, ORGAN_USCC, True),
        (OrgKind.ENTERPRISE, "91350100M000100Y43", False),
    ],
)
def test_uscc_that_does_not_fit_the_kind_is_a_warning_not_a_refusal(
    kind: OrgKind, uscc: str, warns: bool
) -> None:
    new, warnings = register(kind=kind, uscc=uscc)
    assert new.uscc == uscc
    if warns:
        assert len(warnings) == 1
        assert uscc in warnings[0]
        assert "统一社会信用代码" in warnings[0]
    else:
        assert warnings == []


def test_alt_names_are_deduplicated_and_exclude_the_name() -> None:
    new, _ = register(
        name="石家庄市长安区财政局",
        alt_names=["长安区财政局", "石家庄市长安区财政局", "长安区国资办", "长安区财政局"],
    )
    assert new.alt_names == ("长安区财政局", "长安区国资办")


# --- rename -------------------------------------------------------------------------------


def test_rename_keeps_alt_names_when_none_are_given() -> None:
    before = org(alt_names=("市政府",))
    after = model.rename(before, "石家庄市人民政府办公室", None)
    assert after.name == "石家庄市人民政府办公室"
    assert after.alt_names == ("市政府",)
    assert before.name == "石家庄市人民政府"  # the aggregate is immutable


def test_rename_replaces_alt_names_deduplicated_without_the_new_name() -> None:
    before = org(alt_names=("市政府",))
    after = model.rename(before, "新名称", ["新名称", "旧称", "旧称", "简称"])
    assert after.alt_names == ("旧称", "简称")


def test_rename_can_change_only_the_alt_names() -> None:
    before = org(alt_names=("市政府",))
    after = model.rename(before, before.name, ["市府"])
    assert after.name == before.name
    assert after.alt_names == ("市府",)


def test_rename_to_an_empty_alt_name_list_clears_them() -> None:
    assert model.rename(org(alt_names=("市政府",)), "石家庄市人民政府", []).alt_names == ()


@pytest.mark.parametrize(
    "alt_names",
    [None, ["市政府"], ["市政府", "市政府"], ["市政府", "石家庄市人民政府"]],
    ids=["none", "same", "same-duplicated", "same-with-name"],
)
def test_rename_that_changes_nothing_is_a_conflict(alt_names: list[str] | None) -> None:
    before = org(alt_names=("市政府",))
    rejected(ReasonCode.CONFLICT, model.rename, before, before.name, alt_names)


@pytest.mark.parametrize("status", INACTIVE, ids=lambda s: s.value)
def test_rename_of_an_inactive_org_is_refused(status: OrgStatus) -> None:
    rejected(ReasonCode.ORG_NOT_ACTIVE, model.rename, org(status=status), "新名称", None)


# --- functions ----------------------------------------------------------------------------


def test_update_functions_replaces_them_deduplicated() -> None:
    before = org(functions=("旧职能",))
    after = model.update_functions(before, ["统筹", "协调", "统筹"])
    assert after.functions == ("统筹", "协调")


@pytest.mark.parametrize("status", INACTIVE, ids=lambda s: s.value)
def test_update_functions_of_an_inactive_org_is_refused(status: OrgStatus) -> None:
    rejected(ReasonCode.ORG_NOT_ACTIVE, model.update_functions, org(status=status), ["统筹"])


# --- internal units -----------------------------------------------------------------------


def test_add_units_in_order_and_find_them() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    after = model.add_unit(model.add_unit(org(), first, "办公室"), second, "预算科")
    assert after.units == (Unit(first, "办公室"), Unit(second, "预算科"))
    assert after.unit(second) == Unit(second, "预算科")
    assert after.unit(uuid.uuid4()) is None


def test_add_unit_with_an_existing_id_is_a_conflict() -> None:
    unit_id = uuid.uuid4()
    before = org(units=(Unit(unit_id, "办公室"),))
    rej = rejected(ReasonCode.CONFLICT, model.add_unit, before, unit_id, "预算科")
    assert rej.details == {"unit_id": str(unit_id)}


def test_add_unit_with_an_existing_name_is_a_conflict() -> None:
    before = org(units=(Unit(uuid.uuid4(), "办公室"),))
    rej = rejected(ReasonCode.CONFLICT, model.add_unit, before, uuid.uuid4(), "办公室")
    assert rej.details == {"name": "办公室"}


def test_remove_unit_returns_the_removed_unit() -> None:
    keep, drop = Unit(uuid.uuid4(), "办公室"), Unit(uuid.uuid4(), "预算科")
    after, removed = model.remove_unit(org(units=(keep, drop)), drop.unit_id)
    assert removed == drop
    assert after.units == (keep,)


def test_remove_a_missing_unit_is_not_found() -> None:
    before = org(units=(Unit(uuid.uuid4(), "办公室"),))
    missing = uuid.uuid4()
    rej = rejected(ReasonCode.NOT_FOUND, model.remove_unit, before, missing)
    assert rej.details == {"org_id": str(before.org_id), "unit_id": str(missing)}


@pytest.mark.parametrize("status", INACTIVE, ids=lambda s: s.value)
def test_units_of_an_inactive_org_cannot_change(status: OrgStatus) -> None:
    unit = Unit(uuid.uuid4(), "办公室")
    inactive = org(status=status, units=(unit,))
    rejected(ReasonCode.ORG_NOT_ACTIVE, model.add_unit, inactive, uuid.uuid4(), "预算科")
    rejected(ReasonCode.ORG_NOT_ACTIVE, model.remove_unit, inactive, unit.unit_id)


# --- move ---------------------------------------------------------------------------------


def test_move_places_the_org_under_the_new_parent() -> None:
    old_parent, new_parent = org(), org(name="石家庄市发展和改革委员会")
    child = org(name="长安区财政局", division_code="130102", parent_org_id=old_parent.org_id)
    moved = model.move(child, new_parent, [])
    assert moved.parent_org_id == new_parent.org_id
    assert replace(moved, parent_org_id=child.parent_org_id) == child  # nothing else changes


def test_move_of_a_root_org_under_a_parent() -> None:
    root = org(division_code="130102")
    assert model.move(root, org(), []).parent_org_id is not None


def test_move_under_itself_is_a_conflict() -> None:
    subject = org()
    rejected(ReasonCode.CONFLICT, model.move, subject, subject, [])


def test_move_under_a_descendant_is_a_conflict() -> None:
    top = org()
    middle = org(division_code="130102", parent_org_id=top.org_id)
    bottom = org(division_code="130102", parent_org_id=middle.org_id)
    # bottom's chain upward: middle, top — moving top under bottom would close a cycle
    rej = rejected(ReasonCode.CONFLICT, model.move, top, bottom, [middle.org_id, top.org_id])
    assert rej.details == {"org_id": str(top.org_id), "parent_org_id": str(bottom.org_id)}
    rejected(ReasonCode.CONFLICT, model.move, top, middle, [top.org_id])


def test_move_under_the_same_parent_is_a_conflict() -> None:
    parent = org()
    child = org(division_code="130102", parent_org_id=parent.org_id)
    rej = rejected(ReasonCode.CONFLICT, model.move, child, parent, [])
    assert rej.details == {"parent_org_id": str(parent.org_id)}


def test_move_under_a_parent_whose_division_does_not_contain_the_org_is_a_conflict() -> None:
    child = org(division_code="130102")
    tangshan = org(name="唐山市人民政府", division_code="130200")
    rej = rejected(ReasonCode.CONFLICT, model.move, child, tangshan, [])
    assert rej.details == {"division_code": "130102", "parent_division_code": "130200"}
    district = org(name="长安区人民政府", division_code="130102")
    city = org(division_code="130100")
    rejected(ReasonCode.CONFLICT, model.move, city, district, [])


@pytest.mark.parametrize("status", INACTIVE, ids=lambda s: s.value)
def test_move_of_or_under_an_inactive_org_is_refused(status: OrgStatus) -> None:
    rejected(ReasonCode.ORG_NOT_ACTIVE, model.move, org(status=status), org(), [])
    rejected(
        ReasonCode.ORG_NOT_ACTIVE, model.move, org(division_code="130102"), org(status=status), []
    )


def test_move_beyond_the_maximum_depth_is_a_conflict() -> None:
    chain = [uuid.uuid4() for _ in range(model.MAX_TREE_DEPTH)]
    rej = rejected(ReasonCode.CONFLICT, model.move, org(), org(), chain)
    assert rej.details == {"depth": model.MAX_TREE_DEPTH + 1}
    assert model.move(org(), org(), chain[:-1]).parent_org_id is not None
