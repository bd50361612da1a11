"""The periodic sweep that expires quota-use notices past their last day (通知单过期)."""

from __future__ import annotations

import structlog

from services.quota.service_layer import handlers
from services.runtime.app import ServiceRuntime
from services.runtime.periodic import every

log = structlog.get_logger("bianzhi.quota.expiry")

SWEEP_INTERVAL_S = 60.0


async def sweep_once(runtime: ServiceRuntime) -> list[str]:
    """Expire every lapsed notice now; the numbers expired."""
    source = f"{runtime.settings.source.rstrip('/')}/{runtime.name}"
    async with runtime.uow() as uow:
        expired = await handlers.expire_notices(uow, handlers.today(), source=source)  # type: ignore[arg-type]
        if not expired:
            return expired  # nothing written: left without a commit
        await uow.commit()
    log.info("quota-use notices expired", notices=expired, count=len(expired))
    return expired


async def sweep_expired_notices(runtime: ServiceRuntime) -> None:
    """Run ``sweep_once`` every minute for as long as the service runs (a sweep that fails is
    logged and the next one tries again; handlers also expire notices lazily)."""
    await every(SWEEP_INTERVAL_S, lambda: sweep_once(runtime), "notice expiry sweep")
