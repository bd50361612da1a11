"""The notify unit of work: the shared transaction plus subscriptions, deliveries and orgs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Self

from contracts.envelope import new_id, now
from services.notify.adapters.repository import (
    DeliveryRepository,
    OrgDivisions,
    SubscriptionRepository,
)
from services.notify.adapters.secrets import SecretBox
from services.notify.domain.model import Subscription
from services.runtime.uow import UnitOfWork


class Waker:
    """Tells the delivery worker that deliveries were queued (set once the worker exists)."""

    def __init__(self) -> None:
        self.callback: Callable[[], None] | None = None

    def __call__(self) -> None:
        if self.callback is not None:
            self.callback()


class NotifyUnitOfWork(UnitOfWork):
    subscriptions: SubscriptionRepository
    deliveries: DeliveryRepository
    orgs: OrgDivisions
    # Set on the per-runtime subclass made by ``bound_to``: called after a commit that queued,
    # and the key that seals and opens subscription secrets.
    waker: ClassVar[Waker | None] = None
    box: ClassVar[SecretBox | None] = None

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        self.subscriptions = SubscriptionRepository(self.session, self.box)
        self.deliveries = DeliveryRepository(self.session, self.box)
        self.orgs = OrgDivisions(self.session)
        self._active: list[Subscription] | None = None
        return self

    async def active_subscriptions(self) -> list[Subscription]:
        """The active subscriptions as this transaction first read them: what the fan-out of
        each event in it matches against. Only commands change subscriptions, each in a
        transaction of its own, never one that fans out events."""
        if self._active is None:
            self._active = await self.subscriptions.active()
        return self._active

    async def commit(self) -> None:
        queued = self.deliveries.queued
        await super().commit()
        self.deliveries.queued = 0
        if queued and self.waker is not None:
            self.waker()

    def stage_record(
        self, *, topic: str, key: str | None, value: bytes, headers: dict[str, str], **row: Any
    ) -> None:
        """Queue a record that is not an envelope of notify's own (a dead letter) for the
        outbox; written at ``commit()`` with everything else."""
        self._staged.append(
            {
                "message_id": new_id(),
                "topic": topic,
                "key": key,
                "value": value,
                "headers": headers,
                "published_at": None,
                "created_at": now(),
                **row,
            }
        )

    @classmethod
    def bound_to(cls, waker: Waker, box: SecretBox | None = None) -> type[NotifyUnitOfWork]:
        """A unit-of-work class of one runtime, whose commits wake that runtime's worker and
        whose repositories seal and open secrets with ``box`` (settable on the class later)."""
        return type("BoundNotifyUnitOfWork", (cls,), {"waker": waker, "box": box})
