"""The one exception a domain rule raises: pure, so domain code may import it."""

from __future__ import annotations

from typing import Any

from contracts.codes import ReasonCode


class Rejection(Exception):
    """A command that breaks a rule: it becomes ``CommandRejected`` with a stable code."""

    def __init__(
        self, code: ReasonCode, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


class TransientError(Exception):
    """A failure that passes by itself (a concurrent change, a lock): the message is retried."""
