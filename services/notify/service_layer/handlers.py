"""Command handlers of the notify service: plain functions of (command, uow, context)."""

from __future__ import annotations

from uuid import UUID

from contracts.codes import ReasonCode, Role
from contracts.notify import (
    DeliveryResent,
    ResendDelivery,
    Subscribe,
    SubscriptionChannel,
    SubscriptionCreated,
    SubscriptionRemoved,
    Unsubscribe,
    WebhookChannel,
)
from services.notify.domain import model
from services.notify.service_layer.unit_of_work import NotifyUnitOfWork
from services.runtime.messaging import CommandRoute, HandlerContext
from services.runtime.rules import Rejection


async def _load(uow: NotifyUnitOfWork, subscription_id: UUID) -> model.Subscription:
    sub = await uow.subscriptions.get(subscription_id)
    if sub is None:
        raise Rejection(
            ReasonCode.NOT_FOUND,
            f"subscription {subscription_id} does not exist / 订阅不存在",
            {"subscription_id": str(subscription_id)},
        )
    return sub


async def subscribe(cmd: Subscribe, uow: NotifyUnitOfWork, ctx: HandlerContext) -> None:
    ctx.require_region(cmd.division_code, what="subscription")
    if await uow.subscriptions.get(cmd.subscription_id) is not None:
        raise Rejection(
            ReasonCode.CONFLICT,
            f"subscription {cmd.subscription_id} already exists / 订阅标识已存在",
            {"subscription_id": str(cmd.subscription_id)},
        )
    channel = cmd.channel
    sub = model.Subscription(
        subscription_id=cmd.subscription_id,
        subscriber=cmd.subscriber,
        event_types=tuple(dict.fromkeys(cmd.event_types)),
        division_code=cmd.division_code,
        channel_kind=channel.kind,
        url=channel.url if isinstance(channel, WebhookChannel) else None,
        address=None if isinstance(channel, WebhookChannel) else channel.address,
        status=model.SubscriptionStatus.ACTIVE,
    )
    await uow.subscriptions.add(
        sub,
        secret=channel.secret if isinstance(channel, WebhookChannel) else None,
        created_by=ctx.envelope.actorid,
    )
    ctx.emit(
        SubscriptionCreated(
            subscription_id=sub.subscription_id,
            subscriber=sub.subscriber,
            event_types=list(sub.event_types),
            division_code=sub.division_code,
            channel=SubscriptionChannel.of(channel),
        )
    )


async def unsubscribe(cmd: Unsubscribe, uow: NotifyUnitOfWork, ctx: HandlerContext) -> None:
    sub = await _load(uow, cmd.subscription_id)
    ctx.require_region(sub.division_code, what="subscription")
    if sub.status is model.SubscriptionStatus.REMOVED:
        raise Rejection(
            ReasonCode.CONFLICT,
            f"subscription {cmd.subscription_id} was already removed / 订阅已取消",
            {"subscription_id": str(cmd.subscription_id)},
        )
    await uow.subscriptions.remove(sub.subscription_id)
    ctx.emit(SubscriptionRemoved(subscription_id=sub.subscription_id, subscriber=sub.subscriber))


async def resend_delivery(cmd: ResendDelivery, uow: NotifyUnitOfWork, ctx: HandlerContext) -> None:
    delivery = await uow.deliveries.get(str(cmd.delivery_id))
    if delivery is None:
        raise Rejection(
            ReasonCode.NOT_FOUND,
            f"delivery {cmd.delivery_id} does not exist / 投递记录不存在",
            {"delivery_id": str(cmd.delivery_id)},
        )
    sub = await _load(uow, UUID(delivery.subscription_id))
    ctx.require_region(sub.division_code, what="subscription")
    if sub.status is model.SubscriptionStatus.REMOVED:
        raise Rejection(
            ReasonCode.CONFLICT,
            f"subscription {sub.subscription_id} was removed; its deliveries are not resent / "
            "订阅已取消，不能重新投递",
            {"subscription_id": str(sub.subscription_id), "delivery_id": str(cmd.delivery_id)},
        )
    if not await uow.deliveries.resend(delivery.delivery_id):
        raise Rejection(
            ReasonCode.CONFLICT,
            f"delivery {cmd.delivery_id} is still being attempted / 该投递仍在进行中",
            {"delivery_id": str(cmd.delivery_id), "status": delivery.status},
        )
    ctx.emit(
        DeliveryResent(
            subscription_id=sub.subscription_id,
            delivery_id=cmd.delivery_id,
            event_id=delivery.event_id,
            event_type=delivery.event_type,
            previous_status=delivery.status,
            previous_attempts=delivery.attempts,
            resends=delivery.resends + 1,
        )
    )


# The routing table: managing subscriptions and deliveries is for admins (WIRE-CONTRACT §2).
COMMANDS: list[CommandRoute] = [
    CommandRoute(Subscribe, subscribe, Role.ADMIN),
    CommandRoute(Unsubscribe, unsubscribe, Role.ADMIN),
    CommandRoute(ResendDelivery, resend_delivery, Role.ADMIN),
]
