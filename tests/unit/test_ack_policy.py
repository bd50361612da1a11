"""Every subscriber commits only after its work committed (ARCHITECTURE §4, "Acks").

FastStream 0.7 keeps ``ack_policy``, ``group_id`` and the rebalance listener as attributes of the
subscriber and the aiokafka consumer arguments in ``_connection_args``; a broker-level policy
would not reach router subscribers, so the runtime sets them on each one. Nothing here connects
to a broker. What the committer commits, and when, is tested in ``test_offset_committer`` and
through the real broker in ``tests/integration/test_reliability.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from faststream import AckPolicy

from contracts.topics import (
    NOTIFY_COMMANDS,
    ORGS_ANSWERS,
    ORGS_COMMANDS,
    ORGS_EVENTS,
    QUOTA_COMMANDS,
    QUOTA_EVENTS,
    ROSTER_ANSWERS,
    ROSTER_COMMANDS,
    ROSTER_EVENTS,
)
from services.orgs.bootstrap import build, definition
from services.runtime.app import EventSubscription, build_runtime
from services.runtime.offsets import OffsetCommitter
from tests.conftest import service_settings


def subscribers_of(runtime: Any) -> list[Any]:
    subs = list(runtime.broker.subscribers)
    assert subs, "the runtime registered no subscribers"
    return subs


@pytest.fixture
def runtime(tmp_path: Path) -> Any:
    return build(
        service_settings(
            tmp_path, "localhost:1", kafka_group_prefix="bz", kafka_commit_interval_ms=250
        )
    )


@pytest.fixture
def runtime_with_projection(tmp_path: Path) -> Any:
    service = dataclasses.replace(
        definition(), event_subscriptions=(EventSubscription(ORGS_EVENTS, ()),)
    )
    return build_runtime(
        service,
        service_settings(
            tmp_path, "localhost:1", kafka_group_prefix="bz", kafka_commit_interval_ms=250
        ),
    )


@pytest.mark.parametrize("which", ["runtime", "runtime_with_projection"])
def test_every_subscriber_acks_after_the_handler_in_an_explicit_group(
    which: str, request: pytest.FixtureRequest
) -> None:
    for sub in subscribers_of(request.getfixturevalue(which)):
        # Not FastStream's ack after each fetch: the runtime's committer, which the handling
        # of a fetch tells what it finished, and which hears of partitions being taken away.
        assert sub.ack_policy is AckPolicy.MANUAL, sub.topic_names
        assert isinstance(sub._listener, OffsetCommitter), sub.topic_names
        assert sub._listener.interval_s == 0.25, sub.topic_names
        assert isinstance(sub.group_id, str) and sub.group_id, sub.topic_names
        args = sub._connection_args
        # Never committed in the background by the client, which would commit what it handed
        # out, handled or not.
        assert args["enable_auto_commit"] is False, sub.topic_names
        # A new group starts at the beginning: nothing sent before it joined is skipped.
        assert args["auto_offset_reset"] == "earliest", sub.topic_names


def test_groups_are_one_per_service_and_purpose(runtime_with_projection: Any) -> None:
    groups = {tuple(s.topic_names): s.group_id for s in subscribers_of(runtime_with_projection)}
    assert groups == {
        (ORGS_COMMANDS,): "bz-orgs",
        (ORGS_EVENTS,): "bz-orgs-projection",
    }


def test_the_command_subscriber_uses_the_configured_consumer_timings(tmp_path: Path) -> None:
    settings = service_settings(
        tmp_path,
        "localhost:1",
        kafka_session_timeout_ms=3000,
        kafka_heartbeat_interval_ms=1000,
        kafka_command_fetch_max_wait_ms=25,
    )
    (sub,) = [s for s in subscribers_of(build(settings)) if s.topic_names == [ORGS_COMMANDS]]
    args = sub._connection_args
    assert (args["session_timeout_ms"], args["heartbeat_interval_ms"]) == (3000, 1000)
    assert args["fetch_max_wait_ms"] == 25


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        # The roster reads the answers to its enrolment, transfer and release steps with its
        # commands: a saga waits on that fetch as a command does, and a consumer of its own
        # would cost the broker another fetch every few milliseconds. Its orgs events need not
        # be fetched that often.
        (
            "roster",
            {
                (ROSTER_COMMANDS, ROSTER_ANSWERS): ("bz-roster", 7),
                (ORGS_EVENTS,): ("bz-roster-projection", 300),
            },
        ),
        # Orgs' sagas (merge, abolish) are rare: their answers wait with its projections.
        # Quota and notify send no saga steps and only follow other services.
        (
            "orgs",
            {
                (ORGS_COMMANDS,): ("bz-orgs", 7),
                (ORGS_ANSWERS,): ("bz-orgs-projection", 300),
            },
        ),
        (
            "quota",
            {(QUOTA_COMMANDS,): ("bz-quota", 7), (ORGS_EVENTS,): ("bz-quota-projection", 300)},
        ),
        (
            "notify",
            {
                (NOTIFY_COMMANDS,): ("bz-notify", 7),
                (ORGS_EVENTS, QUOTA_EVENTS, ROSTER_EVENTS): ("bz-notify-projection", 300),
            },
        ),
    ],
)
def test_saga_answers_are_fetched_with_the_commands_and_projections_wait_longer(
    tmp_path: Path, service: str, expected: dict[tuple[str, ...], tuple[str, int]]
) -> None:
    import importlib

    settings = service_settings(
        tmp_path,
        "localhost:1",
        kafka_command_fetch_max_wait_ms=7,
        kafka_event_fetch_max_wait_ms=300,
        kafka_group_prefix="bz",
    )
    runtime = importlib.import_module(f"services.{service}.bootstrap").build(settings)
    found = {
        tuple(s.topic_names): (s.group_id, s._connection_args["fetch_max_wait_ms"])
        for s in subscribers_of(runtime)
    }
    assert found == expected


def records(*where: tuple[str, int]) -> list[Any]:
    """A fetch: an empty record at each (topic, offset)."""
    from services.runtime.messaging import RawMessage

    return [
        RawMessage(topic=topic, partition=0, offset=offset, key=None, value=b"")
        for topic, offset in where
    ]


async def test_a_fetch_of_commands_and_answers_is_handled_topic_by_topic_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.roster.bootstrap import build as build_roster
    from services.runtime.messaging import RawMessage

    settings = service_settings(tmp_path, "localhost:1").model_copy(
        update={"fetch_one_transaction": False}
    )
    runtime = build_roster(settings)
    handled: list[tuple[str, list[int]]] = []

    def recorder(name: str, consumer: Any) -> None:
        async def read_fetch(raws: list[RawMessage]) -> list[RawMessage]:
            return list(raws)

        async def handle_items(raws: list[RawMessage]) -> None:
            handled.append((name, [r.offset for r in raws]))

        monkeypatch.setattr(consumer, "read_fetch", read_fetch)
        monkeypatch.setattr(consumer, "handle_items", handle_items)

    recorder("commands", runtime.command_consumer)
    recorder("answers", runtime.projections[ROSTER_ANSWERS])
    (hot,) = [s for s in subscribers_of(runtime) if ROSTER_COMMANDS in s.topic_names]
    fetch = records(
        (ROSTER_COMMANDS, 1),
        (ROSTER_ANSWERS, 10),
        (ROSTER_COMMANDS, 2),
        (ROSTER_ANSWERS, 11),
        (ROSTER_ANSWERS, 12),
    )
    await runtime._consume(fetch)
    # One batch per topic (one transaction each), every record once, in its order.
    assert handled == [("commands", [1, 2]), ("answers", [10, 11, 12])]
    assert hot.topic_names == [ROSTER_COMMANDS, ROSTER_ANSWERS]


async def test_a_fetch_of_commands_and_answers_is_one_transaction_topic_by_topic_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.roster.bootstrap import build as build_roster
    from services.runtime.messaging import RawMessage

    runtime = build_roster(service_settings(tmp_path, "localhost:1"))
    handled: list[tuple[str, list[int], int]] = []
    uows: list[Any] = []

    def recorder(name: str, consumer: Any) -> None:
        async def read_fetch(raws: list[RawMessage]) -> list[RawMessage]:
            return list(raws)

        async def handle_in(uow: Any, items: list[RawMessage]) -> list[str]:
            uows.append(uow)
            handled.append((name, [r.offset for r in items], len(uows)))
            return ["applied"] * len(items)

        monkeypatch.setattr(consumer, "read_fetch", read_fetch)
        monkeypatch.setattr(consumer, "handle_in", handle_in)
        monkeypatch.setattr(consumer, "handled", lambda *_: None)

    recorder("commands", runtime.command_consumer)
    recorder("answers", runtime.projections[ROSTER_ANSWERS])
    fetch = records(
        (ROSTER_ANSWERS, 10), (ROSTER_COMMANDS, 1), (ROSTER_ANSWERS, 11), (ROSTER_COMMANDS, 2)
    )
    try:
        await runtime._consume(fetch)
    finally:
        await runtime.engine.dispose()
        await runtime.read_engine.dispose()
    # One batch per topic, in the order the topics came, every record once, in its order; both
    # in the same unit of work.
    assert [(name, offsets) for name, offsets, _ in handled] == [
        ("answers", [10, 11]),
        ("commands", [1, 2]),
    ]
    assert uows[0] is uows[1]
