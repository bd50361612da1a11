"""Run a service app's lifespan in its own task (fixtures set up and tear down in different
tasks, and anyio cancel scopes must be left in the task that entered them), and serve an app's
query API over HTTP for a CLI run as its own process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from faststream.asgi import AsgiFastStream

from tests.conftest import wait_for


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


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` over HTTP on a free loopback port; its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    await wait_for(lambda: _started(server), timeout=10)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def _started(server: uvicorn.Server) -> bool:
    return server.started
