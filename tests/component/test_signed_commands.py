"""Signed commands and the audit chain inside a running service (SQLite and PostgreSQL).

The orgs service is built by its composition root with signatures required: every command it
answers — completed, rejected or refused for its signature — is one entry of its audit chain,
written in the transaction of the answer; a refused command changes nothing else.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import MetaData, func, select

from contracts.audit import OrgsAuditCheckpoint
from contracts.base import Message
from contracts.envelope import Envelope, new_id
from contracts.orgs import RenameOrg
from contracts.topics import (
    COMMAND_RESULTS,
    ORGS_COMMANDS,
    ORGS_EVENTS,
    QUOTA_COMMANDS,
    ROSTER_COMMANDS,
)
from services.cli.keys import create_key
from services.orgs.adapters.orm import orgs
from services.orgs.bootstrap import build
from services.quota.bootstrap import build as build_quota
from services.roster.bootstrap import build as build_roster
from services.runtime import metrics
from services.runtime.app import ServiceRuntime
from services.runtime.audit import AuditLog, AuditRecord, audit_table, verify, verify_checkpoint
from services.runtime.signing import (
    b64url_decode,
    load_private_key,
    load_public_keys,
    sign_envelope,
)
from services.runtime.uow import COMMAND_TOPICS
from tests.component.test_orgs_handlers import DOC, envelope, record
from tests.component.test_roster_sagas import (
    APPROVER,
    CLERK,
    Platform,
    citizen,
    enrol,
    raw,
)
from tests.conftest import service_settings
from tests.support.builders import register_org
from tests.support.databases import database

KID = "portal-2026"
AUDIT_KID = "orgs-audit-2026"
REJECTED = "bianzhi.CommandRejected.v1"
COMPLETED = "bianzhi.CommandCompleted.v1"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    create_key(directory, KID)
    create_key(directory, AUDIT_KID)
    return directory


@pytest.fixture
async def signed(
    db_url: str, tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    monkeypatch.setenv("BIANZHI_ORGS_DATABASE_URL", db_url)
    # What a deployment sets (deploy/k8s): read by the runtime as SecuritySettings.
    for name, value in {
        "REQUIRE_SIGNATURES": "true",
        "SIGNING_PUBLIC_KEYS": str(keys),
        "AUDIT_CHECKPOINT_EVERY": "3",
        "AUDIT_SIGNING_PRIVATE_KEY": str(keys / f"{AUDIT_KID}.key.pem"),
        "AUDIT_SIGNING_KID": AUDIT_KID,
    }.items():
        monkeypatch.setenv(f"BIANZHI_{name}", value)
    rt = build(service_settings(tmp_path, "localhost:1"))
    assert rt.verifier is not None and rt.security.audit_checkpoint_every == 3
    await rt.migrate()
    try:
        yield rt
    finally:
        await rt.engine.dispose()
        await rt.read_engine.dispose()


def private(keys: Path, kid: str = KID) -> Ed25519PrivateKey:
    return load_private_key(keys / f"{kid}.key.pem")


def signed_env(keys: Path, payload: Any = None, **kw: Any) -> Envelope:
    env = envelope(payload or register_org(), **kw)
    return sign_envelope(env, private(keys), KID, 300)


async def answer(rt: ServiceRuntime, env: Envelope) -> list[Envelope]:
    await rt.command_consumer.process(record(env.to_bytes(), (env.subject or env.id).encode()))
    return await results(rt, env.id)


async def results(rt: ServiceRuntime, command_id: str) -> list[Envelope]:
    outbox = rt.definition.tables.outbox
    query = select(outbox.c.value).where(
        outbox.c.topic == COMMAND_RESULTS, outbox.c.key == command_id
    )
    async with rt.sessions() as session:
        return [Envelope.from_bytes(v) for v in (await session.execute(query)).scalars()]


async def chain(rt: ServiceRuntime) -> list[AuditRecord]:
    async with rt.engine.connect() as conn:
        return await AuditLog(audit_table(MetaData())).records(conn)


async def org_count(rt: ServiceRuntime) -> int:
    async with rt.sessions() as session:
        return int((await session.execute(select(func.count()).select_from(orgs))).scalar_one())


async def test_a_signed_command_completes_and_is_audited(
    signed: ServiceRuntime, keys: Path
) -> None:
    env = signed_env(keys)
    (res,) = await answer(signed, env)
    assert res.type == COMPLETED, res.data
    (entry,) = await chain(signed)
    assert (entry.seq, entry.entry.message_id, entry.entry.type) == (1, env.id, env.type)
    assert (entry.entry.outcome, entry.entry.code) == ("completed", None)
    assert (entry.entry.actor_id, entry.entry.actor_region) == (env.actorid, env.actorregion)
    assert entry.entry.subject == env.subject and entry.entry.service == "orgs"


def _unsigned(keys: Path) -> Envelope:
    return envelope(register_org())


def _expired(keys: Path) -> Envelope:
    env = envelope(register_org())
    return sign_envelope(env, private(keys), KID, 300, now=1_000_000_000)


def _unknown_kid(keys: Path) -> Envelope:
    return sign_envelope(envelope(register_org()), Ed25519PrivateKey.generate(), "stranger", 300)


def _wrong_key(keys: Path) -> Envelope:
    # Signed with the audit key but naming the portal's kid.
    return sign_envelope(envelope(register_org()), private(keys, AUDIT_KID), KID, 300)


def _replayed_with_another_body(keys: Path) -> Envelope:
    env = signed_env(keys)
    other = register_org(name="石家庄市长安区审计局")
    return env.model_copy(update={"data": other.model_dump(mode="json", exclude_none=True)})


def _another_actor(keys: Path) -> Envelope:
    return signed_env(keys).model_copy(update={"actorregion": "110000"})


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_unsigned, "missing"),
        (_expired, "expired"),
        (_unknown_kid, "unknown_kid"),
        (_wrong_key, "bad_signature"),
        (_replayed_with_another_body, "data_digest_mismatch"),
        (_another_actor, "actor_mismatch"),
    ],
)
async def test_a_refused_signature_is_forbidden_audited_and_changes_nothing(
    signed: ServiceRuntime, keys: Path, make: Any, reason: str
) -> None:
    refused = metrics.SIGNATURES_REFUSED.labels("orgs", reason)
    before = refused._value.get()
    env = make(keys)
    (res,) = await answer(signed, env)
    assert res.type == REJECTED
    assert (res.data["code"], res.data["details"]["reason"]) == ("forbidden", reason)
    assert await org_count(signed) == 0
    outbox = signed.definition.tables.outbox
    async with signed.sessions() as session:
        topics = set((await session.execute(select(outbox.c.topic))).scalars())
    assert topics == {COMMAND_RESULTS}  # no event: nothing happened
    (entry,) = await chain(signed)
    assert (entry.entry.message_id, entry.entry.outcome, entry.entry.code) == (
        env.id,
        "forbidden",
        "forbidden",
    )
    assert refused._value.get() == before + 1


async def test_a_resent_command_gets_its_stored_result_and_one_audit_entry(
    signed: ServiceRuntime, keys: Path
) -> None:
    env = signed_env(keys)
    await answer(signed, env)
    again = await answer(signed, env)
    assert [r.type for r in again] == [COMPLETED, COMPLETED]
    assert again[0].id == again[1].id
    assert [r.entry.message_id for r in await chain(signed)] == [env.id]
    assert await org_count(signed) == 1


async def test_a_fetch_of_mixed_commands_is_audited_in_order_with_each_outcome(
    signed: ServiceRuntime, keys: Path
) -> None:
    first = signed_env(keys)
    unsigned = _unsigned(keys)
    rename = signed_env(
        keys,
        RenameOrg(
            org_id=uuid.UUID(first.subject or ""), name="石家庄市长安区财政事务局", document=DOC
        ),
    )
    outside = signed_env(keys, register_org(division_code="110101"))  # Beijing, not Hebei
    batch = [first, unsigned, rename, outside]
    await signed.command_consumer.process_batch(
        [record(e.to_bytes(), (e.subject or e.id).encode()) for e in batch]
    )
    records = await chain(signed)
    assert verify(records) is None
    assert {r.entry.message_id: (r.entry.outcome, r.entry.code) for r in records} == {
        first.id: ("completed", None),
        unsigned.id: ("forbidden", "forbidden"),
        rename.id: ("completed", None),
        outside.id: ("forbidden", "forbidden"),
    }
    assert [r.seq for r in records] == [1, 2, 3, 4]


async def test_every_third_entry_emits_a_checkpoint_signed_with_the_audit_key(
    signed: ServiceRuntime, keys: Path
) -> None:
    for _ in range(7):
        await answer(signed, signed_env(keys) if _ % 2 else _unsigned(keys))
    records = await chain(signed)
    outbox = signed.definition.tables.outbox
    query = select(outbox.c.value).where(
        outbox.c.topic == ORGS_EVENTS, outbox.c.message_type == OrgsAuditCheckpoint.TYPE
    )
    async with signed.sessions() as session:
        rows = (await session.execute(query)).scalars().all()
    checkpoints = [OrgsAuditCheckpoint.model_validate(Envelope.from_bytes(v).data) for v in rows]
    assert [(c.head_seq, c.head_hash) for c in checkpoints] == [
        (3, records[2].hash),
        (6, records[5].hash),
    ]
    public = load_public_keys(keys)
    assert all(verify_checkpoint(c, public) for c in checkpoints)
    assert verify(records, expected_head=(6, checkpoints[-1].head_hash)) is None


async def test_without_required_signatures_commands_are_still_audited(runtime: Any) -> None:
    # The default runtime fixture: signatures off, the chain kept all the same.
    env = envelope(register_org())
    await answer(runtime, env)
    await answer(runtime, envelope(register_org(), actorroles="clerk"))  # needs an approver
    records = await chain(runtime)
    assert [(r.entry.outcome, r.entry.code) for r in records] == [
        ("completed", None),
        ("forbidden", "forbidden"),
    ]


def test_a_service_with_a_signing_key_signs_only_the_commands_it_sends(
    tmp_path: Path, keys: Path
) -> None:
    from services.runtime.uow import UnitOfWork

    key = private(keys)
    calls: list[str] = []

    def signer(env: Envelope) -> Envelope:
        calls.append(env.type)
        return sign_envelope(env, key, KID, 300)

    uow = UnitOfWork(None, None, signer=signer)  # type: ignore[arg-type]
    command = envelope(register_org())
    uow.stage(command, ORGS_COMMANDS, command.subject)
    event = Envelope.model_validate({**command.model_dump(), "id": new_id(), "type": "x.y.Z.v1"})
    uow.stage(event, ORGS_EVENTS, event.subject)
    uow.stage(event, COMMAND_RESULTS, event.id)
    assert ORGS_COMMANDS in COMMAND_TOPICS
    sent, *rest = [Envelope.from_bytes(row["value"]) for row in uow.staged]
    assert calls == [command.type]
    assert sent.authorization and all(e.authorization is None for e in rest)


# --- saga steps between services ----------------------------------------------------------


class SignedPlatform(Platform):
    """Quota and roster with signatures required; the front-end signs with the portal key."""

    key: Ed25519PrivateKey

    async def quota_command(self, payload: Message) -> None:
        env = sign_envelope(payload.envelope(source="/tests", **APPROVER), self.key, KID, 300)
        await self.quota.command_consumer.process(raw(QUOTA_COMMANDS, env))
        res = await self.result(self.quota, env.id)
        assert res.type == COMPLETED, res.data
        await self._uncarried(self.quota, COMMAND_RESULTS)

    async def send(self, payload: Message, *, pump: bool = True, **actor: Any) -> Envelope:
        env = payload.envelope(source="/tests", **{**CLERK, **actor})
        env = sign_envelope(env, self.key, KID, 300)
        await self.roster.command_consumer.process(raw(ROSTER_COMMANDS, env))
        if pump:
            await self.pump()
        return env


@pytest.fixture
async def signed_platform(
    db_backend: str, tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[SignedPlatform]:
    create_key(keys, "roster-2026")
    for name, value in {
        "REQUIRE_SIGNATURES": "true",
        "SIGNING_PUBLIC_KEYS": str(keys),
        # The roster signs the slot requests it sends quota with a key of its own.
        "SIGNING_PRIVATE_KEY": str(keys / "roster-2026.key.pem"),
        "SIGNING_KID": "roster-2026",
        "ROSTER_PERSONAL_DATA_KEY": "ZJf0X1H4l8b3z0uJ6Q8p0Q2n4d6f8h0j2l4n6p8r0t0=",
    }.items():
        monkeypatch.setenv(f"BIANZHI_{name}", value)
    async with (
        database(db_backend, tmp_path, "quota") as quota_url,
        database(db_backend, tmp_path, "roster") as roster_url,
    ):
        monkeypatch.setenv("BIANZHI_QUOTA_DATABASE_URL", quota_url)
        monkeypatch.setenv("BIANZHI_ROSTER_DATABASE_URL", roster_url)
        settings = service_settings(tmp_path, "localhost:1")
        quota, roster = build_quota(settings), build_roster(settings)
        for rt in (quota, roster):
            await rt.migrate()
        platform = SignedPlatform(quota, roster)
        platform.key = private(keys)
        try:
            yield platform
        finally:
            for rt in (quota, roster):
                await rt.engine.dispose()
                await rt.read_engine.dispose()


async def test_saga_steps_are_signed_by_the_roster_and_accepted_by_quota(
    signed_platform: SignedPlatform, keys: Path
) -> None:
    p = signed_platform
    org_id = await p.org()
    notice_no = await p.notice(org_id, 2)
    cmd = await p.send(enrol(citizen(), org_id, notice_no))
    res = await p.result(p.roster, cmd.id)
    assert res.type == COMPLETED, res.data
    assert await p.counts(org_id) == (5, 1, 1)
    # The slot request in the roster's outbox carries the roster's own valid token.
    (step,) = await p.outbox(p.roster, QUOTA_COMMANDS)
    assert p.quota.verifier is not None and p.quota.verifier.verify(step) is None
    assert step.authorization is not None and "roster-2026" in str(_header(step.authorization))
    # Both services audited what they answered, each in its own chain.
    quota_chain = await chain(p.quota)
    roster_chain = await chain(p.roster)
    assert [r.entry.type for r in quota_chain][-1] == "bianzhi.quota.OccupySlot.v1"
    assert [(r.entry.type, r.entry.outcome) for r in roster_chain] == [
        ("bianzhi.roster.EnrolPerson.v1", "completed")
    ]
    assert verify(quota_chain) is None and verify(roster_chain) is None


async def test_an_unsigned_saga_step_is_refused_by_quota_and_the_enrolment_ends_refused(
    signed_platform: SignedPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = signed_platform
    org_id = await p.org()
    notice_no = await p.notice(org_id, 2)
    monkeypatch.setattr(p.roster, "signer", None)  # a roster without its key
    cmd = await p.send(enrol(citizen(), org_id, notice_no))
    res = await p.result(p.roster, cmd.id)
    assert res.type == REJECTED and res.data["code"] == "forbidden", res.data
    assert await p.counts(org_id) == (5, 0, 2)  # both places still reserved by the notice
    (entry,) = await chain(p.roster)
    assert (entry.entry.outcome, entry.entry.code) == ("forbidden", "forbidden")


def _header(token: str) -> dict[str, Any]:
    return json.loads(b64url_decode(token.split(".")[0]))
