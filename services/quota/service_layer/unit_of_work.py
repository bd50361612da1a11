"""The quota unit of work: the shared transaction plus the org projection, the ledger, the
quota-use notices and the slots."""

from __future__ import annotations

from typing import Any, Self

from services.quota.adapters.repository import Kept, Ledger, Notices, OrgProjection, Slots
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

    def _kept(self) -> tuple[Kept[Any], ...]:
        """The outcomes a batch ``prepare`` keeps for the handlers of a fetch."""
        return (
            self.slots.claims_kept,
            self.slots.added_kept,
            self.notices.used_kept,
            self.ledger.occupied_kept,
        )

    async def _write_deferred(self) -> None:
        # Whatever a prepare did, a handler asked for: else the fetch would commit a change
        # no command made (it is rolled back and handled one by one instead).
        if left := [key for kept in self._kept() for key in kept.left()]:
            raise RuntimeError(f"prepared for the handlers but never asked for: {left}")
        # The ledger's history rows of the whole transaction go in as one statement.
        await self.ledger.flush()

    def _forget_deferred(self) -> None:
        self.ledger.discard()
        for kept in self._kept():
            kept.clear()
