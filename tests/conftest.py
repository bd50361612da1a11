"""Fixtures shared by every suite: databases on both backends, the real broker, services."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from contracts.topics import all_topics
from services.runtime.embedded_broker import EmbeddedBroker, ensure_topics
from services.runtime.settings import Settings
from tests.support.databases import backends, database, postgres_url
from tests.support.kafka import CommandClient

TEST_PARTITIONS = 3


def pytest_report_header(config: pytest.Config) -> str:
    if postgres_url():
        return "bianzhi databases: SQLite and PostgreSQL"
    return (
        "bianzhi databases: SQLite ONLY — set BIANZHI_TEST_POSTGRES_URL to also run every "
        "database test on PostgreSQL (CI does)"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not postgres_url():
        terminalreporter.write_line(
            "NOTE: database tests ran on SQLite only (BIANZHI_TEST_POSTGRES_URL not set).",
            yellow=True,
        )


@pytest.fixture(params=backends())
def db_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def db_url(db_backend: str, tmp_path: Path) -> AsyncIterator[str]:
    async with database(db_backend, tmp_path, "orgs") as url:
        yield url


@pytest.fixture(scope="session")
async def kafka(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """One fresh embedded broker for the whole test session."""
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    broker = EmbeddedBroker(log_path=log)
    await broker.start()
    try:
        yield broker.bootstrap
    finally:
        await broker.stop()


async def reset_topics(bootstrap: str) -> None:
    """Delete and recreate every contract topic, so each test starts from empty topics."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        doomed = [t for t in all_topics() if t in existing]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()
    await ensure_topics(bootstrap, all_topics(), partitions=TEST_PARTITIONS)


@pytest.fixture
async def topics(kafka: str) -> str:
    await reset_topics(kafka)
    return kafka


def service_settings(tmp_path: Path, bootstrap: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path,
        "kafka_bootstrap": bootstrap,
        "kafka_group_prefix": f"test-{uuid.uuid4().hex[:8]}",
        "kafka_session_timeout_ms": 3000,
        "kafka_heartbeat_interval_ms": 1000,
        "kafka_command_fetch_max_wait_ms": 10,
        "kafka_event_fetch_max_wait_ms": 20,
        "relay_poll_interval_s": 0.2,
        "retry_initial_s": 0.05,
        "retry_max_s": 0.5,
        "kafka_graceful_timeout_s": 10,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def client(topics: str) -> AsyncIterator[CommandClient]:
    c = CommandClient(topics)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def wait_for(predicate: object, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll an async predicate until it is true."""
    async with asyncio.timeout(timeout):
        while not await predicate():  # type: ignore[operator]
            await asyncio.sleep(interval)
