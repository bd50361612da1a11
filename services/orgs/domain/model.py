"""Organizations (机构) and the rules that govern them. Pure: no I/O, no framework."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date
from uuid import UUID

from contracts import identifiers
from contracts.codes import Funding, OrgKind, OrgStatus, ReasonCode
from services.runtime.rules import Rejection

MAX_TREE_DEPTH = 64


@dataclass(frozen=True)
class Unit:
    """An internal unit (内设机构)."""

    unit_id: UUID
    name: str


@dataclass(frozen=True)
class Org:
    org_id: UUID
    name: str
    kind: OrgKind
    division_code: str
    parent_org_id: UUID | None = None
    uscc: str | None = None
    grade: str | None = None
    alt_names: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    funding: Funding | None = None
    status: OrgStatus = OrgStatus.ACTIVE
    units: tuple[Unit, ...] = field(default_factory=tuple)
    effective_date: date | None = None

    def unit(self, unit_id: UUID) -> Unit | None:
        return next((u for u in self.units if u.unit_id == unit_id), None)


def require_active(org: Org, *, role: str = "org") -> None:
    if org.status is not OrgStatus.ACTIVE:
        raise Rejection(
            ReasonCode.ORG_NOT_ACTIVE,
            f"{role} {org.org_id} is {org.status.value} / 机构已{_status_zh(org.status)}",
            {"org_id": str(org.org_id), "status": org.status.value},
        )


def _status_zh(status: OrgStatus) -> str:
    return {OrgStatus.MERGED: "合并", OrgStatus.ABOLISHED: "撤销"}.get(status, "停用")


def check_parent(parent: Org, division_code: str) -> None:
    """A parent must be active and its division must contain the child's."""
    require_active(parent, role="parent org")
    if not identifiers.is_within(division_code, parent.division_code):
        raise Rejection(
            ReasonCode.CONFLICT,
            f"division {division_code} lies outside the parent's division "
            f"{parent.division_code} / 机构所在区划不在上级机构区划范围内",
            {"division_code": division_code, "parent_division_code": parent.division_code},
        )


def register(
    *,
    org_id: UUID,
    name: str,
    kind: OrgKind,
    division_code: str,
    parent: Org | None,
    uscc: str | None,
    grade: str | None,
    alt_names: list[str],
    functions: list[str],
    funding: Funding | None,
    effective_date: date,
) -> tuple[Org, list[str]]:
    """A new active org, and warnings worth recording (they do not refuse the command)."""
    if parent is not None:
        check_parent(parent, division_code)
    if funding is not None and kind is not OrgKind.PUBLIC_INSTITUTION:
        raise Rejection(
            ReasonCode.INVALID_MESSAGE,
            f"funding applies to public institutions only, not to kind {kind.value} / "
            "经费形式仅适用于事业单位",
            {"field": "funding", "kind": kind.value},
        )
    warnings: list[str] = []
    if uscc is not None and (warning := identifiers.uscc_kind_warning(uscc, kind.value)):
        warnings.append(warning)
    org = Org(
        org_id=org_id,
        name=name,
        kind=kind,
        division_code=division_code,
        parent_org_id=parent.org_id if parent else None,
        uscc=uscc,
        grade=grade,
        alt_names=_dedupe(alt_names, exclude=name),
        functions=_dedupe(functions),
        funding=funding,
        effective_date=effective_date,
    )
    return org, warnings


def rename(org: Org, name: str, alt_names: list[str] | None) -> Org:
    require_active(org)
    new_alt = org.alt_names if alt_names is None else _dedupe(alt_names, exclude=name)
    if name == org.name and new_alt == org.alt_names:
        raise Rejection(
            ReasonCode.CONFLICT,
            "the org already has this name / 名称未变化",
            {"name": name},
        )
    return replace(org, name=name, alt_names=new_alt)


def update_functions(org: Org, functions: list[str]) -> Org:
    require_active(org)
    return replace(org, functions=_dedupe(functions))


def add_unit(org: Org, unit_id: UUID, name: str) -> Org:
    require_active(org)
    if org.unit(unit_id) is not None:
        raise Rejection(
            ReasonCode.CONFLICT,
            f"unit {unit_id} already exists / 内设机构已存在",
            {"unit_id": str(unit_id)},
        )
    if any(u.name == name for u in org.units):
        raise Rejection(
            ReasonCode.CONFLICT,
            f"the org already has a unit named {name!r} / 内设机构名称重复",
            {"name": name},
        )
    return replace(org, units=(*org.units, Unit(unit_id=unit_id, name=name)))


def remove_unit(org: Org, unit_id: UUID) -> tuple[Org, Unit]:
    require_active(org)
    unit = org.unit(unit_id)
    if unit is None:
        raise Rejection(
            ReasonCode.NOT_FOUND,
            f"org {org.org_id} has no unit {unit_id} / 内设机构不存在",
            {"org_id": str(org.org_id), "unit_id": str(unit_id)},
        )
    return replace(org, units=tuple(u for u in org.units if u.unit_id != unit_id)), unit


def move(org: Org, new_parent: Org, ancestors_of_parent: list[UUID]) -> Org:
    """Place ``org`` under ``new_parent``; ``ancestors_of_parent`` is the parent's chain upward."""
    require_active(org)
    if new_parent.org_id == org.org_id or org.org_id in ancestors_of_parent:
        raise Rejection(
            ReasonCode.CONFLICT,
            "the move would make the org its own ancestor / 隶属关系不能形成循环",
            {"org_id": str(org.org_id), "parent_org_id": str(new_parent.org_id)},
        )
    if len(ancestors_of_parent) >= MAX_TREE_DEPTH:
        raise Rejection(
            ReasonCode.CONFLICT,
            f"the org tree may be at most {MAX_TREE_DEPTH} levels deep / 隶属层级过深",
            {"depth": len(ancestors_of_parent) + 1},
        )
    if new_parent.org_id == org.parent_org_id:
        raise Rejection(
            ReasonCode.CONFLICT,
            "the org already lies under this parent / 隶属关系未变化",
            {"parent_org_id": str(new_parent.org_id)},
        )
    check_parent(new_parent, org.division_code)
    return replace(org, parent_org_id=new_parent.org_id)


def _dedupe(values: list[str], *, exclude: str | None = None) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for value in values:
        if value != exclude:
            seen.setdefault(value, None)
    return tuple(seen)
