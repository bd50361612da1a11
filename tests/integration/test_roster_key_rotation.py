"""Rotating the roster's personal-data key on a running platform: orgs, quota and roster on the
real broker (SQLite and PostgreSQL), the roster restarted with a new key and the old one
retired, as docs/deploy.md describes it."""

from __future__ import annotations

import base64
import json
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import select

from contracts.codes import Category, EntryMethod, ReleaseReason
from contracts.identifiers import compose_citizen_id
from contracts.roster import EnrolPerson, ReleasePerson
from contracts.topics import ROSTER_EVENTS_RESTRICTED
from services.quota.bootstrap import build as build_quota
from services.roster.adapters.orm import people
from services.roster.bootstrap import build as build_roster
from services.roster.domain.personal_data import (
    PersonalDataCipher,
    PersonalDataKeyError,
    key_id_of,
)
from services.runtime.app import ServiceRuntime
from tests.conftest import service_settings, wait_for
from tests.integration.test_roster_flow import (
    CLERK,
    REJECTED,
    approved_orgs,
    done,
    http,
    issued_notice,
)
from tests.support.builders import register_org
from tests.support.databases import database
from tests.support.kafka import CommandClient, read_topic
from tests.support.lifecycle import running

pytestmark = pytest.mark.broker

K1 = bytes(range(32))
K2 = bytes(range(100, 132))


def enrolment(number: str, org_id: object, notice_no: str) -> EnrolPerson:
    return EnrolPerson.model_validate(
        {
            "citizen_id": number,
            "name": "张伟",
            "org_id": org_id,
            "category": Category.ADMIN,
            "notice_no": notice_no,
            "entry_method": EntryMethod.EXAM,
            "effective_date": date(2026, 3, 1),
            "phone": "13800138000",
        }
    )


async def key_ids(roster: ServiceRuntime) -> set[str | None]:
    async with roster.sessions() as session:
        rows = (await session.execute(select(people.c.citizen_enc, people.c.phone_enc))).all()
    return {key_id_of(blob) for row in rows for blob in row if blob is not None}


async def test_a_key_rotated_on_a_running_platform_loses_and_doubles_no_one(
    orgs_service: ServiceRuntime,
    topics: str,
    client: CommandClient,
    db_backend: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    retired = tmp_path / "retired"
    retired.mkdir()
    (retired / "k1.key").write_text(base64.b64encode(K1).decode())
    numbers = [compose_citizen_id("130102", date(1988, 2, 1 + i), 31 + i) for i in range(3)]
    org = register_org()
    async with (
        database(db_backend, tmp_path, "quota") as quota_url,
        database(db_backend, tmp_path, "roster") as roster_url,
    ):
        monkeypatch.setenv("BIANZHI_QUOTA_DATABASE_URL", quota_url)
        monkeypatch.setenv("BIANZHI_ROSTER_DATABASE_URL", roster_url)
        settings = service_settings(tmp_path, topics)

        def roster_with(key: bytes, key_id: str, retired_dir: Path | None) -> ServiceRuntime:
            monkeypatch.setenv("BIANZHI_ROSTER_PERSONAL_DATA_KEY", base64.b64encode(key).decode())
            monkeypatch.setenv("BIANZHI_ROSTER_PERSONAL_DATA_KEY_ID", key_id)
            setting = "BIANZHI_ROSTER_PERSONAL_DATA_RETIRED_KEYS_DIR"
            if retired_dir is None:
                monkeypatch.delenv(setting, raising=False)
            else:
                monkeypatch.setenv(setting, str(retired_dir))
            return build_roster(settings)

        quota = build_quota(settings)
        async with running(quota.app), http(quota) as quota_api:
            # Under k1: two people enrolled.
            first = roster_with(K1, "k1", None)
            async with running(first.app):
                await approved_orgs(client, quota_api, [org], approved=5)
                notice_no = await issued_notice(client, org.org_id, 4)
                for number in numbers[:2]:
                    await done(
                        client, await client.send(enrolment(number, org.org_id, notice_no), **CLERK)
                    )
                assert await key_ids(first) == {"k1"}

            # Restarted with k2 and k1 retired: the old values are re-encrypted in the
            # background while commands go on.
            second = roster_with(K2, "k2", retired)
            async with running(second.app):
                await done(
                    client,
                    await client.send(enrolment(numbers[2], org.org_id, notice_no), **CLERK),
                )
                again = await client.result(
                    await client.send(enrolment(numbers[0], org.org_id, notice_no), **CLERK),
                    timeout=30,
                )
                assert (again.type, again.data["code"]) == (REJECTED, "already_enrolled")

                async def all_under_k2() -> bool:
                    return await key_ids(second) == {"k2"}

                await wait_for(all_under_k2, timeout=30)
                await done(
                    client,
                    await client.send(
                        ReleasePerson(
                            citizen_id=numbers[0],
                            reason=ReleaseReason.RETIRED,
                            effective_date=date(2026, 12, 31),
                        ),
                        **CLERK,
                    ),
                )

                async def restricted() -> list[dict[str, object]]:
                    records = await read_topic(client.bootstrap, ROSTER_EVENTS_RESTRICTED)
                    return [json.loads(r.value) for r in records]

                async def four_out() -> bool:
                    return len(await restricted()) == 4

                await wait_for(four_out, timeout=20)
                # Payroll got every number in full, before the rotation and after it (in order
                # per person; people are keyed to partitions of their own).
                out = await restricted()
                assert sorted((e["type"], e["data"]["citizen_id"]) for e in out) == sorted(
                    [
                        ("bianzhi.roster.PersonEnrolledRestricted.v1", numbers[0]),
                        ("bianzhi.roster.PersonEnrolledRestricted.v1", numbers[1]),
                        ("bianzhi.roster.PersonEnrolledRestricted.v1", numbers[2]),
                        ("bianzhi.roster.PersonReleasedRestricted.v1", numbers[0]),
                    ]
                )
                est = (await quota_api.get(f"/orgs/{org.org_id}/establishment")).json()
                assert [(c["occupied"], c["reserved"]) for c in est["categories"]] == [(2, 1)]
            # Only k2 is needed to read the stored numbers now.
            async with second.sessions() as session:
                rows = (await session.execute(select(people))).all()
            only_k2 = PersonalDataCipher(K2, "k2")
            assert sorted(only_k2.decrypt(r.citizen_enc, context=r.person_id) for r in rows) == (
                sorted(numbers)
            )

            # The blind index was computed with k1: a roster without it does not start.
            third = roster_with(K2, "k2", None)
            with pytest.raises(PersonalDataKeyError, match="computed with personal-data key k1"):
                async with running(third.app):
                    pass
            for rt in (first, second, third):
                await rt.engine.dispose()
                await rt.read_engine.dispose()
