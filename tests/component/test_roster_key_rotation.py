"""Rotating the roster's personal-data key, and the check of its keys at start, without Kafka
(SQLite and PostgreSQL): quota and roster wired by hand as in ``test_roster_sagas``."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, update
from structlog.testing import capture_logs

from contracts.codes import ReleaseReason
from contracts.envelope import Envelope
from contracts.roster import ReleasePerson, UpdatePerson
from contracts.topics import ROSTER_EVENTS_RESTRICTED
from services.quota.bootstrap import build as build_quota
from services.roster.adapters.orm import people, personal_data_keys
from services.roster.bootstrap import build as build_roster
from services.roster.domain.personal_data import (
    PersonalDataCipher,
    PersonalDataKeyError,
    key_id_of,
)
from services.roster.service_layer.keys import (
    check_personal_data_keys,
    reencrypt_all,
    reencrypt_personal_data,
)
from services.runtime.app import ServiceRuntime
from services.runtime.sealing import SEALED_HEADER
from tests.component.test_orgs_handlers import DeadLetters
from tests.component.test_roster_sagas import COMPLETED, Platform, citizen, enrol
from tests.conftest import service_settings
from tests.support.databases import database
from tests.support.lifecycle import running

K1 = bytes(range(32))
K2 = bytes(range(32, 64))
K1_TEXT = base64.b64encode(K1).decode()
K2_TEXT = base64.b64encode(K2).decode()


class Roster:
    """Builds roster runtimes on one database with the personal-data keys of the moment."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        self.built: list[ServiceRuntime] = []

    def build(self, key: str, key_id: str, retired: dict[str, str] | None = None) -> ServiceRuntime:
        self.monkeypatch.setenv("BIANZHI_ROSTER_PERSONAL_DATA_KEY", key)
        self.monkeypatch.setenv("BIANZHI_ROSTER_PERSONAL_DATA_KEY_ID", key_id)
        if retired is None:
            self.monkeypatch.delenv("BIANZHI_ROSTER_PERSONAL_DATA_RETIRED_KEYS_DIR", raising=False)
        else:
            directory = self.tmp_path / f"retired-{len(self.built)}"
            directory.mkdir()
            for kid, text in retired.items():
                (directory / f"{kid}.key").write_text(text)
            self.monkeypatch.setenv("BIANZHI_ROSTER_PERSONAL_DATA_RETIRED_KEYS_DIR", str(directory))
        rt = build_roster(service_settings(self.tmp_path, "localhost:1", log_level="INFO"))
        rt.command_consumer.dead_letter = DeadLetters()
        self.built.append(rt)
        return rt


@pytest.fixture
async def keys(
    db_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Platform, Roster]]:
    async with (
        database(db_backend, tmp_path, "quota") as quota_url,
        database(db_backend, tmp_path, "roster") as roster_url,
    ):
        monkeypatch.setenv("BIANZHI_QUOTA_DATABASE_URL", quota_url)
        monkeypatch.setenv("BIANZHI_ROSTER_DATABASE_URL", roster_url)
        quota = build_quota(service_settings(tmp_path, "localhost:1"))
        quota.command_consumer.dead_letter = DeadLetters()
        await quota.migrate()
        rosters = Roster(tmp_path, monkeypatch)
        first = rosters.build(K1_TEXT, "k1")
        await first.migrate()
        await check_personal_data_keys(first)
        try:
            yield Platform(quota, first), rosters
        finally:
            for rt in (quota, *rosters.built):
                await rt.engine.dispose()
                await rt.read_engine.dispose()


def switched(platform: Platform, roster: ServiceRuntime) -> Platform:
    """``platform`` with ``roster`` in place of its roster (what was carried stays carried)."""
    moved = Platform(platform.quota, roster)
    moved.carried = platform.carried
    return moved


async def stored(rt: ServiceRuntime) -> list[Any]:
    async with rt.sessions() as session:
        return list((await session.execute(select(people).order_by(people.c.person_id))).all())


async def sealed_rows(rt: ServiceRuntime) -> list[Any]:
    outbox = rt.definition.tables.outbox
    async with rt.sessions() as session:
        query = select(outbox).where(outbox.c.topic == ROSTER_EVENTS_RESTRICTED)
        return list((await session.execute(query.order_by(outbox.c.seq))).all())


def keys_of(rows: list[Any]) -> list[tuple[str | None, str | None]]:
    return [
        (key_id_of(r.citizen_enc), key_id_of(r.phone_enc) if r.phone_enc else None) for r in rows
    ]


async def enrolled(platform: Platform, places: int = 1) -> tuple[Any, str, str]:
    """A new org with a notice of ``places``, and one person enrolled in it: the org's id, the
    person's number and person id."""
    org_id = await platform.org()
    number = citizen()
    cmd = await platform.send(enrol(number, org_id, await platform.notice(org_id, places)))
    result = await platform.result(platform.roster, cmd.id)
    assert result.type == COMPLETED, result.data
    return org_id, number, result.data["subject"]


async def test_a_rotated_key_encrypts_what_comes_and_the_old_values_are_reencrypted(
    keys: tuple[Platform, Roster],
) -> None:
    platform, rosters = keys
    org_id = await platform.org()
    notice_no = await platform.notice(org_id, 4)
    numbers = [citizen() for _ in range(3)]
    ids = {}
    for number in numbers[:2]:
        cmd = await platform.send(enrol(number, org_id, notice_no))
        ids[number] = (await platform.result(platform.roster, cmd.id)).data["subject"]
    assert keys_of(await stored(platform.roster)) == [("k1", "k1")] * 2
    assert {r.headers[SEALED_HEADER] for r in await sealed_rows(platform.roster)} == {
        "roster-personal-data:k1"
    }

    # The new key k2 encrypts; k1 is retired and still opens what it encrypted.
    rotated = rosters.build(K2_TEXT, "k2", retired={"k1": K1_TEXT})
    await check_personal_data_keys(rotated)
    platform = switched(platform, rotated)
    cmd = await platform.send(enrol(numbers[2], org_id, notice_no))
    ids[numbers[2]] = (await platform.result(rotated, cmd.id)).data["subject"]
    # The first person's phone changes before the walk: it is read under k1, written under k2.
    update = await platform.send(UpdatePerson(citizen_id=numbers[0], phone="13900139000"))
    assert (await platform.result(rotated, update.id)).type == COMPLETED
    # The stored blind index still finds the people enrolled under k1.
    again = await platform.send(enrol(numbers[1], org_id, notice_no))
    assert (await platform.result(rotated, again.id)).data["code"] == "already_enrolled"
    before = {r.person_id: keys_of([r])[0] for r in await stored(rotated)}
    assert before == {
        ids[numbers[0]]: ("k1", "k2"),
        ids[numbers[1]]: ("k1", "k1"),
        ids[numbers[2]]: ("k2", "k2"),
    }

    progress = await reencrypt_all(rotated)
    assert (progress.people_seen, progress.people_reencrypted) == (3, 2)
    assert progress.outbox_resealed == 2 and not progress.unopenable
    after = await stored(rotated)
    assert keys_of(after) == [("k2", "k2")] * 3
    # Nothing else in the rows moved, and only the new key is needed to read them now.
    only_new = PersonalDataCipher(K2, "k2")
    by_id = {r.person_id: r for r in after}
    for number, person_id in ids.items():
        row = by_id[person_id]
        assert only_new.decrypt(row.citizen_enc, context=person_id) == number
        assert row.citizen_index == PersonalDataCipher(K1, "k1").blind_index(number)
    assert only_new.decrypt(by_id[ids[numbers[0]]].phone_enc, context=ids[numbers[0]]) == (
        "13900139000"
    )
    restricted = await sealed_rows(rotated)
    assert {r.headers[SEALED_HEADER] for r in restricted} == {"roster-personal-data:k2"}
    opened = [
        Envelope.from_bytes(only_new.unseal(r.value, ROSTER_EVENTS_RESTRICTED)) for r in restricted
    ]
    assert sorted(
        e.data["citizen_id"] for e in opened if e.type.endswith("PersonEnrolledRestricted.v1")
    ) == sorted(numbers)
    # A second walk finds nothing to do.
    again_walked = await reencrypt_all(rotated)
    assert (again_walked.people_reencrypted, again_walked.outbox_resealed) == (0, 0)
    assert again_walked.people_seen == 3

    # A release after the walk publishes the full number, opened with the current key.
    release = await platform.send(
        ReleasePerson(
            citizen_id=numbers[1], reason=ReleaseReason.RETIRED, effective_date=date(2026, 6, 30)
        )
    )
    assert (await platform.result(rotated, release.id)).type == COMPLETED
    last = (await sealed_rows(rotated))[-1]
    event = Envelope.from_bytes(only_new.unseal(last.value, ROSTER_EVENTS_RESTRICTED))
    assert event.type.endswith("PersonReleasedRestricted.v1")
    assert event.data["citizen_id"] == numbers[1]

    # The blind index was computed with k1: without it the roster cannot look anyone up.
    without_k1 = rosters.build(K2_TEXT, "k2")
    with pytest.raises(PersonalDataKeyError, match="computed with personal-data key k1"):
        await check_personal_data_keys(without_k1)


async def test_the_background_walk_runs_only_while_retired_keys_are_held(
    keys: tuple[Platform, Roster],
) -> None:
    platform, rosters = keys
    await enrolled(platform)
    # No retired key: nothing to walk for.
    await reencrypt_personal_data(platform.roster)
    assert keys_of(await stored(platform.roster)) == [("k1", "k1")]
    rotated = rosters.build(K2_TEXT, "k2", retired={"k1": K1_TEXT})
    await check_personal_data_keys(rotated)
    with capture_logs() as logs:
        await reencrypt_personal_data(rotated)
    assert keys_of(await stored(rotated)) == [("k2", "k2")]
    (done,) = [e for e in logs if e["event"].startswith("personal data re-encrypted")]
    assert (done["people_reencrypted"], done["retired_keys"]) == (1, ["k1"])
    # That is recorded: the next start under k2 does not walk again.
    restarted = rosters.build(K2_TEXT, "k2", retired={"k1": K1_TEXT})
    with capture_logs() as logs:
        await reencrypt_personal_data(restarted)
    assert [e["event"] for e in logs] == [
        "personal data is all under the current key: nothing to re-encrypt"
    ]
    # A new current key walks again.
    k3 = rosters.build(
        base64.b64encode(bytes(range(64, 96))).decode(),
        "k3",
        retired={"k1": K1_TEXT, "k2": K2_TEXT},
    )
    await reencrypt_personal_data(k3)
    assert keys_of(await stored(k3)) == [("k3", "k3")]


async def test_values_under_a_key_no_longer_held_are_reported_not_lost(
    keys: tuple[Platform, Roster],
) -> None:
    platform, rosters = keys
    org_id, _, _ = await enrolled(platform)
    # k2 came and went: its values stay, but with k3 current and only k1 retired nobody
    # can open them. The walk passes them over and says so; it does not stop at them.
    k2 = rosters.build(K2_TEXT, "k2", retired={"k1": K1_TEXT})
    await check_personal_data_keys(k2)
    platform = switched(platform, k2)
    second = citizen()
    cmd = await platform.send(enrol(second, org_id, await platform.notice(org_id, 1)))
    assert (await platform.result(k2, cmd.id)).type == COMPLETED
    k3_text = base64.b64encode(bytes(range(64, 96))).decode()
    k3 = rosters.build(k3_text, "k3", retired={"k1": K1_TEXT})
    with capture_logs() as logs:
        await reencrypt_personal_data(k3)
    assert sorted(keys_of(await stored(k3))) == [("k2", "k2"), ("k3", "k3")]
    (report,) = [e for e in logs if e["log_level"] == "error"]
    assert report["event"].startswith("personal data under keys that are not configured")
    # The person enrolled under k2, and the sealed outbox row of their restricted event.
    assert (report["keys"], report["people_reencrypted"]) == ({"k2": 2}, 1)
    # Not recorded as done: with k2 given back, the next start walks again and finishes.
    k3_again = rosters.build(k3_text, "k3", retired={"k1": K1_TEXT, "k2": K2_TEXT})
    await reencrypt_personal_data(k3_again)
    assert keys_of(await stored(k3_again)) == [("k3", "k3")] * 2


async def test_the_roster_refuses_to_start_with_a_key_that_does_not_fit_its_data(
    keys: tuple[Platform, Roster],
) -> None:
    platform, rosters = keys
    await enrolled(platform)
    # Another key given the id of the one that encrypted the data: with it, the same number
    # would hash to an index nobody has, and could be enrolled twice. The start stops first,
    # before the service reads a message.
    impostor = rosters.build(K2_TEXT, "k1")
    with pytest.raises(PersonalDataKeyError, match="does not open with the key configured as k1"):
        async with running(impostor.app):
            pass
    # Retired keys do not change which key computes the index.
    swapped = rosters.build(K2_TEXT, "k2", retired={"k1": K2_TEXT})
    with pytest.raises(PersonalDataKeyError, match="configured as k1"):
        await check_personal_data_keys(swapped)


async def test_the_first_start_records_the_key_the_stored_index_was_computed_with(
    keys: tuple[Platform, Roster],
) -> None:
    platform, rosters = keys
    # The fixture's start on an empty roster recorded its current key.
    async with platform.roster.sessions() as session:
        recorded = (await session.execute(select(personal_data_keys))).all()
    assert [(r.purpose, r.key_id) for r in recorded] == [("blind_index", "k1")]
    org_id, number, _ = await enrolled(platform, places=2)
    # A roster upgraded from before the record, started after a rotation: the stored numbers
    # tell which key computed their index, and that is what is recorded.
    async with platform.roster.sessions() as session:
        await session.execute(delete(personal_data_keys))
        await session.commit()
    rotated = rosters.build(K2_TEXT, "k2", retired={"k1": K1_TEXT})
    await check_personal_data_keys(rotated)
    assert rotated.definition.uow_class.cipher.index_key_id == "k1"  # type: ignore[union-attr]
    async with rotated.sessions() as session:
        recorded = (await session.execute(select(personal_data_keys))).all()
    assert [(r.purpose, r.key_id) for r in recorded] == [("blind_index", "k1")]
    again = await switched(platform, rotated).send(enrol(number, org_id, "冀编用〔2026〕x号"))
    assert (await platform.result(rotated, again.id)).data["code"] == "already_enrolled"


async def test_a_change_made_while_the_walk_computes_a_page_is_kept(
    keys: tuple[Platform, Roster],
) -> None:
    platform, rosters = keys
    _, number, person_id = await enrolled(platform)
    rotated = rosters.build(K2_TEXT, "k2", retired={"k1": K1_TEXT})
    await check_personal_data_keys(rotated)
    cipher = rotated.definition.uow_class.cipher
    assert cipher is not None
    # The walk reads the page and computes its new values; before it takes the lock to write
    # them, a handler writes the person's new phone number (under k2, as handlers do).
    real_uow = rotated.uow
    changes = 0

    def uow_after_a_change() -> Any:
        async def change() -> None:
            nonlocal changes
            changes += 1
            if changes > 1:  # once, before the first write transaction
                return
            async with rotated.sessions() as session:
                await session.execute(
                    update(people)
                    .where(people.c.person_id == person_id)
                    .values(phone_enc=cipher.encrypt("13900139000", context=person_id))
                )
                await session.commit()

        class After:
            async def __aenter__(self) -> Any:
                await change()
                self.uow = real_uow()
                return await self.uow.__aenter__()

            async def __aexit__(self, *exc: Any) -> Any:
                return await self.uow.__aexit__(*exc)

        return After()

    rotated.uow = uow_after_a_change  # type: ignore[method-assign]
    progress = await reencrypt_all(rotated)
    assert progress.people_reencrypted == 1
    (row,) = await stored(rotated)
    assert keys_of([row]) == [("k2", "k2")]
    # The walk wrote the new number, not the old one it had computed.
    assert cipher.decrypt(row.phone_enc, context=person_id) == "13900139000"
    assert cipher.decrypt(row.citizen_enc, context=person_id) == number
