"""Rebuilding the establishment counts from the quota events alone (WIRE-CONTRACT §7.5).

``rebuild`` feeds the events of ``bianzhi.quota.events.v1``, in the order they were published,
into a fresh ``Replay``; ``live_counts`` reads the same counts from the quota database; ``compare``
lists every count where the two differ. A check of a running service (``bianzhi check``) reads the
events from the topic or from the outbox (``outbox_events``) and reports what ``compare`` finds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.envelope import Envelope
from contracts.quota import (
    EstablishmentsMerged,
    LeaderPostsSet,
    QuotaApproved,
    QuotaTransferred,
    QuotaUseNoticeCancelled,
    QuotaUseNoticeExpired,
    QuotaUseNoticeIssued,
    RegionLimitSet,
    SlotMoved,
    SlotOccupied,
    SlotReleased,
)
from contracts.topics import QUOTA_EVENTS
from services.quota.adapters.orm import (
    establishment,
    leader_posts,
    messaging,
    notices,
    region_limits,
)
from services.quota.domain.model import PostTally, Replay, Tally


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)


class EventReplay(Replay):
    """A ``Replay`` fed by quota events; event types that change no count are skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.notice_counts: dict[str, tuple[str, str, int]] = {}
        self.applied = 0

    def apply(self, env: Envelope) -> None:
        handler = _HANDLERS.get(env.type)
        if handler is not None:
            handler(self, env.data)
            self.applied += 1

    # one method per event type; ``data`` is the event's validated JSON

    def _limit_set(self, data: dict[str, Any]) -> None:
        event = RegionLimitSet.model_validate(data)
        delta = event.limit - (event.previous_limit or 0)
        self.change_limit(event.division_code, event.category.value, delta)

    def _approved(self, data: dict[str, Any]) -> None:
        event = QuotaApproved.model_validate(data)
        delta = event.approved - event.previous_approved
        self.change_approved(str(event.org_id), event.category.value, delta)

    def _transferred(self, data: dict[str, Any]) -> None:
        event = QuotaTransferred.model_validate(data)
        self.change_approved(str(event.from_org_id), event.category.value, -event.amount)
        self.change_approved(str(event.to_org_id), event.category.value, event.amount)

    def _posts_set(self, data: dict[str, Any]) -> None:
        event = LeaderPostsSet.model_validate(data)
        self.change_posts(
            str(event.org_id),
            _opt(event.unit_id),
            event.principal - (event.previous_principal or 0),
            event.deputy - (event.previous_deputy or 0),
        )

    def _notice_issued(self, data: dict[str, Any]) -> None:
        event = QuotaUseNoticeIssued.model_validate(data)
        org_id, category = str(event.org_id), event.category.value
        self.notice_counts[event.notice_no] = (org_id, category, event.count)
        self.reserve(org_id, category, event.count)

    def _notice_closed(self, data: dict[str, Any], remaining: int | None, category: Any) -> None:
        notice_no = data["notice_no"]
        org_id, seen_category, count = self.notice_counts.get(
            notice_no, (str(data["org_id"]), None, 0)
        )
        if remaining is None:  # events of older producers: what the notice had left
            remaining = count - self.notices_used.get(notice_no, 0)
        cat = category.value if category is not None else seen_category
        if cat is not None:
            self.reserve(org_id, cat, -remaining)

    def _notice_cancelled(self, data: dict[str, Any]) -> None:
        event = QuotaUseNoticeCancelled.model_validate(data)
        self._notice_closed(data, event.remaining, event.category)

    def _notice_expired(self, data: dict[str, Any]) -> None:
        event = QuotaUseNoticeExpired.model_validate(data)
        self._notice_closed(data, event.remaining, event.category)

    def _slot_occupied(self, data: dict[str, Any]) -> None:
        event = SlotOccupied.model_validate(data)
        self.occupy(
            str(event.person_id),
            str(event.org_id),
            event.category.value,
            _opt(event.unit_id),
            event.leader_post.value if event.leader_post else None,
            event.notice_no,
        )

    def _slot_released(self, data: dict[str, Any]) -> None:
        event = SlotReleased.model_validate(data)
        self.vacate(
            str(event.person_id),
            str(event.org_id),
            event.category.value,
            _opt(event.unit_id) or "",
            event.leader_post.value if event.leader_post else None,
        )
        if event.returned_to_notice:  # a saga's compensation: the place is reserved again
            self.return_to_notice(str(event.org_id), event.category.value, event.returned_to_notice)

    def _slot_moved(self, data: dict[str, Any]) -> None:
        event = SlotMoved.model_validate(data)
        # The unit and leader post left behind are not in the event: they are those of the slot
        # the person was last seen taking (their SlotOccupied or SlotMoved).
        self.vacate(
            str(event.person_id),
            str(event.from_org_id),
            event.from_category.value if event.from_category else None,
        )
        self.occupy(
            str(event.person_id),
            str(event.to_org_id),
            event.category.value,
            _opt(event.unit_id),
            event.leader_post.value if event.leader_post else None,
            event.notice_no,
        )

    def _merged(self, data: dict[str, Any]) -> None:
        event = EstablishmentsMerged.model_validate(data)
        target = str(event.target_org_id)
        self.merge({str(o) for o in event.source_org_ids}, target)
        for notice_no in event.notices_moved:
            if notice_no in self.notice_counts:
                _, category, count = self.notice_counts[notice_no]
                self.notice_counts[notice_no] = (target, category, count)


_HANDLERS = {
    RegionLimitSet.TYPE: EventReplay._limit_set,
    QuotaApproved.TYPE: EventReplay._approved,
    QuotaTransferred.TYPE: EventReplay._transferred,
    LeaderPostsSet.TYPE: EventReplay._posts_set,
    QuotaUseNoticeIssued.TYPE: EventReplay._notice_issued,
    QuotaUseNoticeCancelled.TYPE: EventReplay._notice_cancelled,
    QuotaUseNoticeExpired.TYPE: EventReplay._notice_expired,
    SlotOccupied.TYPE: EventReplay._slot_occupied,
    SlotReleased.TYPE: EventReplay._slot_released,
    SlotMoved.TYPE: EventReplay._slot_moved,
    EstablishmentsMerged.TYPE: EventReplay._merged,
}


def rebuild(events: Iterable[Envelope]) -> EventReplay:
    """Counts rebuilt from quota events, applied in the order given (the topic's order)."""
    replay = EventReplay()
    for env in events:
        replay.apply(env)
    return replay


async def outbox_events(session: AsyncSession) -> list[Envelope]:
    """Every quota event the outbox still holds, in publishing order."""
    outbox = messaging.outbox
    rows = await session.execute(
        select(outbox.c.value).where(outbox.c.topic == QUOTA_EVENTS).order_by(outbox.c.seq)
    )
    return [Envelope.from_bytes(value) for value in rows.scalars()]


async def live_counts(session: AsyncSession) -> Replay:
    """The counts as the quota database holds them, in the shape of a ``Replay``."""
    live = Replay()
    for row in await session.execute(select(establishment)):
        live.establishment[(row.org_id, row.category)] = Tally(
            row.approved, row.occupied, row.reserved
        )
    for row in await session.execute(select(leader_posts)):
        live.posts[(row.org_id, row.unit_id)] = PostTally(
            row.principal, row.deputy, row.principal_held, row.deputy_held
        )
    for row in await session.execute(select(region_limits)):
        live.limits[(row.division_code, row.category)] = row.limit
    for row in await session.execute(select(notices.c.notice_no, notices.c.used)):
        live.notices_used[row.notice_no] = row.used
    return live


@dataclass(frozen=True)
class Mismatch:
    """One count that differs: what (``establishment``, ``leader_posts``, ``limit``,
    ``notice_used``), whose (the key), and the rebuilt and live values."""

    what: str
    key: tuple[str, ...]
    field: str
    rebuilt: int
    live: int


def compare(rebuilt: Replay, live: Replay) -> list[Mismatch]:
    """Every count where the rebuilt and the live numbers differ (a missing row counts as 0)."""
    found: list[Mismatch] = []
    for key in sorted(set(rebuilt.establishment) | set(live.establishment)):
        a = rebuilt.establishment.get(key, Tally())
        b = live.establishment.get(key, Tally())
        for name in ("approved", "occupied", "reserved"):
            if getattr(a, name) != getattr(b, name):
                found.append(
                    Mismatch("establishment", key, name, getattr(a, name), getattr(b, name))
                )
    for key in sorted(set(rebuilt.posts) | set(live.posts)):
        p = rebuilt.posts.get(key, PostTally())
        q = live.posts.get(key, PostTally())
        for name in ("principal", "deputy", "principal_held", "deputy_held"):
            if getattr(p, name) != getattr(q, name):
                found.append(
                    Mismatch("leader_posts", key, name, getattr(p, name), getattr(q, name))
                )
    for key in sorted(set(rebuilt.limits) | set(live.limits)):
        x, y = rebuilt.limits.get(key, 0), live.limits.get(key, 0)
        if x != y:
            found.append(Mismatch("limit", key, "limit", x, y))
    for notice_no in sorted(set(rebuilt.notices_used) | set(live.notices_used)):
        x, y = rebuilt.notices_used.get(notice_no, 0), live.notices_used.get(notice_no, 0)
        if x != y:
            found.append(Mismatch("notice_used", (notice_no,), "used", x, y))
    return found
