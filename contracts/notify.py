"""Commands and events of the notify service: subscriptions of downstream offices and deliveries."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from contracts.base import Command, Event, type_name
from contracts.common import DivisionCode, Name, Uuid
from contracts.topics import NOTIFY_COMMANDS, NOTIFY_EVENTS


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("url must be an absolute http or https URL")
    if parts.username or parts.password:
        raise ValueError("url must not carry credentials; use the secret")
    return value


EventTypePattern = Annotated[
    str, Field(min_length=9, max_length=200, pattern=r"^bianzhi\.[A-Za-z0-9._*-]+$")
]
"""An exact event ``type`` or a pattern with ``*`` wildcards, e.g. ``bianzhi.roster.*``."""

WebhookUrl = Annotated[
    str,
    Field(min_length=10, max_length=2000, pattern=r"^https?://[^\s]+$"),
    AfterValidator(_http_url),
]
EmailAddress = Annotated[
    str, Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
]


class WebhookChannel(BaseModel):
    """Deliver by HTTP POST; each request is signed with ``secret`` (HMAC-SHA256)."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    kind: Literal["webhook"]
    url: WebhookUrl
    secret: Annotated[str, Field(min_length=16, max_length=200, repr=False)]


class EmailChannel(BaseModel):
    """Deliver by e-mail."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    kind: Literal["email"]
    address: EmailAddress


Channel = Annotated[WebhookChannel | EmailChannel, Field(discriminator="kind")]


class SubscriptionChannel(BaseModel):
    """A subscription's channel as published in events: never the webhook secret.

    A plain model rather than a closed union, so consumers tolerate channel kinds added later.
    """

    model_config = ConfigDict(extra="ignore")

    kind: str
    url: str | None = None
    address: str | None = None

    @classmethod
    def of(cls, channel: WebhookChannel | EmailChannel) -> SubscriptionChannel:
        """The publishable form of ``channel``: everything but the secret."""
        if isinstance(channel, WebhookChannel):
            return cls(kind=channel.kind, url=channel.url)
        return cls(kind=channel.kind, address=channel.address)


class NotifyCommand(Command):
    TOPIC: ClassVar[str] = NOTIFY_COMMANDS
    SUBJECT: ClassVar[str] = "subscription_id"


class NotifyEvent(Event):
    TOPIC: ClassVar[str] = NOTIFY_EVENTS
    SUBJECT: ClassVar[str] = "subscription_id"


# --- commands -----------------------------------------------------------------------------


class Subscribe(NotifyCommand):
    """Subscribe to the events of ``event_types`` concerning ``division_code`` and below."""

    TYPE: ClassVar[str] = type_name("notify", "Subscribe")

    subscription_id: Uuid
    subscriber: Name
    event_types: Annotated[list[EventTypePattern], Field(min_length=1, max_length=100)]
    division_code: DivisionCode
    channel: Channel


class Unsubscribe(NotifyCommand):
    """Remove a subscription; deliveries stop."""

    TYPE: ClassVar[str] = type_name("notify", "Unsubscribe")

    subscription_id: Uuid


class ResendDelivery(NotifyCommand):
    """Deliver one settled (failed or delivered) delivery again, from its first attempt."""

    TYPE: ClassVar[str] = type_name("notify", "ResendDelivery")
    SUBJECT: ClassVar[str] = "delivery_id"

    delivery_id: Uuid


# --- events -------------------------------------------------------------------------------


class SubscriptionCreated(NotifyEvent):
    TYPE: ClassVar[str] = type_name("notify", "SubscriptionCreated")

    subscription_id: Uuid
    subscriber: str
    event_types: list[str]
    division_code: str
    channel: SubscriptionChannel


class SubscriptionRemoved(NotifyEvent):
    TYPE: ClassVar[str] = type_name("notify", "SubscriptionRemoved")

    subscription_id: Uuid
    subscriber: str | None = None


class DeliveryResent(NotifyEvent):
    """An operator asked for a settled delivery to be made again."""

    TYPE: ClassVar[str] = type_name("notify", "DeliveryResent")

    subscription_id: Uuid
    delivery_id: Uuid
    event_id: str
    event_type: str
    previous_status: str
    previous_attempts: int
    resends: int


class NotificationDelivered(NotifyEvent):
    TYPE: ClassVar[str] = type_name("notify", "NotificationDelivered")

    subscription_id: Uuid
    event_id: str
    event_type: str
    attempts: int
    delivery_id: Uuid | None = None
    channel: str | None = None


class NotificationFailed(NotifyEvent):
    """Delivery of one event gave up after ``attempts`` tries."""

    TYPE: ClassVar[str] = type_name("notify", "NotificationFailed")

    subscription_id: Uuid
    event_id: str
    event_type: str
    attempts: int
    error: str
    delivery_id: Uuid | None = None
    channel: str | None = None
    # The last answer: an HTTP status (webhook) or an SMTP reply code (e-mail), if any.
    status_code: int | None = None
