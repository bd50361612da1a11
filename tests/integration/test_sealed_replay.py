"""`bianzhi replay roster` after a broker loss: the restricted events the roster keeps sealed in
its outbox go out opened, and a roster key that does not open them stops the replay with one
line instead of publishing sealed bytes (SQLite and PostgreSQL, the real broker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts.envelope import Envelope
from contracts.roster import PersonEnrolledRestricted
from contracts.topics import ROSTER_EVENTS_RESTRICTED
from services.cli.common import CliError
from services.cli.replay import replay_service
from services.cli.up import BEGINNING_OF_TIME
from services.roster.bootstrap import build as build_roster
from services.runtime.sealing import SEALED_HEADER
from tests.conftest import service_settings
from tests.contract.examples import EVENT_EXAMPLES
from tests.support.databases import database
from tests.support.kafka import read_topic

pytestmark = pytest.mark.broker

KEY = "ZJf0X1H4l8b3z0uJ6Q8p0Q2n4d6f8h0j2l4n6p8r0t0="
OTHER_KEY = "AAf0X1H4l8b3z0uJ6Q8p0Q2n4d6f8h0j2l4n6p8r0t0="


async def test_replay_publishes_sealed_rows_opened_and_refuses_a_wrong_key(
    topics: str, db_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with database(db_backend, tmp_path, "roster") as url:
        monkeypatch.setenv("BIANZHI_ROSTER_DATABASE_URL", url)
        monkeypatch.setenv("BIANZHI_ROSTER_PERSONAL_DATA_KEY", KEY)
        settings = service_settings(tmp_path, topics)
        roster = build_roster(settings)
        await roster.migrate()
        event = PersonEnrolledRestricted.model_validate(
            EVENT_EXAMPLES[PersonEnrolledRestricted.TYPE]
        )
        env = event.envelope(source="/tests", actorid="li.na", actorregion="130000")
        try:
            async with roster.uow() as uow:
                uow.stage(env, ROSTER_EVENTS_RESTRICTED, env.subject)
                await uow.commit()
            async with roster.sessions() as session:
                (row,) = (await session.execute(roster.definition.tables.outbox.select())).all()
            assert SEALED_HEADER in row.headers and event.citizen_id.encode() not in row.value
        finally:
            await roster.engine.dispose()
            await roster.read_engine.dispose()

        assert await replay_service("roster", settings, BEGINNING_OF_TIME) == 1
        (record,) = await read_topic(topics, ROSTER_EVENTS_RESTRICTED)
        assert Envelope.from_bytes(record.value) == env
        assert SEALED_HEADER not in {k for k, _ in record.headers}

        # A roster key that is not the one the rows were sealed with publishes nothing.
        monkeypatch.setenv("BIANZHI_ROSTER_PERSONAL_DATA_KEY", OTHER_KEY)
        with pytest.raises(CliError, match="does not open with the key given"):
            await replay_service("roster", settings, BEGINNING_OF_TIME)
        assert len(await read_topic(topics, ROSTER_EVENTS_RESTRICTED)) == 1
