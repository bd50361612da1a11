"""Data access of the roster service. Every state change is a conditional statement: the
database, not a read in Python, decides whether a person may change state.

The statements of the enrolment path are built once (``bindparam``) and run with their values,
so SQLAlchemy neither builds nor compiles them again; a state change that needs the row after
it returns it (``UPDATE … RETURNING``) instead of reading it first. Rows nobody reads in the same
transaction (a person's history, a new saga) are written together when the unit of work
commits (``flush``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import ColumnElement, Update, bindparam, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.codes import OrgKind, OrgStatus
from contracts.envelope import Envelope, now
from services.roster.adapters.orm import org_projection, people, person_history, sagas
from services.runtime.db import (
    ignoring_duplicates,
    insert_rows,
    row_looked_up,
)
from services.runtime.prepared import Kept

_ORG = select(org_projection).where(org_projection.c.org_id == bindparam("org_id"))
_BY_INDEX = select(people).where(people.c.citizen_index == bindparam("citizen_index"))
_PERSON = select(people).where(people.c.person_id == bindparam("person_id"))


def _activating(*which: ColumnElement[bool]) -> Update:
    """People enrolling under their saga become active from ``on`` (the rows after)."""
    return (
        update(people)
        .where(*which, people.c.status == "enrolling")
        .values(
            status="active",
            enrolled_on=bindparam("on"),
            updated_at=bindparam("at"),
            version=people.c.version + 1,
        )
        .returning(*people.c)
    )


# An enrolment's answer: the person enrolling under this saga becomes active.
_ACTIVATE = _activating(
    people.c.person_id == bindparam("b_person_id"), people.c.saga_id == bindparam("only_saga")
)
# The same for the enrolments of one fetch that take effect on one date (a person drives only
# their own sagas, so the two lists pair up).
_ACTIVATE_MANY = _activating(
    people.c.person_id.in_(bindparam("person_ids", expanding=True)),
    people.c.saga_id.in_(bindparam("saga_ids", expanding=True)),
)
# A new person goes in with the org they are enrolled in as the org projection has it (all
# ``None`` when the projection has no such org): the enrolment's checks need the org, and a
# read of its own would be a statement more.
_WITH_ORG = (
    people.c.person_id,
    *row_looked_up(
        org_projection,
        ("status", "kind", "division_code", "name"),
        key="org_id",
        of=people,
        prefix="org_",
    ),
)
# The same for the new people of one fetch: the blind index tells which row is whose.
_ADDED_WITH_ORG = (people.c.citizen_index, *_WITH_ORG)
_HISTORY = insert(person_history)
_SAGA = insert(sagas)


# A saga's status tested where the step ids find the sagas. Given ``status = 'waiting'``,
# SQLite (no statistics) takes ix_sagas_due's status for the better way in and walks every
# waiting saga for each fetch of answers (measured: 6.8 against 0.9 ms for 100 answers with
# 10,000 sagas waiting); ``status || ''`` is the same test, one no index answers, so the
# unique index of the step ids is used. PostgreSQL plans it the same either way.
_WAITING = sagas.c.status.concat("") == "waiting"


def _answering(which: ColumnElement[bool]) -> Update:
    """Sagas still waiting for their step end as ``ended`` (the rows after)."""
    return (
        update(sagas)
        .where(which, _WAITING)
        .values(status=bindparam("ended"), finished_at=bindparam("at"))
        .returning(*sagas.c)
    )


# Quota's answer to a step ends a saga still waiting for it; a late answer, or the answer to a
# compensation, finds none.
_ANSWERED = _answering(sagas.c.step_request_id == bindparam("request_id"))
# The same for the answers of one fetch, in one statement.
_ANSWERED_MANY = _answering(sagas.c.step_request_id.in_(bindparam("request_ids", expanding=True)))
_BY_REQUEST = select(sagas).where(
    (sagas.c.step_request_id == bindparam("request_id"))
    | (sagas.c.compensation_request_id == bindparam("request_id"))
)


@dataclass(frozen=True)
class OrgRef:
    org_id: UUID
    status: OrgStatus
    kind: OrgKind | None
    division_code: str | None
    name: str | None


class OrgProjection:
    """Orgs as the orgs events describe them."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        # Orgs read in this transaction (a fetch of commands names the same orgs again and
        # again); forgotten when this transaction changes them.
        self._seen: dict[str, OrgRef | None] = {}

    async def get(self, org_id: UUID) -> OrgRef | None:
        key = str(org_id)
        if key in self._seen:
            return self._seen[key]
        row = (await self.session.execute(_ORG, {"org_id": key})).one_or_none()
        ref = (
            None
            if row is None
            else _org_ref(row.org_id, row.status, row.kind, row.division_code, row.name)
        )
        self._seen[key] = ref
        return ref

    def seen_with(self, org_id: UUID, row: Row[Any]) -> OrgRef | None:
        """The org as read by the statement of ``row`` (``People.add``'s), kept like one ``get``
        read: its ``org_…`` columns, all ``None`` when the projection has no such org."""
        ref = (
            None
            if row.org_status is None
            else _org_ref(org_id, row.org_status, row.org_kind, row.org_division_code, row.org_name)
        )
        self._seen[str(org_id)] = ref
        return ref

    async def upsert(self, org_id: UUID, **values: Any) -> None:
        """Change the known fields of an org; an org not seen yet gets a row (a merge or an
        abolition may be read before the registration)."""
        self._seen.pop(str(org_id), None)
        values["updated_at"] = now()
        done = await self.session.execute(
            update(org_projection).where(org_projection.c.org_id == str(org_id)).values(**values)
        )
        if done.rowcount == 0:  # type: ignore[attr-defined]
            values.setdefault("status", OrgStatus.ACTIVE.value)
            await insert_rows(
                self.session,
                ignoring_duplicates(self.session, org_projection),
                [{"org_id": str(org_id), **values}],
            )

    async def set_status(self, org_ids: Iterable[UUID], status: OrgStatus) -> None:
        for org_id in org_ids:
            await self.upsert(org_id, status=status.value)


def _org_ref(
    org_id: UUID | str, status: str, kind: str | None, division_code: str | None, name: str | None
) -> OrgRef:
    return OrgRef(
        org_id=org_id if isinstance(org_id, UUID) else UUID(org_id),
        status=OrgStatus(status),
        kind=OrgKind(kind) if kind else None,
        division_code=division_code,
        name=name,
    )


class People:
    """The people on the roster.

    With ``batch_history`` the history rows ``record`` is given are written by ``flush`` (the
    roster's unit of work flushes at commit), all in one statement."""

    def __init__(self, session: AsyncSession, *, batch_history: bool = False) -> None:
        self.session = session
        self._history: list[dict[str, Any]] | None = [] if batch_history else None
        # What ``activate_many`` did, by (person, saga), for ``activate`` to hand out.
        self.activated_kept: Kept[Row[Any] | None] = Kept()
        # What ``add_many`` did, by blind index: the person id given and the row inserted.
        self.added_kept: Kept[tuple[str, Row[Any] | None]] = Kept()

    async def by_index(self, citizen_index: str) -> Row[Any] | None:
        return (
            await self.session.execute(_BY_INDEX, {"citizen_index": citizen_index})
        ).one_or_none()

    async def get(self, person_id: UUID | str) -> Row[Any] | None:
        return (await self.session.execute(_PERSON, {"person_id": str(person_id)})).one_or_none()

    async def add(self, values: dict[str, Any]) -> Row[Any] | None:
        """A new person; ``None`` when the blind index or person id is taken already. The row
        returned holds the ``person_id`` and the org the person names as the org projection
        has it (``org_status``, ``org_kind``, ``org_division_code``, ``org_name``; all
        ``None`` when unknown there): ``OrgProjection.seen_with`` reads it."""
        stamp = now()
        row = {**values, "created_at": stamp, "updated_at": stamp, "version": 1}
        stmt = ignoring_duplicates(self.session, people, returning=_WITH_ORG)
        return (await self.session.execute(stmt, row)).one_or_none()

    async def add_many(self, rows: Iterable[dict[str, Any]]) -> None:
        """``add`` for the new people of one fetch (each blind index once) in one statement;
        what each insert did is kept for ``added`` to hand out."""
        stamp = now()
        values = [{**row, "created_at": stamp, "updated_at": stamp, "version": 1} for row in rows]
        stmt = ignoring_duplicates(self.session, people, returning=_ADDED_WITH_ORG)
        # RETURNING gives no order to rely on: the rows are matched by blind index.
        inserted = {row.citizen_index: row for row in await insert_rows(self.session, stmt, values)}
        for row in values:
            index = row["citizen_index"]
            self.added_kept.keep(index, index, [(row["person_id"], inserted.get(index))])

    def added(self, citizen_index: str) -> tuple[str, Row[Any] | None] | None:
        """What ``add_many`` did for this blind index: the person id it gave and the row as
        ``add`` returns it (``None`` when the index or person id was taken); ``None`` when it
        was not given this index."""
        if citizen_index not in self.added_kept:
            return None
        return self.added_kept.take(citizen_index, citizen_index)

    async def activate(self, person_id: str, saga_id: str, on: date) -> Row[Any] | None:
        """The person enrolling under ``saga_id`` becomes active from ``on``; their row after
        the change, or ``None`` when they were not in that state. Done already, with its
        outcome kept, when ``activate_many`` was given it."""
        key = (person_id, saga_id)
        if key in self.activated_kept:
            return self.activated_kept.take(key, on)
        done = await self.session.execute(
            _ACTIVATE, {"b_person_id": person_id, "only_saga": saga_id, "on": on, "at": now()}
        )
        return done.one_or_none()

    async def activate_many(self, enrolments: Iterable[tuple[str, str, date]]) -> None:
        """``activate`` for many (person, saga, date) at once: a statement per date. Each
        outcome is kept for the ``activate`` call that asks for it."""
        by_date: dict[date, dict[str, str]] = {}
        for person_id, saga_id, on in enrolments:
            by_date.setdefault(on, {})[person_id] = saga_id
        for on, sagas_of in by_date.items():
            done = await self.session.execute(
                _ACTIVATE_MANY,
                {
                    "person_ids": list(sagas_of),
                    "saga_ids": list(sagas_of.values()),
                    "on": on,
                    "at": now(),
                },
            )
            rows = {row.person_id: row for row in done}
            for person_id, saga_id in sagas_of.items():
                row = rows.pop(person_id, None)
                if row is not None and row.saga_id != saga_id:
                    # A person drives only their own sagas, so the two lists pair up; should
                    # they ever not, the fetch is rolled back and applied one by one.
                    raise RuntimeError(f"person {person_id} activated under another saga")
                self.activated_kept.keep((person_id, saga_id), on, [row])
            if rows:
                raise RuntimeError(f"people activated that were not asked for: {sorted(rows)}")

    async def transition(
        self,
        person_id: UUID | str,
        from_status: Iterable[str],
        *,
        only_saga: str | None = None,
        **values: Any,
    ) -> bool:
        """Move a person from one of ``from_status`` (and, when given, only while the saga
        ``only_saga`` drives them) to the given values; ``False`` when the person was not in
        such a state."""
        stmt = update(people).where(
            people.c.person_id == str(person_id), people.c.status.in_(list(from_status))
        )
        if only_saga is not None:
            stmt = stmt.where(people.c.saga_id == only_saga)
        done = await self.session.execute(
            stmt.values(**values, updated_at=now(), version=people.c.version + 1)
        )
        return bool(done.rowcount)  # type: ignore[attr-defined]

    async def move_org(self, from_org_ids: Iterable[UUID], to_org_id: UUID) -> list[Row[Any]]:
        """Move everyone holding (or about to hold) a slot of these orgs to ``to_org_id``; the
        people as they were before the move."""
        ids = [str(o) for o in from_org_ids]
        holding = ("enrolling", "active", "transferring", "releasing")
        before = list(
            (
                await self.session.execute(
                    select(people)
                    .where(people.c.org_id.in_(ids), people.c.status.in_(holding))
                    .order_by(people.c.person_id)
                )
            ).all()
        )
        if before:
            await self.session.execute(
                update(people)
                .where(people.c.org_id.in_(ids), people.c.status.in_(holding))
                .values(org_id=str(to_org_id), updated_at=now(), version=people.c.version + 1)
            )
        return before

    async def record(
        self,
        event: Envelope,
        *,
        person_id: UUID | str,
        org_id: UUID | str,
        category: str | None,
        effective_date: date | None,
        document: dict[str, Any] | None,
        details: dict[str, Any],
        command: Envelope | None,
    ) -> None:
        row = {
            "person_id": str(person_id),
            "event_id": event.id,
            "event_type": event.type,
            "org_id": str(org_id),
            "category": category,
            "effective_date": effective_date,
            "document": document,
            "details": details,
            "command_id": command.id if command else None,
            "actor_id": command.actorid if command else event.actorid,
            "recorded_at": now(),
        }
        if self._history is None:
            await self.session.execute(_HISTORY, row)
        else:
            self._history.append(row)

    async def flush(self) -> None:
        """Write the history rows recorded since the last flush."""
        if self._history:
            rows, self._history = self._history, []
            await insert_rows(self.session, _HISTORY, rows)

    def discard(self) -> None:
        """Forget the history rows not written yet (the transaction was rolled back)."""
        if self._history:
            self._history = []


class Sagas:
    """The sagas of the roster: one per enrol, transfer or release command. A saga started is
    written by ``flush`` (at commit), with the others of the transaction."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._started: list[dict[str, Any]] = []
        # What ``answer_many`` did, by step request id, for ``answered`` to hand out.
        self.answered_kept: Kept[Row[Any] | None] = Kept()

    async def start(
        self,
        *,
        saga_id: str,
        kind: str,
        person_id: UUID | str,
        command: Envelope,
        step_type: str,
        payload: dict[str, Any],
        deadline: datetime,
    ) -> None:
        # The command's envelope is kept without its data (it holds the citizen ID): only
        # its id, type, correlation and actor are needed for the result.
        redacted = command.model_copy(update={"data": {}})
        self._started.append(
            {
                "saga_id": saga_id,
                "kind": kind,
                "person_id": str(person_id),
                "command_id": command.id,
                "command_envelope": redacted.to_bytes(),
                "step_request_id": saga_id,
                "step_type": step_type,
                "compensation_request_id": None,
                "status": "waiting",
                "payload": payload,
                "deadline": deadline,
                "created_at": now(),
                "finished_at": None,
            }
        )

    async def flush(self) -> None:
        """Write the sagas started since the last flush."""
        if self._started:
            rows, self._started = self._started, []
            await insert_rows(self.session, _SAGA, rows)

    def discard(self) -> None:
        """Forget the sagas not written yet (the transaction was rolled back)."""
        self._started = []

    async def answered(self, request_id: str, status: str) -> Row[Any] | None:
        """End the saga waiting for its step ``request_id`` as ``status``; its row after, or
        ``None`` when no saga waits for that step (a late answer, or a compensation's). Done
        already, with its outcome kept, when ``answer_many`` was given it."""
        if request_id in self.answered_kept:
            return self.answered_kept.take(request_id, status)
        done = await self.session.execute(
            _ANSWERED, {"request_id": request_id, "ended": status, "at": now()}
        )
        return done.one_or_none()

    async def answer_many(self, request_ids: list[str], status: str) -> list[Row[Any]]:
        """``answered`` for many steps at once (each id once): the sagas ended, whose outcomes
        are kept for the ``answered`` calls that ask for them."""
        done = await self.session.execute(
            _ANSWERED_MANY, {"request_ids": request_ids, "ended": status, "at": now()}
        )
        ended = {row.step_request_id: row for row in done}
        for request_id in request_ids:
            self.answered_kept.keep(request_id, status, [ended.get(request_id)])
        return list(ended.values())

    async def by_request(self, request_id: str) -> Row[Any] | None:
        """The saga whose step or compensation is ``request_id``."""
        return (await self.session.execute(_BY_REQUEST, {"request_id": request_id})).one_or_none()

    async def finish(self, saga_id: str, from_status: str, status: str, **values: Any) -> bool:
        """End a saga that is still ``from_status``; ``False`` if another path ended it first."""
        done = await self.session.execute(
            update(sagas)
            .where(sagas.c.saga_id == saga_id, sagas.c.status == from_status)
            .values(status=status, finished_at=now(), **values)
        )
        return bool(done.rowcount)  # type: ignore[attr-defined]

    async def postpone(self, saga_id: str, deadline: datetime) -> None:
        await self.session.execute(
            update(sagas)
            .where(sagas.c.saga_id == saga_id, sagas.c.status == "waiting")
            .values(deadline=deadline)
        )

    async def overdue(self, at: datetime, limit: int) -> list[Row[Any]]:
        return list(
            (
                await self.session.execute(
                    select(sagas)
                    .where(sagas.c.status == "waiting", sagas.c.deadline < at)
                    .order_by(sagas.c.deadline)
                    .limit(limit)
                )
            ).all()
        )


def command_envelope(row: Row[Any]) -> Envelope:
    return Envelope.from_bytes(row.command_envelope)
