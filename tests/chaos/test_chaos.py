"""Fault scenarios at small scale, each ending with the checker (docs/reliability.md).

Every service runs as its own process on the session's broker, with its own database; the load
generator sends a mix of commands (duplicates, malformed and rule-breaking ones included) while
the faults are injected; the checker then compares its ledger with the topics and the databases.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from tests.chaos.platform import SERVICES
from tests.chaos.scenarios import (
    SAGA_TIMEOUT_S,
    SMALL,
    Outcome,
    kill9,
    mixed,
    poison,
    quota_down_past_saga_timeout,
    run_recovery,
    run_scenario,
    scaled,
)
from tests.support.databases import database

pytestmark = [pytest.mark.broker, pytest.mark.timeout(420)]


@pytest.fixture
async def service_dbs(db_backend: str, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """A fresh database per service on the backend under test."""
    async with AsyncExitStack() as stack:
        yield {
            name: await stack.enter_async_context(database(db_backend, tmp_path, name))
            for name in SERVICES
        }


def passed(outcome: Outcome) -> None:
    print(outcome.render())
    assert outcome.report.passed, outcome.render()


async def test_kill9_of_each_service_during_load(
    topics: str, tmp_path: Path, service_dbs: dict[str, str]
) -> None:
    outcome = await run_scenario(
        "kill9",
        bootstrap=topics,
        data_dir=tmp_path / "run",
        database_urls=service_dbs,
        scale=SMALL,
        fault=kill9(),
        say=print,
    )
    passed(outcome)
    kills = [f for f in outcome.faults if f["what"] == "kill -9"]
    assert sorted({f["service"] for f in kills}) == sorted(SERVICES), outcome.faults
    # Killed with work in flight: commands sent and not yet answered.
    assert all(f["in_flight"] > 0 for f in kills), outcome.faults


async def test_poison_in_every_command_topic_during_load(topics: str, tmp_path: Path) -> None:
    outcome = await run_scenario(
        "poison",
        bootstrap=topics,
        data_dir=tmp_path / "run",
        scale=scaled(SMALL, rate=30),
        fault=poison(),
        say=print,
    )
    passed(outcome)
    # Two poison messages (garbage bytes, an envelope without an id) per command topic and
    # injection, each found in its topic's DLQ with the error (the checker matches them).
    assert outcome.report.counts["poison_sent"] == 2 * len(SERVICES) * SMALL.faults
    assert outcome.report.counts["dead_letters_seen"] >= outcome.report.counts["poison_sent"]


async def test_embedded_recovery_fresh_broker_replay_ends_with_zero_missing(
    tmp_path: Path,
) -> None:
    outcome = await run_recovery(data_dir=tmp_path / "run", scale=scaled(SMALL, rate=30), say=print)
    passed(outcome)
    assert outcome.report.extra["outbox_rows_republished"] > 0
    assert any(f["what"] == "broker lost" for f in outcome.faults)


async def test_sigterm_pause_and_database_outage_during_load(topics: str, tmp_path: Path) -> None:
    outcome = await run_scenario(
        "sigterm+pause+database",
        bootstrap=topics,
        data_dir=tmp_path / "run",
        scale=SMALL,
        fault=mixed(),
        say=print,
    )
    passed(outcome)
    assert [f["what"] for f in outcome.faults] == ["SIGTERM", "SIGSTOP", "sqlite locked"]
    assert all(f["in_flight"] > 0 for f in outcome.faults), outcome.faults


async def test_saga_steps_time_out_while_quota_is_down(topics: str, tmp_path: Path) -> None:
    """Quota killed for longer than the roster's saga timeout: enrolments, transfers and
    releases time out and are compensated while quota is down or as it comes back; whatever
    each ended as, quota and roster agree with it."""
    outcome = await run_scenario(
        "saga_timeouts",
        bootstrap=topics,
        data_dir=tmp_path / "run",
        scale=scaled(SMALL, faults=2),
        fault=quota_down_past_saga_timeout(),
        saga_timeout_s=SAGA_TIMEOUT_S,
        tolerated=frozenset({"timeout"}),
        say=print,
    )
    passed(outcome)
    # The scenario did what it is for: some sagas timed out.
    assert outcome.report.counts.get("valid_commands_refused_as_tolerated", 0) > 0
