"""Commands and events of the roster service (实名制): people and the slot each one holds.

Commands are keyed by the person's ``citizen_id``. Events are keyed by ``person_id`` and carry only
the masked citizen ID (``citizen_id_masked``), never the full number, the birth date or the phone.

The one exception is the restricted events topic (``bianzhi.roster.events.restricted.v1``), read
only by consumers authorised for personal data (finance payroll): every ``Person*`` event is
accompanied there by its restricted counterpart (``Person*Restricted``), the same facts plus the
full ``citizen_id`` and the ``event_id`` of the public event.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from contracts import identifiers
from contracts.base import Command, Event, type_name
from contracts.codes import Category, EntryMethod, LeaderPost, ReleaseReason
from contracts.common import CitizenId, Document, Name, NoticeNo, ShortText, Uuid
from contracts.topics import ROSTER_COMMANDS, ROSTER_EVENTS, ROSTER_EVENTS_RESTRICTED

Sex = Literal["male", "female"]
Position = Annotated[str, Field(min_length=1, max_length=100)]
"""The post held (职务/岗位)."""
Ethnicity = Annotated[str, Field(min_length=1, max_length=50)]
"""民族, e.g. 汉族."""
Education = Annotated[str, Field(min_length=1, max_length=50)]
"""Highest education (学历), e.g. 大学本科."""
PoliticalStatus = Annotated[str, Field(min_length=1, max_length=50)]
"""政治面貌, e.g. 中共党员."""
Phone = Annotated[str, Field(min_length=5, max_length=20, pattern=r"^\+?[0-9][0-9 \-]{3,18}[0-9]$")]


class RosterCommand(Command):
    TOPIC: ClassVar[str] = ROSTER_COMMANDS
    SUBJECT: ClassVar[str] = "citizen_id"


class RosterEvent(Event):
    TOPIC: ClassVar[str] = ROSTER_EVENTS
    SUBJECT: ClassVar[str] = "person_id"


# --- commands -----------------------------------------------------------------------------


class EnrolPerson(RosterCommand):
    """Enrol a person into a slot of an org (入编), on a quota-use notice of that org and category.

    ``person_id`` may be chosen by the sender; when absent the roster service assigns one.
    ``sex`` and ``birth_date``, when given, must agree with the citizen ID.
    """

    TYPE: ClassVar[str] = type_name("roster", "EnrolPerson")

    citizen_id: CitizenId
    person_id: Uuid | None = None
    name: Name
    org_id: Uuid
    category: Category
    notice_no: NoticeNo
    position: Position | None = None
    leader_post: LeaderPost | None = None
    unit_id: Uuid | None = None
    entry_method: EntryMethod
    effective_date: date
    document: Document | None = None
    sex: Sex | None = None
    birth_date: date | None = None
    ethnicity: Ethnicity | None = None
    education: Education | None = None
    political_status: PoliticalStatus | None = None
    phone: Phone | None = None

    @model_validator(mode="after")
    def _agrees_with_citizen_id(self) -> EnrolPerson:
        # ``citizen_id`` was validated (and normalised) by its field already.
        birth_date = identifiers.birth_date_of_valid(self.citizen_id)
        if self.birth_date is not None and self.birth_date != birth_date:
            raise ValueError("birth_date does not match the citizen ID")
        if self.sex is not None and self.sex != identifiers.sex_of_valid(self.citizen_id):
            raise ValueError("sex does not match the citizen ID")
        return self


class TransferPerson(RosterCommand):
    """Transfer an enrolled person to a slot of another org (调动), on a notice of that org."""

    TYPE: ClassVar[str] = type_name("roster", "TransferPerson")

    citizen_id: CitizenId
    to_org_id: Uuid
    category: Category
    notice_no: NoticeNo
    effective_date: date
    document: Document
    position: Position | None = None
    leader_post: LeaderPost | None = None
    unit_id: Uuid | None = None


class ReleasePerson(RosterCommand):
    """Release a person from the establishment (出编); the slot becomes vacant."""

    TYPE: ClassVar[str] = type_name("roster", "ReleasePerson")

    citizen_id: CitizenId
    reason: ReleaseReason
    effective_date: date
    document: Document | None = None
    note: ShortText | None = None


_EDITABLE = ("position", "unit_id", "education", "ethnicity", "political_status", "phone")


class UpdatePerson(RosterCommand):
    """Change a person's editable details. Name, birth date and slot are not editable here.

    At least one field must be given; an absent or null field is left unchanged.
    """

    TYPE: ClassVar[str] = type_name("roster", "UpdatePerson")

    citizen_id: CitizenId
    position: Position | None = None
    unit_id: Uuid | None = None
    education: Education | None = None
    ethnicity: Ethnicity | None = None
    political_status: PoliticalStatus | None = None
    phone: Phone | None = None
    effective_date: date | None = None

    @model_validator(mode="after")
    def _changes_something(self) -> UpdatePerson:
        if all(getattr(self, name) is None for name in _EDITABLE):
            raise ValueError(f"at least one of {', '.join(_EDITABLE)} is required")
        return self


# --- events -------------------------------------------------------------------------------


class PersonEnrolled(RosterEvent):
    TYPE: ClassVar[str] = type_name("roster", "PersonEnrolled")

    person_id: Uuid
    citizen_id_masked: str
    name: str
    org_id: Uuid
    category: Category
    notice_no: str
    position: str | None = None
    leader_post: LeaderPost | None = None
    unit_id: Uuid | None = None
    entry_method: EntryMethod
    effective_date: date
    document: Document | None = None
    sex: Sex | None = None
    ethnicity: str | None = None
    education: str | None = None
    political_status: str | None = None


class PersonTransferred(RosterEvent):
    TYPE: ClassVar[str] = type_name("roster", "PersonTransferred")

    person_id: Uuid
    citizen_id_masked: str
    from_org_id: Uuid
    to_org_id: Uuid
    from_category: Category | None = None
    category: Category
    notice_no: str
    position: str | None = None
    leader_post: LeaderPost | None = None
    unit_id: Uuid | None = None
    effective_date: date
    document: Document
    by_merge: bool = False
    """Set when the person moved because their org was merged into ``to_org_id`` (机构合并);
    no notice was used then, and ``notice_no`` is the merge document's number."""


class PersonReleased(RosterEvent):
    TYPE: ClassVar[str] = type_name("roster", "PersonReleased")

    person_id: Uuid
    citizen_id_masked: str
    org_id: Uuid
    category: Category
    reason: ReleaseReason
    effective_date: date
    document: Document | None = None


class PersonUpdated(RosterEvent):
    """``changed`` names every field that changed; the phone number itself is not published."""

    TYPE: ClassVar[str] = type_name("roster", "PersonUpdated")

    person_id: Uuid
    citizen_id_masked: str
    org_id: Uuid
    changed: list[str]
    position: str | None = None
    unit_id: Uuid | None = None
    education: str | None = None
    ethnicity: str | None = None
    political_status: str | None = None
    effective_date: date


# --- restricted events (bianzhi.roster.events.restricted.v1) ------------------------------


class RestrictedPersonEvent(RosterEvent):
    """What a restricted counterpart adds to its public ``Person*`` event.

    Each one travels on the restricted topic, keyed by ``person_id`` like the public event, so
    one person's restricted events arrive in order; a consumer needs no other topic. It is
    written in the same transaction as the public event: one for one, never one without the
    other.
    """

    TOPIC: ClassVar[str] = ROSTER_EVENTS_RESTRICTED

    citizen_id: CitizenId
    """The full citizen ID number (18 characters)."""
    event_id: Uuid
    """The id of the public event on ``bianzhi.roster.events.v1`` this one accompanies."""


class PersonEnrolledRestricted(RestrictedPersonEvent, PersonEnrolled):
    """``PersonEnrolled`` with the full citizen ID, on the restricted topic only."""

    TYPE: ClassVar[str] = type_name("roster", "PersonEnrolledRestricted")


class PersonTransferredRestricted(RestrictedPersonEvent, PersonTransferred):
    """``PersonTransferred`` with the full citizen ID, on the restricted topic only."""

    TYPE: ClassVar[str] = type_name("roster", "PersonTransferredRestricted")


class PersonReleasedRestricted(RestrictedPersonEvent, PersonReleased):
    """``PersonReleased`` with the full citizen ID, on the restricted topic only."""

    TYPE: ClassVar[str] = type_name("roster", "PersonReleasedRestricted")


class PersonUpdatedRestricted(RestrictedPersonEvent, PersonUpdated):
    """``PersonUpdated`` with the full citizen ID, on the restricted topic only."""

    TYPE: ClassVar[str] = type_name("roster", "PersonUpdatedRestricted")
