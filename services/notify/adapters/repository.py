"""Loads and saves subscriptions (secrets sealed), queues, settles and logs deliveries, keeps
the org projection."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.envelope import new_id, now
from services.notify.adapters.orm import (
    deliveries,
    delivery_attempts,
    notify_events,
    org_divisions,
    subscriptions,
)
from services.notify.adapters.secrets import SecretBox, SecretKeyError, is_sealed
from services.notify.domain.model import DeliveryStatus, Subscription, SubscriptionStatus
from services.runtime.db import ignoring_duplicates, insert_rows


def _subscription(row: Any) -> Subscription:
    return Subscription(
        subscription_id=UUID(row.subscription_id),
        subscriber=row.subscriber,
        event_types=tuple(row.event_types),
        division_code=row.division_code,
        channel_kind=row.channel_kind,
        url=row.url,
        address=row.address,
        status=SubscriptionStatus(row.status),
    )


class SubscriptionRepository:
    def __init__(self, session: AsyncSession, box: SecretBox | None = None) -> None:
        self.session = session
        self.box = box

    def _seal(self, secret: str, subscription_id: str) -> str:
        if self.box is None:
            raise RuntimeError("no secrets key: this unit of work cannot store secrets")
        return self.box.seal(secret, subscription_id=subscription_id)

    async def get(self, subscription_id: UUID) -> Subscription | None:
        row = (
            await self.session.execute(
                select(subscriptions).where(subscriptions.c.subscription_id == str(subscription_id))
            )
        ).one_or_none()
        return None if row is None else _subscription(row)

    async def add(self, sub: Subscription, *, secret: str | None, created_by: str | None) -> None:
        await self.session.execute(
            insert(subscriptions).values(
                subscription_id=str(sub.subscription_id),
                subscriber=sub.subscriber,
                event_types=list(sub.event_types),
                division_code=sub.division_code,
                channel_kind=sub.channel_kind,
                url=sub.url,
                address=sub.address,
                secret=None if secret is None else self._seal(secret, str(sub.subscription_id)),
                status=sub.status.value,
                created_at=now(),
                created_by=created_by,
            )
        )

    async def remove(self, subscription_id: UUID) -> None:
        """Mark removed; its deliveries still owed are given up (they are not sent)."""
        stamp = now()
        await self.session.execute(
            update(subscriptions)
            .where(subscriptions.c.subscription_id == str(subscription_id))
            .values(status=SubscriptionStatus.REMOVED.value, removed_at=stamp)
        )
        await self.session.execute(
            update(deliveries)
            .where(
                deliveries.c.subscription_id == str(subscription_id),
                deliveries.c.status == DeliveryStatus.PENDING.value,
            )
            .values(
                status=DeliveryStatus.FAILED.value,
                last_error="subscription removed",
                next_attempt_at=None,
                updated_at=stamp,
            )
        )

    async def active(self) -> list[Subscription]:
        rows = await self.session.execute(
            select(subscriptions).where(subscriptions.c.status == SubscriptionStatus.ACTIVE.value)
        )
        return [_subscription(r) for r in rows]

    async def seal_plaintext_secrets(self) -> int:
        """Seal secrets stored before encryption existed; how many were sealed."""
        rows = (
            await self.session.execute(
                select(subscriptions.c.subscription_id, subscriptions.c.secret).where(
                    subscriptions.c.secret.is_not(None)
                )
            )
        ).all()
        sealed = 0
        for row in rows:
            if is_sealed(row.secret):
                continue
            await self.session.execute(
                update(subscriptions)
                .where(subscriptions.c.subscription_id == row.subscription_id)
                .values(secret=self._seal(row.secret, row.subscription_id))
            )
            sealed += 1
        return sealed


@dataclass(frozen=True)
class Claimed:
    """One delivery taken for an attempt, with what the attempt needs."""

    delivery_id: str
    subscription_id: str
    subscriber: str
    event_id: str
    event_type: str
    topic: str
    correlation_id: str | None
    attempts: int
    resends: int
    channel_kind: str
    url: str | None
    secret: str | None = field(repr=False)
    address: str | None
    body: bytes
    # Names of the orgs the event names, as far as notify knows them (for e-mails).
    org_names: dict[str, str] = field(default_factory=dict)
    # Why the subscription's secret could not be opened (a lost or wrong key): this delivery's
    # attempt fails with it, and every other delivery goes on.
    secret_error: str | None = None


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt, for the delivery log."""

    row: Claimed
    attempt: int
    outcome: str
    status_code: int | None
    error: str | None
    duration_ms: int
    started_at: datetime


@dataclass(frozen=True)
class DeliveryRecord:
    """One delivery, for an operator's command."""

    delivery_id: str
    subscription_id: str
    event_id: str
    event_type: str
    status: str
    attempts: int
    resends: int


class DeliveryRepository:
    def __init__(self, session: AsyncSession, box: SecretBox | None = None) -> None:
        self.session = session
        self.box = box
        self.queued = 0

    async def queue(
        self,
        *,
        event_id: str,
        event_type: str,
        topic: str,
        correlation_id: str | None,
        body: bytes,
        subscription_ids: Sequence[UUID],
    ) -> None:
        """Keep the event and owe it once to each subscription (again: no second row)."""
        stamp = now()
        await insert_rows(
            self.session,
            ignoring_duplicates(self.session, notify_events, on=("event_id",)),
            [
                {
                    "event_id": event_id,
                    "event_type": event_type,
                    "topic": topic,
                    "correlation_id": correlation_id,
                    "body": body,
                    "received_at": stamp,
                }
            ],
        )
        rows = [
            {
                "delivery_id": new_id(),
                "subscription_id": str(sid),
                "event_id": event_id,
                "event_type": event_type,
                "attempts": 0,
                "status": DeliveryStatus.PENDING.value,
                "next_attempt_at": stamp,
                "created_at": stamp,
                "updated_at": stamp,
            }
            for sid in subscription_ids
        ]
        if rows:
            owed = ignoring_duplicates(self.session, deliveries, on=("subscription_id", "event_id"))
            await insert_rows(self.session, owed, rows)
        self.queued += len(subscription_ids)

    async def claim_due(
        self, *, limit: int, lease_until: datetime, skip: Iterable[str] = ()
    ) -> list[Claimed]:
        """Take up to ``limit`` due deliveries; each stays leased until ``lease_until`` (an
        attempt cut short by a crash is tried again once its lease runs out)."""
        stamp = now()
        query = (
            select(
                deliveries.c.delivery_id,
                deliveries.c.subscription_id,
                deliveries.c.event_id,
                deliveries.c.event_type,
                deliveries.c.attempts,
                deliveries.c.resends,
                subscriptions.c.subscriber,
                subscriptions.c.channel_kind,
                subscriptions.c.url,
                subscriptions.c.secret,
                subscriptions.c.address,
                notify_events.c.topic,
                notify_events.c.correlation_id,
                notify_events.c.body,
            )
            .join(
                subscriptions,
                subscriptions.c.subscription_id == deliveries.c.subscription_id,
            )
            .join(notify_events, notify_events.c.event_id == deliveries.c.event_id)
            .where(
                deliveries.c.status == DeliveryStatus.PENDING.value,
                deliveries.c.next_attempt_at <= stamp,
                subscriptions.c.status == SubscriptionStatus.ACTIVE.value,
            )
            .order_by(deliveries.c.next_attempt_at, deliveries.c.created_at)
            .limit(limit)
        )
        skipped = list(skip)
        if skipped:
            query = query.where(deliveries.c.subscription_id.not_in(skipped))
        if self.session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(of=deliveries, skip_locked=True)
        rows = (await self.session.execute(query)).all()
        if not rows:
            return []
        await self.session.execute(
            update(deliveries)
            .where(deliveries.c.delivery_id.in_([r.delivery_id for r in rows]))
            .values(next_attempt_at=lease_until, updated_at=stamp)
        )
        claimed = []
        for r in rows:
            try:
                secret, secret_error = self._open(r.secret, r.subscription_id), None
            except (SecretKeyError, RuntimeError) as exc:
                secret, secret_error = None, str(exc)
            claimed.append(self._claimed(r, secret, secret_error))
        return claimed

    @staticmethod
    def _claimed(r: Any, secret: str | None, secret_error: str | None) -> Claimed:
        return Claimed(
            delivery_id=r.delivery_id,
            subscription_id=r.subscription_id,
            subscriber=r.subscriber,
            event_id=r.event_id,
            event_type=r.event_type,
            topic=r.topic,
            correlation_id=r.correlation_id,
            attempts=r.attempts,
            resends=r.resends,
            channel_kind=r.channel_kind,
            url=r.url,
            secret=secret,
            address=r.address,
            body=r.body,
            secret_error=secret_error,
        )

    def _open(self, stored: str | None, subscription_id: str) -> str | None:
        if stored is None:
            return None
        if self.box is None:
            raise RuntimeError("no secrets key: this unit of work cannot open secrets")
        return self.box.open(stored, subscription_id=subscription_id)

    async def record_attempts(self, records: Sequence[AttemptRecord]) -> None:
        """Keep attempts in the delivery log."""
        if not records:
            return
        await self.session.execute(
            insert(delivery_attempts),
            [
                {
                    "attempt_id": new_id(),
                    "delivery_id": r.row.delivery_id,
                    "subscription_id": r.row.subscription_id,
                    "event_id": r.row.event_id,
                    "attempt": r.attempt,
                    "resend": r.row.resends,
                    "channel_kind": r.row.channel_kind,
                    "outcome": r.outcome,
                    "status_code": r.status_code,
                    "error": r.error,
                    "duration_ms": r.duration_ms,
                    "started_at": r.started_at,
                }
                for r in records
            ],
        )

    async def get(self, delivery_id: str) -> DeliveryRecord | None:
        row = (
            await self.session.execute(
                select(deliveries).where(deliveries.c.delivery_id == delivery_id)
            )
        ).one_or_none()
        if row is None:
            return None
        return DeliveryRecord(
            delivery_id=row.delivery_id,
            subscription_id=row.subscription_id,
            event_id=row.event_id,
            event_type=row.event_type,
            status=row.status,
            attempts=row.attempts,
            resends=row.resends,
        )

    async def resend(self, delivery_id: str) -> bool:
        """Owe a settled delivery again, from its first attempt; ``False`` if it is pending."""
        stamp = now()
        result = await self.session.execute(
            update(deliveries)
            .where(
                deliveries.c.delivery_id == delivery_id,
                deliveries.c.status != DeliveryStatus.PENDING.value,
            )
            .values(
                status=DeliveryStatus.PENDING.value,
                attempts=0,
                resends=deliveries.c.resends + 1,
                last_status_code=None,
                last_error=None,
                next_attempt_at=stamp,
                delivered_at=None,
                updated_at=stamp,
            )
        )
        changed = bool(result.rowcount == 1)  # type: ignore[attr-defined]
        if changed:
            self.queued += 1
        return changed

    async def reschedule(self, delivery_id: str, at: datetime) -> None:
        await self.session.execute(
            update(deliveries)
            .where(
                deliveries.c.delivery_id == delivery_id,
                deliveries.c.status == DeliveryStatus.PENDING.value,
            )
            .values(next_attempt_at=at, updated_at=now())
        )

    async def settle(
        self,
        delivery_id: str,
        *,
        attempts: int,
        status: DeliveryStatus,
        status_code: int | None,
        error: str | None,
        next_attempt_at: datetime | None,
    ) -> bool:
        """Record the outcome of attempt number ``attempts``; ``False`` if the delivery was no
        longer pending at that attempt (settled elsewhere, or its subscription removed)."""
        stamp = now()
        result = await self.session.execute(
            update(deliveries)
            .where(
                deliveries.c.delivery_id == delivery_id,
                deliveries.c.status == DeliveryStatus.PENDING.value,
                deliveries.c.attempts == attempts - 1,
            )
            .values(
                attempts=attempts,
                status=status.value,
                last_status_code=status_code,
                last_error=error,
                next_attempt_at=next_attempt_at,
                delivered_at=stamp if status is DeliveryStatus.DELIVERED else None,
                updated_at=stamp,
            )
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


class OrgDivisions:
    """The org → division projection fed by the orgs events."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def set(self, org_id: UUID, division_code: str, name: str | None = None) -> None:
        stamp = now()
        values: dict[str, Any] = {"division_code": division_code, "updated_at": stamp}
        if name is not None:
            values["name"] = name
        updated = await self.session.execute(
            update(org_divisions).where(org_divisions.c.org_id == str(org_id)).values(**values)
        )
        if updated.rowcount == 0:  # type: ignore[attr-defined]
            await insert_rows(
                self.session,
                ignoring_duplicates(self.session, org_divisions, on=("org_id",)),
                [{"org_id": str(org_id), **values}],
            )

    async def rename(self, org_id: UUID, name: str) -> None:
        """Keep the new name of an org notify knows (one it has not seen stays unknown)."""
        await self.session.execute(
            update(org_divisions)
            .where(org_divisions.c.org_id == str(org_id))
            .values(name=name, updated_at=now())
        )

    async def names(self, org_ids: Iterable[str]) -> dict[str, str]:
        ids = sorted(set(org_ids))
        if not ids:
            return {}
        rows = await self.session.execute(
            select(org_divisions.c.org_id, org_divisions.c.name).where(
                org_divisions.c.org_id.in_(ids), org_divisions.c.name.is_not(None)
            )
        )
        return {r.org_id: r.name for r in rows}

    async def of(self, org_ids: Iterable[str]) -> dict[str, str]:
        ids = sorted(set(org_ids))
        if not ids:
            return {}
        rows = await self.session.execute(
            select(org_divisions.c.org_id, org_divisions.c.division_code).where(
                org_divisions.c.org_id.in_(ids)
            )
        )
        return {r.org_id: r.division_code for r in rows}
