"""Component fixtures: a service built by its composition root on a migrated database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from services.orgs.bootstrap import build
from services.runtime.app import ServiceRuntime
from tests.conftest import service_settings


@asynccontextmanager
async def orgs_runtime(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    """The orgs service built by its composition root on the migrated database ``url``."""
    monkeypatch.setenv("BIANZHI_ORGS_DATABASE_URL", url)
    rt = build(service_settings(tmp_path, "localhost:1"))
    await rt.migrate()
    try:
        yield rt
    finally:
        await rt.engine.dispose()
        await rt.read_engine.dispose()


@pytest.fixture
async def runtime(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    async with orgs_runtime(db_url, tmp_path, monkeypatch) as rt:
        yield rt
