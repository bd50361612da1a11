"""The notify unit of work: the shared transaction plus subscriptions, deliveries and orgs."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Self

from services.notify.adapters.repository import (
    DeliveryRepository,
    OrgDivisions,
    SubscriptionRepository,
)
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
    # Set on the per-runtime subclass made by ``bound_to``; called after a commit that queued.
    waker: ClassVar[Waker | None] = None

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        self.subscriptions = SubscriptionRepository(self.session)
        self.deliveries = DeliveryRepository(self.session)
        self.orgs = OrgDivisions(self.session)
        return self

    async def commit(self) -> None:
        queued = self.deliveries.queued
        await super().commit()
        self.deliveries.queued = 0
        if queued and self.waker is not None:
            self.waker()

    @classmethod
    def bound_to(cls, waker: Waker) -> type[NotifyUnitOfWork]:
        """A unit-of-work class of one runtime, whose commits wake that runtime's worker."""
        return type("BoundNotifyUnitOfWork", (cls,), {"waker": waker})
