"""Commands and events of the orgs service (机构): organizations, internal units, functions."""

from __future__ import annotations

from datetime import date
from typing import Annotated, ClassVar

from pydantic import Field, model_validator

from contracts.base import Command, Event, type_name
from contracts.codes import Funding, OrgKind, OrgStatus
from contracts.common import USCC, DivisionCode, Document, Name, ShortText, Uuid
from contracts.topics import ORGS_COMMANDS, ORGS_EVENTS

Functions = Annotated[list[ShortText], Field(max_length=200)]
AltNames = Annotated[list[Name], Field(max_length=20)]
Grade = Annotated[str, Field(min_length=1, max_length=50)]


class OrgCommand(Command):
    TOPIC: ClassVar[str] = ORGS_COMMANDS
    SUBJECT: ClassVar[str] = "org_id"


class OrgEvent(Event):
    TOPIC: ClassVar[str] = ORGS_EVENTS
    SUBJECT: ClassVar[str] = "org_id"


# --- commands -----------------------------------------------------------------------------


class RegisterOrg(OrgCommand):
    """Register a new organization (机构设立)."""

    TYPE: ClassVar[str] = type_name("orgs", "RegisterOrg")

    org_id: Uuid
    name: Name
    kind: OrgKind
    division_code: DivisionCode
    parent_org_id: Uuid | None = None
    uscc: USCC | None = None
    grade: Grade | None = None
    alt_names: AltNames = Field(default_factory=list)
    functions: Functions = Field(default_factory=list)
    funding: Funding | None = None
    document: Document
    effective_date: date | None = None

    @model_validator(mode="after")
    def _parent_differs(self) -> RegisterOrg:
        if self.parent_org_id == self.org_id:
            raise ValueError("parent_org_id must differ from org_id")
        return self


class RenameOrg(OrgCommand):
    """Rename an organization (更名), optionally with its other names (挂牌/简称)."""

    TYPE: ClassVar[str] = type_name("orgs", "RenameOrg")

    org_id: Uuid
    name: Name
    alt_names: AltNames | None = None
    document: Document
    effective_date: date | None = None


class UpdateFunctions(OrgCommand):
    """Replace the functions (职能) of an organization."""

    TYPE: ClassVar[str] = type_name("orgs", "UpdateFunctions")

    org_id: Uuid
    functions: Functions
    document: Document
    effective_date: date | None = None


class AddInternalUnit(OrgCommand):
    """Add an internal unit (内设机构)."""

    TYPE: ClassVar[str] = type_name("orgs", "AddInternalUnit")

    org_id: Uuid
    unit_id: Uuid
    name: Name
    document: Document | None = None
    effective_date: date | None = None


class RemoveInternalUnit(OrgCommand):
    """Remove an internal unit."""

    TYPE: ClassVar[str] = type_name("orgs", "RemoveInternalUnit")

    org_id: Uuid
    unit_id: Uuid
    name: Name | None = None
    document: Document | None = None
    effective_date: date | None = None


class MoveOrg(OrgCommand):
    """Place an organization under another parent (隶属关系调整)."""

    TYPE: ClassVar[str] = type_name("orgs", "MoveOrg")

    org_id: Uuid
    parent_org_id: Uuid
    document: Document
    effective_date: date | None = None

    @model_validator(mode="after")
    def _parent_differs(self) -> MoveOrg:
        if self.parent_org_id == self.org_id:
            raise ValueError("an org cannot be its own parent")
        return self


class MergeOrgs(OrgCommand):
    """Merge source organizations into a target (机构合并): quota and people move to the target."""

    TYPE: ClassVar[str] = type_name("orgs", "MergeOrgs")
    SUBJECT: ClassVar[str] = "target_org_id"

    source_org_ids: Annotated[list[Uuid], Field(min_length=1, max_length=50)]
    target_org_id: Uuid
    document: Document
    effective_date: date | None = None


class AbolishOrg(OrgCommand):
    """Abolish an organization (机构撤销); refused while people or quota remain."""

    TYPE: ClassVar[str] = type_name("orgs", "AbolishOrg")

    org_id: Uuid
    document: Document
    effective_date: date | None = None


# --- events -------------------------------------------------------------------------------


class OrgRegistered(OrgEvent):
    TYPE: ClassVar[str] = type_name("orgs", "OrgRegistered")

    org_id: Uuid
    name: str
    kind: OrgKind
    division_code: str
    parent_org_id: Uuid | None = None
    uscc: str | None = None
    grade: str | None = None
    alt_names: list[str] = Field(default_factory=list)
    functions: list[str] = Field(default_factory=list)
    funding: Funding | None = None
    status: OrgStatus = OrgStatus.ACTIVE
    document: Document
    effective_date: date
    warnings: list[str] = Field(default_factory=list)


class OrgRenamed(OrgEvent):
    TYPE: ClassVar[str] = type_name("orgs", "OrgRenamed")

    org_id: Uuid
    name: str
    previous_name: str
    alt_names: list[str] = Field(default_factory=list)
    document: Document
    effective_date: date


class OrgFunctionsUpdated(OrgEvent):
    TYPE: ClassVar[str] = type_name("orgs", "OrgFunctionsUpdated")

    org_id: Uuid
    functions: list[str]
    document: Document
    effective_date: date


class InternalUnitAdded(OrgEvent):
    TYPE: ClassVar[str] = type_name("orgs", "InternalUnitAdded")

    org_id: Uuid
    unit_id: Uuid
    name: str
    document: Document | None = None
    effective_date: date


class InternalUnitRemoved(OrgEvent):
    TYPE: ClassVar[str] = type_name("orgs", "InternalUnitRemoved")

    org_id: Uuid
    unit_id: Uuid
    name: str
    document: Document | None = None
    effective_date: date


class OrgMoved(OrgEvent):
    TYPE: ClassVar[str] = type_name("orgs", "OrgMoved")

    org_id: Uuid
    parent_org_id: Uuid
    previous_parent_org_id: Uuid | None = None
    division_code: str
    document: Document
    effective_date: date


class OrgsMerged(OrgEvent):
    TYPE: ClassVar[str] = type_name("orgs", "OrgsMerged")
    SUBJECT: ClassVar[str] = "target_org_id"

    source_org_ids: list[Uuid]
    target_org_id: Uuid
    document: Document
    effective_date: date


class OrgAbolished(OrgEvent):
    TYPE: ClassVar[str] = type_name("orgs", "OrgAbolished")

    org_id: Uuid
    document: Document
    effective_date: date
