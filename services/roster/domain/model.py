"""The rules of the roster that need no database: person states and the early checks."""

from __future__ import annotations

import uuid
from enum import StrEnum

from contracts.codes import Category, OrgStatus, ReasonCode, category_allowed
from contracts.envelope import derived_id_after
from services.roster.adapters.repository import OrgRef
from services.runtime.rules import Rejection


class Status(StrEnum):
    """Where a person stands. Only ``active`` holds a slot that is settled; the ``…ing``
    states hold it while a saga waits for quota."""

    ENROLLING = "enrolling"
    ACTIVE = "active"
    TRANSFERRING = "transferring"
    RELEASING = "releasing"
    RELEASED = "released"
    FAILED = "failed"


# States in which the person holds (or is about to hold) a slot.
HOLDING = frozenset({Status.ENROLLING, Status.ACTIVE, Status.TRANSFERRING, Status.RELEASING})
# States from which a person may be enrolled (again).
ENROLLABLE = frozenset({Status.RELEASED, Status.FAILED})
BUSY = frozenset({Status.ENROLLING, Status.TRANSFERRING, Status.RELEASING})

# Saga step ids are derived from the command id, so a step written twice is one message.
_SAGA_NAMESPACE = uuid.UUID("6d1f3c1e-2b9a-4f57-9a36-0b6f5d1c7e21")


def step_id(command_id: str, step: str) -> str:
    """The id of a saga's step: derived from the command id (the same command, the same
    step, the same id), sorting with it when it is a version 7 id (``derived_id_after``)."""
    return derived_id_after(command_id, _SAGA_NAMESPACE, f"{command_id}/{step}")


def check_org(org: OrgRef | None, category: Category, *, role: str = "org") -> None:
    """Refuse early what the org projection already shows: an org that is no longer active, or a
    category its kind may not hold. An org unknown here is left to quota, which decides."""
    if org is None:
        return
    if org.status is not OrgStatus.ACTIVE:
        raise Rejection(
            ReasonCode.ORG_NOT_ACTIVE,
            f"{role} {org.org_id} is {org.status.value} / 机构已{_STATUS_ZH[org.status]}",
            {"org_id": str(org.org_id), "status": org.status.value},
        )
    if org.kind is not None and not category_allowed(org.kind, category):
        raise Rejection(
            ReasonCode.CATEGORY_NOT_ALLOWED,
            f"a {org.kind.value} may not hold {category.value} establishment"
            " / 该类机构不能使用此类编制",
            {"org_id": str(org.org_id), "kind": org.kind.value, "category": category.value},
        )


_STATUS_ZH = {OrgStatus.ACTIVE: "存续", OrgStatus.MERGED: "合并", OrgStatus.ABOLISHED: "撤销"}


def already_enrolled(person_id: str, org_id: str, status: str) -> Rejection:
    return Rejection(
        ReasonCode.ALREADY_ENROLLED,
        f"this person already holds a slot (person {person_id}) / 该人员已在编",
        {"person_id": person_id, "org_id": org_id, "status": status},
    )


def not_enrolled(person_id: str | None, status: str | None) -> Rejection:
    return Rejection(
        ReasonCode.NOT_ENROLLED,
        "this person holds no slot / 该人员不在编",
        {"person_id": person_id, "status": status},
    )


def busy(person_id: str, status: str) -> Rejection:
    return Rejection(
        ReasonCode.CONFLICT,
        f"a change of this person is in progress ({status}) / 该人员有正在办理的变动",
        {"person_id": person_id, "status": status},
    )
