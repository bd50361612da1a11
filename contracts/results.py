"""The result of every command (WIRE-CONTRACT §3), keyed by the command id."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from contracts.base import Event, type_name
from contracts.codes import ReasonCode
from contracts.topics import COMMAND_RESULTS


class CommandResult(Event):
    TOPIC: ClassVar[str] = COMMAND_RESULTS
    SUBJECT: ClassVar[str] = "command_id"

    command_id: str
    command_type: str


class CommandCompleted(CommandResult):
    """The command took effect; ``events`` are the ids of the events it produced."""

    TYPE: ClassVar[str] = type_name(None, "CommandCompleted")

    subject: str | None = None
    events: list[str] = Field(default_factory=list)


class CommandRejected(CommandResult):
    """The command had no effect, for the stable reason ``code``."""

    TYPE: ClassVar[str] = type_name(None, "CommandRejected")

    code: ReasonCode
    message: str
    details: dict[str, Any] = Field(default_factory=dict)
