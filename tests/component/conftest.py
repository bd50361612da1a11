"""Component fixtures: a service built by its composition root on a migrated database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.orgs.bootstrap import build
from services.runtime.app import ServiceRuntime
from tests.conftest import service_settings


@pytest.fixture
async def runtime(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    monkeypatch.setenv("BIANZHI_ORGS_DATABASE_URL", db_url)
    rt = build(service_settings(tmp_path, "localhost:1"))
    await rt.migrate()
    try:
        yield rt
    finally:
        await rt.engine.dispose()
        await rt.read_engine.dispose()
