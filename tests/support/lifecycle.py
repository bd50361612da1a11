"""Run a service app's lifespan in its own task (fixtures set up and tear down in different
tasks, and anyio cancel scopes must be left in the task that entered them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from faststream.asgi import AsgiFastStream


@asynccontextmanager
async def running(app: AsgiFastStream) -> AsyncIterator[None]:
    started = asyncio.Event()
    stop = asyncio.Event()

    async def hold() -> None:
        async with app.start_lifespan_context():
            started.set()
            await stop.wait()

    task = asyncio.create_task(hold())
    waiter = asyncio.create_task(started.wait())
    done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()  # raises the startup failure
    try:
        yield
    finally:
        stop.set()
        await task
