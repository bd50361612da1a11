"""Integration fixtures: a running orgs service on the real broker and a real database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.orgs.bootstrap import build
from services.runtime.app import ServiceRuntime
from tests.conftest import service_settings
from tests.support.lifecycle import running


@pytest.fixture
async def orgs_service(
    topics: str, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    monkeypatch.setenv("BIANZHI_ORGS_DATABASE_URL", db_url)
    runtime = build(service_settings(tmp_path, topics))
    async with running(runtime.app):
        yield runtime
