"""Value types shared by the messages: documents, identifiers and bounded strings."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta, timezone
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from contracts import identifiers
from contracts.codes import ReasonCode


def _citizen_id(value: str) -> str:
    try:
        return identifiers.validate_citizen_id(value)
    except identifiers.IdentifierError as exc:
        raise PydanticCustomError(ReasonCode.INVALID_CITIZEN_ID.value, str(exc)) from None


def _uscc(value: str) -> str:
    try:
        return identifiers.validate_uscc(value)
    except identifiers.IdentifierError as exc:
        raise PydanticCustomError(ReasonCode.INVALID_USCC.value, str(exc)) from None


def _division_code(value: str) -> str:
    try:
        return identifiers.validate_division_code(value)
    except identifiers.IdentifierError as exc:
        raise PydanticCustomError(ReasonCode.UNKNOWN_DIVISION.value, str(exc)) from None


CitizenId = Annotated[str, Field(min_length=15, max_length=18), AfterValidator(_citizen_id)]
"""A citizen ID number (公民身份号码), normalised to 18 characters with an upper-case X."""

USCC = Annotated[str, Field(min_length=18, max_length=18), AfterValidator(_uscc)]
"""A unified social credit code (统一社会信用代码), GB 32100."""

DivisionCode = Annotated[
    str, Field(min_length=6, max_length=6, pattern=r"^\d{6}$"), AfterValidator(_division_code)
]
"""A six-digit GB/T 2260 administrative division code that exists (now or historically)."""

Name = Annotated[str, Field(min_length=1, max_length=200)]
ShortText = Annotated[str, Field(min_length=1, max_length=500)]
NoticeNo = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\w\-〔〕()（）/.]+$")]
Count = Annotated[int, Field(ge=0, le=1_000_000)]
Uuid = uuid.UUID


class Document(BaseModel):
    """The approving document (批准文件): title, number (文号) and date."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    title: Annotated[str, Field(min_length=1, max_length=300)]
    number: Annotated[str, Field(min_length=1, max_length=100)]
    date: date


CHINA_STANDARD_TIME = timezone(timedelta(hours=8), "CST")


def office_today() -> date:
    """The offices' calendar day (China Standard Time), whatever the server's time zone."""
    return datetime.now(CHINA_STANDARD_TIME).date()


def effective_date(explicit: date | None, document: Document | None) -> date:
    """When a change takes effect: as stated, else the approving document's date, else today."""
    if explicit is not None:
        return explicit
    if document is not None:
        return document.date
    return office_today()
