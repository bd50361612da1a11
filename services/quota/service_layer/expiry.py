"""The periodic sweep that expires quota-use notices past their last day (通知单过期)."""

from __future__ import annotations

import asyncio

import structlog

from services.quota.service_layer import handlers
from services.runtime.app import ServiceRuntime

log = structlog.get_logger("bianzhi.quota.expiry")

SWEEP_INTERVAL_S = 60.0


async def sweep_once(runtime: ServiceRuntime) -> list[str]:
    """Expire every lapsed notice now; the numbers expired."""
    source = f"{runtime.settings.source.rstrip('/')}/{runtime.name}"
    async with runtime.uow() as uow:
        expired = await handlers.expire_notices(uow, handlers.today(), source=source)  # type: ignore[arg-type]
        await uow.commit()
    if expired:
        log.info("quota-use notices expired", notices=expired, count=len(expired))
    return expired


async def sweep_expired_notices(runtime: ServiceRuntime) -> None:
    """Run ``sweep_once`` every minute for as long as the service runs."""
    while True:
        try:
            await sweep_once(runtime)
        except Exception as exc:  # the next sweep tries again; handlers also expire lazily
            log.warning("notice expiry sweep failed", error=repr(exc))
        await asyncio.sleep(SWEEP_INTERVAL_S)
