"""The quota unit of work: the shared transaction plus the org projection, the ledger, the
quota-use notices and the slots."""

from __future__ import annotations

from typing import Any, Self

from services.quota.adapters.repository import Ledger, Notices, OrgProjection, Slots
from services.runtime.prepared import Kept
from services.runtime.uow import UnitOfWork


class QuotaUnitOfWork(UnitOfWork):
    orgs: OrgProjection
    ledger: Ledger
    notices: Notices
    slots: Slots

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        self.orgs = OrgProjection(self.session)
        self.ledger = Ledger(self.session)
        self.notices = Notices(self.session)
        self.slots = Slots(self.session)
        return self

    def kept(self) -> tuple[Kept[Any], ...]:
        return (
            self.slots.claims_kept,
            self.slots.added_kept,
            self.notices.used_kept,
            self.ledger.occupied_kept,
        )

    async def _write_deferred(self) -> None:
        # The ledger's history rows of the whole transaction go in as one statement.
        await self.ledger.flush()

    def _forget_deferred(self) -> None:
        self.ledger.discard()
