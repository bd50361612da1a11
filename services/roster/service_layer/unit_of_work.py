"""The roster unit of work: the shared transaction plus people, sagas, the org projection and
the personal-data cipher."""

from __future__ import annotations

from typing import ClassVar, Self

from services.roster.adapters.repository import OrgProjection, People, Sagas
from services.roster.domain.personal_data import PersonalDataCipher
from services.runtime.uow import UnitOfWork


class RosterUnitOfWork(UnitOfWork):
    # Set by the composition root (``services.roster.bootstrap``) for the running service.
    cipher: ClassVar[PersonalDataCipher | None] = None
    saga_timeout_s: ClassVar[float] = 60.0
    saga_sweep_interval_s: ClassVar[float] = 2.0

    orgs: OrgProjection
    people: People
    sagas: Sagas

    @property
    def personal_data(self) -> PersonalDataCipher:
        if self.cipher is None:
            raise RuntimeError("the roster's personal-data cipher is not configured")
        return self.cipher

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        self.orgs = OrgProjection(self.session)
        self.people = People(self.session)
        self.sagas = Sagas(self.session)
        return self
