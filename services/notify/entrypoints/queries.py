"""The notify query API (WIRE-CONTRACT §6): a subscription (never its secret), its deliveries
with every attempt at them, and deliveries across subscriptions for operators (``bianzhi
deliveries``). Reads only; writes go through the command topic."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.notify.adapters.orm import deliveries, delivery_attempts, subscriptions
from services.notify.domain.model import DeliveryStatus
from services.runtime.db import paged
from services.runtime.http import HttpError, Request, Router

# Everything a query may show of a subscription: the secret is deliberately not selected.
_PUBLIC_COLUMNS = [c for c in subscriptions.c if c.name != "secret"]


def _channel(row: Any) -> dict[str, Any]:
    if row.channel_kind == "webhook":
        return {"kind": "webhook", "url": row.url}
    return {"kind": row.channel_kind, "address": row.address}


def _attempt(row: Any) -> dict[str, Any]:
    return {
        "attempt": row.attempt,
        "resend": row.resend,
        "channel": row.channel_kind,
        "outcome": row.outcome,
        "status_code": row.status_code,
        "error": row.error,
        "duration_ms": row.duration_ms,
        "started_at": row.started_at,
    }


async def _attempts_of(session: AsyncSession, delivery_ids: list[str]) -> dict[str, list[Any]]:
    """The attempts of each delivery, oldest first."""
    found: dict[str, list[Any]] = {d: [] for d in delivery_ids}
    if not delivery_ids:
        return found
    rows = await session.execute(
        select(delivery_attempts)
        .where(delivery_attempts.c.delivery_id.in_(delivery_ids))
        .order_by(
            delivery_attempts.c.delivery_id,
            delivery_attempts.c.resend,
            delivery_attempts.c.attempt,
            delivery_attempts.c.started_at,
        )
    )
    for row in rows:
        found[row.delivery_id].append(_attempt(row))
    return found


def _status_condition(request: Request) -> list[Any]:
    status = request.arg("status")
    if not status:
        return []
    if status not in DeliveryStatus._value2member_map_:
        raise HttpError(
            400, "invalid_query", f"status must be one of {[s.value for s in DeliveryStatus]}"
        )
    return [deliveries.c.status == status]


def _delivery(row: Any, history: list[Any] | None = None) -> dict[str, Any]:
    return {
        "delivery_id": row.delivery_id,
        "subscription_id": row.subscription_id,
        "event_id": row.event_id,
        "event_type": row.event_type,
        "status": row.status,
        "attempts": row.attempts,
        "last_status_code": row.last_status_code,
        "last_error": row.last_error,
        "next_attempt_at": row.next_attempt_at
        if row.status == DeliveryStatus.PENDING.value
        else None,
        "delivered_at": row.delivered_at,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "resends": row.resends,
        "history": history if history is not None else [],
    }


def register_queries(router: Router, sessions: async_sessionmaker[AsyncSession]) -> None:
    async def _subscription(session: AsyncSession, subscription_id: str) -> Any:
        row = (
            await session.execute(
                select(*_PUBLIC_COLUMNS).where(subscriptions.c.subscription_id == subscription_id)
            )
        ).one_or_none()
        if row is None:
            raise HttpError(404, "not_found", f"subscription {subscription_id} does not exist")
        return row

    @router.get("/subscriptions/{subscription_id}")
    async def get_subscription(request: Request) -> tuple[int, Any]:
        subscription_id = str(request.uuid_param("subscription_id"))
        async with sessions() as session:
            row = await _subscription(session, subscription_id)
            counts = dict(
                (
                    await session.execute(
                        select(deliveries.c.status, func.count())
                        .where(deliveries.c.subscription_id == subscription_id)
                        .group_by(deliveries.c.status)
                    )
                ).all()
            )
        return 200, {
            "subscription_id": row.subscription_id,
            "subscriber": row.subscriber,
            "event_types": row.event_types,
            "division_code": row.division_code,
            "channel": _channel(row),
            "status": row.status,
            "created_at": row.created_at,
            "removed_at": row.removed_at,
            "deliveries": {s.value: counts.get(s.value, 0) for s in DeliveryStatus},
        }

    @router.get("/subscriptions/{subscription_id}/deliveries")
    async def get_deliveries(request: Request) -> tuple[int, Any]:
        subscription_id = str(request.uuid_param("subscription_id"))
        limit = request.int_arg("limit", 50, low=1, high=500)
        offset = request.int_arg("offset", 0, low=0, high=10_000_000)
        conditions = [deliveries.c.subscription_id == subscription_id, *_status_condition(request)]
        async with sessions() as session:
            await _subscription(session, subscription_id)
            newest_first = select(deliveries).order_by(
                deliveries.c.created_at.desc(), deliveries.c.delivery_id
            )
            total, rows = await paged(
                session, newest_first, deliveries, conditions, limit=limit, offset=offset
            )
            history = await _attempts_of(session, [r.delivery_id for r in rows])
        return 200, {
            "subscription_id": subscription_id,
            "items": [_delivery(r, history[r.delivery_id]) for r in rows],
            "total": total,
            "limit": limit,
            "offset": offset,
        }

    @router.get("/deliveries")
    async def list_deliveries(request: Request) -> tuple[int, Any]:
        """Deliveries of every subscription, most recently changed first (``status=failed``:
        what an operator may want to resend)."""
        limit = request.int_arg("limit", 50, low=1, high=500)
        offset = request.int_arg("offset", 0, low=0, high=10_000_000)
        conditions = _status_condition(request)
        if wanted := request.arg("subscription_id"):
            try:
                subscription_id = str(UUID(wanted))
            except ValueError:
                raise HttpError(400, "invalid_query", "subscription_id must be a UUID") from None
            conditions.append(deliveries.c.subscription_id == subscription_id)
        async with sessions() as session:
            changed_first = (
                select(deliveries, subscriptions.c.subscriber, subscriptions.c.channel_kind)
                .join(
                    subscriptions,
                    subscriptions.c.subscription_id == deliveries.c.subscription_id,
                )
                .order_by(deliveries.c.updated_at.desc(), deliveries.c.delivery_id)
            )
            total, rows = await paged(
                session, changed_first, deliveries, conditions, limit=limit, offset=offset
            )
            history = await _attempts_of(session, [r.delivery_id for r in rows])
        items = [
            _delivery(r, history[r.delivery_id])
            | {"subscriber": r.subscriber, "channel": r.channel_kind}
            for r in rows
        ]
        return 200, {"items": items, "total": total, "limit": limit, "offset": offset}

    @router.get("/deliveries/{delivery_id}")
    async def get_delivery(request: Request) -> tuple[int, Any]:
        delivery_id = str(request.uuid_param("delivery_id"))
        async with sessions() as session:
            row = (
                await session.execute(
                    select(deliveries).where(deliveries.c.delivery_id == delivery_id)
                )
            ).one_or_none()
            if row is None:
                raise HttpError(404, "not_found", f"delivery {delivery_id} does not exist")
            history = await _attempts_of(session, [delivery_id])
        return 200, _delivery(row, history[delivery_id])
