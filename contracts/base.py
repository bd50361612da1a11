"""Base classes of command and event payloads, and the registry from ``type`` to model."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from contracts.envelope import Envelope, new_id, now

_REGISTRY: dict[str, type[Message]] = {}


def type_name(service: str | None, name: str, version: int = 1) -> str:
    """The stable ``type`` string: ``bianzhi.<service>.<Name>.v<N>`` (``bianzhi.<Name>.v<N>``)."""
    middle = f"{service}.{name}" if service else name
    return f"bianzhi.{middle}.v{version}"


class Message(BaseModel):
    """The ``data`` of one message type.

    Subclasses set ``TYPE`` (the stable type string), ``TOPIC`` (where it travels) and
    ``SUBJECT`` (the field whose value is the envelope ``subject`` and the Kafka key).
    """

    TYPE: ClassVar[str] = ""
    TOPIC: ClassVar[str] = ""
    SUBJECT: ClassVar[str] = ""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        declared = cls.__dict__.get("TYPE")
        if declared:
            if declared in _REGISTRY and _REGISTRY[declared] is not cls:
                raise TypeError(f"message type {declared} registered twice")
            _REGISTRY[declared] = cls

    def subject_value(self) -> str | None:
        """The value of the subject field, as a string."""
        if not self.SUBJECT:
            return None
        value = getattr(self, self.SUBJECT)
        return None if value is None else str(value)

    def envelope(
        self,
        *,
        source: str,
        id: str | None = None,
        correlationid: str | None = None,
        causationid: str | None = None,
        actorid: str | None = None,
        actorregion: str | None = None,
        actorroles: str | None = None,
        subject: str | None = None,
    ) -> Envelope:
        """Wrap this payload in a CloudEvents envelope."""
        message_id = id or new_id()
        return Envelope(
            id=message_id,
            source=source,
            type=self.TYPE,
            time=now(),
            subject=subject if subject is not None else self.subject_value(),
            correlationid=correlationid or message_id,
            causationid=causationid,
            actorid=actorid,
            actorregion=actorregion,
            actorroles=actorroles,
            data=self.model_dump(mode="json", exclude_none=True),
        )


class Command(Message):
    """An order to a service. Strict: unknown fields are a schema violation."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Event(Message):
    """A fact that happened. Tolerant: consumers ignore fields they do not know."""

    model_config = ConfigDict(extra="ignore")


def registry() -> dict[str, type[Message]]:
    """Every known message type, after importing all message modules."""
    import contracts.messages  # noqa: F401  (registers every model)

    return dict(_REGISTRY)


def model_for(type_: str) -> type[Message] | None:
    """The model of a ``type`` string, or ``None`` when the type is unknown."""
    return registry().get(type_)
