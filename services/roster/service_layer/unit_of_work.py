"""The roster unit of work: the shared transaction plus people, sagas, the org projection and
the personal-data cipher."""

from __future__ import annotations

from typing import Any, ClassVar, Self

from contracts.envelope import Envelope
from services.roster.adapters.repository import OrgProjection, People, Sagas
from services.roster.domain.personal_data import PersonalDataCipher
from services.runtime.prepared import Kept
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
        self.people = People(self.session, batch_history=True)
        self.sagas = Sagas(self.session)
        self._results: list[tuple[Envelope, Envelope, str | None]] = []
        return self

    async def store_result(self, command: Envelope, result: Envelope, code: str | None) -> None:
        # The results of the sagas a fetch of answers ends are kept (and audited) together
        # at commit, in one statement; nothing reads them back in the same transaction.
        self._results.append((command, result, code))

    def kept(self) -> tuple[Kept[Any], ...]:
        return (self.people.added_kept, self.people.activated_kept, self.sagas.answered_kept)

    async def _write_deferred(self) -> None:
        # What the transaction wrote for later (sagas started, history, results) goes in
        # before the runtime's audit and outbox, a statement per table.
        await self.sagas.flush()
        await self.people.flush()
        if self._results:
            results, self._results = self._results, []
            await self.store_results(results)

    def _forget_deferred(self) -> None:
        self.sagas.discard()
        self.people.discard()
        self._results = []
