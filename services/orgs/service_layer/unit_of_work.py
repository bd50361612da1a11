"""The orgs unit of work: the shared transaction plus the org repository."""

from __future__ import annotations

from typing import ClassVar, Self

from services.orgs.adapters.repository import OrgRepository
from services.orgs.adapters.sagas import OrgSagas
from services.runtime.uow import UnitOfWork


class OrgsUnitOfWork(UnitOfWork):
    orgs: OrgRepository
    sagas: OrgSagas
    # A running service takes these from OrgsSettings (services/orgs/bootstrap.py).
    saga_step_resend_after_s: ClassVar[float] = 60.0
    saga_sweep_interval_s: ClassVar[float] = 10.0

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        self.orgs = OrgRepository(self.session)
        self.sagas = OrgSagas(self.session)
        return self

    async def commit(self) -> None:
        await self.orgs.flush()
        await super().commit()

    async def rollback(self) -> None:
        self.orgs.discard()
        await super().rollback()
