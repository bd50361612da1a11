"""Work a service repeats in the background (``ServiceDefinition.background``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("bianzhi.periodic")


async def every(interval_s: float, job: Callable[[], Awaitable[object]], what: str) -> None:
    """Run ``job`` every ``interval_s`` seconds until cancelled. A run that fails is logged
    (``what`` names it) and the next one tries again."""
    while True:
        try:
            await job()
        except Exception as exc:
            log.warning(f"{what} failed", error=repr(exc))
        await asyncio.sleep(interval_s)
