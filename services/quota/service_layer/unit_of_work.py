"""The quota unit of work: the shared transaction plus the org projection and the ledger."""

from __future__ import annotations

from typing import Self

from services.quota.adapters.repository import Ledger, OrgProjection
from services.runtime.uow import UnitOfWork


class QuotaUnitOfWork(UnitOfWork):
    orgs: OrgProjection
    ledger: Ledger

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        self.orgs = OrgProjection(self.session)
        self.ledger = Ledger(self.session)
        return self
