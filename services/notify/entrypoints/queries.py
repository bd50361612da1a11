"""The notify query API (WIRE-CONTRACT §6): a subscription (never its secret) and its
delivery log. Reads only; writes go through the command topic."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.notify.adapters.orm import deliveries, subscriptions
from services.notify.domain.model import DeliveryStatus
from services.runtime.http import HttpError, Request, Router

# Everything a query may show of a subscription: the secret is deliberately not selected.
_PUBLIC_COLUMNS = [c for c in subscriptions.c if c.name != "secret"]


def _channel(row: Any) -> dict[str, Any]:
    if row.channel_kind == "webhook":
        return {"kind": "webhook", "url": row.url}
    return {"kind": row.channel_kind, "address": row.address}


def _delivery(row: Any) -> dict[str, Any]:
    return {
        "delivery_id": row.delivery_id,
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
        conditions = [deliveries.c.subscription_id == subscription_id]
        if status := request.arg("status"):
            if status not in DeliveryStatus._value2member_map_:
                raise HttpError(
                    400,
                    "invalid_query",
                    f"status must be one of {[s.value for s in DeliveryStatus]}",
                )
            conditions.append(deliveries.c.status == status)
        async with sessions() as session:
            await _subscription(session, subscription_id)
            total = (
                await session.execute(
                    select(func.count()).select_from(deliveries).where(*conditions)
                )
            ).scalar_one()
            rows = (
                await session.execute(
                    select(deliveries)
                    .where(*conditions)
                    .order_by(deliveries.c.created_at.desc(), deliveries.c.delivery_id)
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
        return 200, {
            "subscription_id": subscription_id,
            "items": [_delivery(r) for r in rows],
            "total": total,
            "limit": limit,
            "offset": offset,
        }
