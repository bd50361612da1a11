"""The HTTP client of notify's webhooks and of the CLI (httpx over httpcore): once warm, a
request costs no search of the import system.

httpcore asks which async library runs the event loop on every lock it sets up and every
request it shields from cancellation, by importing sniffio; when sniffio is missing that import
fails each time, and a failed import searches every entry of ``sys.path`` again. Measured on
notify's at-scale test: a quarter of the delivery time.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import httpx

from services.runtime.embedded_broker import free_port


class Lookups(importlib.abc.MetaPathFinder):
    """Records every module the import system is asked to find."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> Any:
        self.names.append(fullname)
        return None  # the finders after this one do the finding


async def refused(client: httpx.AsyncClient, url: str) -> None:
    try:
        await client.post(url, content=b"{}")
    except httpx.ConnectError:
        return
    raise AssertionError("nothing listens there")


async def test_a_warm_client_request_imports_nothing() -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    async with httpx.AsyncClient(timeout=5) as client:
        await refused(client, url)  # warm: whatever a first request imports, it has
        lookups = Lookups()
        sys.meta_path.insert(0, lookups)
        try:
            for _ in range(3):
                await refused(client, url)
        finally:
            sys.meta_path.remove(lookups)
    assert lookups.names == []
