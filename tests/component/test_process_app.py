"""A service in a process of its own freezes what startup built out of the collector's sight."""

from __future__ import annotations

import asyncio
import gc

from services.runtime.app import ServiceRuntime


async def _started(runtime: ServiceRuntime) -> int:
    """Run the runtime's after-startup step; the freeze count it leaves."""
    gc.unfreeze()
    try:
        await runtime._after_startup()
        frozen = gc.get_freeze_count()
    finally:
        for task in runtime._background:
            task.cancel()
        await asyncio.gather(*runtime._background, return_exceptions=True)
        await runtime.relay.stop()
        gc.unfreeze()
    return frozen


async def test_a_service_process_freezes_what_startup_built(runtime: ServiceRuntime) -> None:
    app = runtime.process_app()
    assert app is runtime.app
    assert await _started(runtime) > 0


async def test_a_runtime_sharing_its_process_freezes_nothing(runtime: ServiceRuntime) -> None:
    # Tests and in-process tools build runtimes in one process: nothing of theirs is frozen.
    assert await _started(runtime) == 0
