"""The audit chain on SQLite and PostgreSQL: appends, concurrency, tampering, checkpoints, CLI."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import MetaData, Table, delete, event, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.audit import OrgsAuditCheckpoint
from contracts.envelope import Envelope
from contracts.orgs import RegisterOrg
from contracts.topics import ORGS_EVENTS
from services.cli.keys import create_key
from services.cli.main import main
from services.runtime.app import ServiceRuntime
from services.runtime.audit import (
    GENESIS,
    AuditEntry,
    AuditLog,
    AuditRecord,
    CommandAuditor,
    audit_table,
    command_auditor,
    entry_hash,
    outcome_of,
    verify,
    verify_checkpoint,
)
from services.runtime.db import create_engine, session_factory
from services.runtime.security_settings import SecuritySettings
from services.runtime.signing import load_public_keys
from tests.contract.examples import EXAMPLES

KEY = Ed25519PrivateKey.generate()


@pytest.fixture
async def chain(db_url: str) -> AsyncIterator[tuple[AsyncEngine, Table]]:
    engine = create_engine(db_url)
    metadata = MetaData()
    table = audit_table(metadata)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    try:
        yield engine, table
    finally:
        await engine.dispose()


def command(n: int, *, roles: str = "approver") -> Envelope:
    data = {**EXAMPLES[RegisterOrg.TYPE], "name": f"石家庄市长安区第{n}局"}
    return RegisterOrg.model_validate(data).envelope(
        source="/frontends/test", actorid=f"user.{n}", actorregion="130100", actorroles=roles
    )


def entries(count: int, start: int = 0) -> list[AuditEntry]:
    codes = [None, "forbidden", "no_vacancy"]
    return [
        AuditEntry.of_command(command(i), service="orgs", code=codes[i % 3])
        for i in range(start, start + count)
    ]


async def append(engine: AsyncEngine, table: Table, batch: list[AuditEntry]) -> list[AuditRecord]:
    async with session_factory(engine)() as session:
        records = await AuditLog(table).append(session, batch)
        await session.commit()
    return records


async def append_on_connection(
    engine: AsyncEngine, table: Table, batch: list[AuditEntry]
) -> list[AuditRecord]:
    async with engine.begin() as conn:
        return await AuditLog(table).append(conn, batch)


async def stored(engine: AsyncEngine, table: Table) -> list[AuditRecord]:
    async with engine.connect() as conn:
        return await AuditLog(table).records(conn)


async def rows(engine: AsyncEngine, table: Table) -> dict[int, dict[str, Any]]:
    async with engine.connect() as conn:
        result = await conn.execute(select(table))
        return {r["seq"]: dict(r) for r in result.mappings()}


# --- appending ----------------------------------------------------------------------------


async def test_appended_entries_form_an_intact_chain(chain: tuple[AsyncEngine, Table]) -> None:
    engine, table = chain
    written = await append(engine, table, entries(4))
    written += await append(engine, table, entries(3, start=4))
    records = await stored(engine, table)
    assert [r.seq for r in records] == list(range(1, 8))
    assert records == written  # what was hashed is exactly what the database gives back
    assert records[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))
    assert all(entry_hash(r.entry, r.prev_hash) == r.hash for r in records)
    assert [r.entry.outcome for r in records[:3]] == ["completed", "forbidden", "rejected"]
    assert records[1].entry.code == "forbidden" and records[1].entry.actor_id == "user.1"
    assert verify(records) is None
    assert verify(records, expected_head=(7, records[-1].hash)) is None


async def test_concurrent_appends_never_fork_the_chain(chain: tuple[AsyncEngine, Table]) -> None:
    engine, table = chain
    rng = random.Random(7)

    async def writer(w: int) -> None:
        for i in range(5):
            await asyncio.sleep(rng.random() / 100)
            # Sessions and bare connections alike take the append lock.
            how = append if w % 2 else append_on_connection
            await how(engine, table, entries(rng.randint(1, 3), start=w * 100 + i * 10))

    await asyncio.gather(*(writer(w) for w in range(6)))
    records = await stored(engine, table)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert len(records) >= 30
    assert verify(records) is None


async def append_remembering(
    engine: AsyncEngine, log: AuditLog, batch: list[AuditEntry]
) -> list[AuditRecord]:
    """What a service's unit of work does: append, commit, remember the new head."""
    async with session_factory(engine)() as session:
        records = await log.append(session, batch)
        await session.commit()
    log.remember(records[-1])
    return records


def head_reads(engine: AsyncEngine) -> list[str]:
    """The statements that read the audit table, as they are run on ``engine`` from now on."""
    seen: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM audit_log" in statement:
            seen.append(statement)

    return seen


async def test_a_remembered_head_is_chained_to_without_reading_it(
    chain: tuple[AsyncEngine, Table],
) -> None:
    engine, table = chain
    log = AuditLog(table)
    first = await append_remembering(engine, log, entries(2))
    reads = head_reads(engine)
    second = await append_remembering(engine, log, entries(3, start=2))
    assert reads == []
    assert second[0].prev_hash == first[-1].hash
    records = await stored(engine, table)
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert verify(records) is None


async def test_a_head_remembered_by_one_replica_and_moved_by_another_never_forks_the_chain(
    chain: tuple[AsyncEngine, Table],
) -> None:
    engine, table = chain
    a, b = AuditLog(table), AuditLog(table)  # two replicas on one database
    written = entries(12)
    await append_remembering(engine, a, written[0:2])  # a: head 2
    await append_remembering(engine, b, written[2:5])  # b reads head 2, leaves 5
    # a remembers 2: both its seqs are taken by now.
    await append_remembering(engine, a, written[5:7])  # a: 7
    # b remembers 5: of its four seqs 6..9, 6 and 7 are taken and 8 and 9 are free.
    await append_remembering(engine, b, written[7:11])  # b: 11
    await append_remembering(engine, a, written[11:])  # a remembers 7, the head is 11
    records = await stored(engine, table)
    assert [r.seq for r in records] == list(range(1, 13))
    assert [r.entry.message_id for r in records] == [e.message_id for e in written]
    assert verify(records) is None


def test_outcomes_follow_the_result_code() -> None:
    assert outcome_of(None) == "completed"
    assert outcome_of("forbidden") == "forbidden"
    assert outcome_of("not_found") == "rejected"


def test_an_entry_keeps_who_what_and_where() -> None:
    env = command(1, roles="clerk")
    at = datetime(2026, 11, 25, 9, 30, 0, 123456, tzinfo=UTC)
    entry = AuditEntry.of_command(env, service="orgs", code=None, at=at)
    assert entry.content() == {
        "at": "2026-11-25T09:30:00.123456Z",
        "service": "orgs",
        "message_id": env.id,
        "type": RegisterOrg.TYPE,
        "actor_id": "user.1",
        "actor_region": "130100",
        "actor_roles": "clerk",
        "subject": env.subject,
        "outcome": "completed",
        "code": None,
    }


# --- tampering ----------------------------------------------------------------------------


async def test_an_edited_entry_is_named_altered(chain: tuple[AsyncEngine, Table]) -> None:
    engine, table = chain
    await append(engine, table, entries(8))
    async with engine.begin() as conn:
        await conn.execute(update(table).where(table.c.seq == 5).values(actor_roles="admin"))
    broken = verify(await stored(engine, table))
    assert broken is not None and (broken.seq, broken.what) == (5, "altered")


async def test_an_edit_with_a_recomputed_hash_is_still_found(
    chain: tuple[AsyncEngine, Table],
) -> None:
    engine, table = chain
    await append(engine, table, entries(8))
    row = (await rows(engine, table))[5]
    forged = AuditRecord.from_row({**row, "outcome": "completed", "code": None})
    new_hash = entry_hash(forged.entry, forged.prev_hash)
    async with engine.begin() as conn:
        await conn.execute(
            update(table)
            .where(table.c.seq == 5)
            .values(outcome="completed", code=None, hash=new_hash)
        )
    broken = verify(await stored(engine, table))
    # Entry 5 is self-consistent now, but entry 6 no longer follows it.
    assert broken is not None and (broken.seq, broken.what) == (6, "missing")


async def test_a_deleted_entry_is_named_missing(chain: tuple[AsyncEngine, Table]) -> None:
    engine, table = chain
    await append(engine, table, entries(8))
    async with engine.begin() as conn:
        await conn.execute(delete(table).where(table.c.seq == 4))
    broken = verify(await stored(engine, table))
    assert broken is not None and (broken.seq, broken.what) == (4, "missing")


async def test_swapped_entries_are_named_reordered(chain: tuple[AsyncEngine, Table]) -> None:
    engine, table = chain
    await append(engine, table, entries(8))
    before = await rows(engine, table)
    async with engine.begin() as conn:
        await conn.execute(delete(table).where(table.c.seq.in_([3, 4])))
        await conn.execute(table.insert(), [{**before[4], "seq": 3}, {**before[3], "seq": 4}])
    broken = verify(await stored(engine, table))
    assert broken is not None and (broken.seq, broken.what) == (3, "reordered")


async def test_deleting_the_newest_entries_is_found_against_a_checkpoint(
    chain: tuple[AsyncEngine, Table],
) -> None:
    engine, table = chain
    written = await append(engine, table, entries(6))
    async with engine.begin() as conn:
        await conn.execute(delete(table).where(table.c.seq >= 5))
    records = await stored(engine, table)
    assert verify(records) is None  # the chain alone cannot tell
    broken = verify(records, expected_head=(6, written[-1].hash))
    assert broken is not None and (broken.seq, broken.what) == (6, "missing")


# --- checkpoints --------------------------------------------------------------------------


async def test_a_signed_checkpoint_every_n_entries(chain: tuple[AsyncEngine, Table]) -> None:
    engine, table = chain
    auditor = CommandAuditor(
        service="orgs",
        table=table,
        source="/bianzhi/orgs",
        checkpoint_every=3,
        signing_key=KEY,
        kid="orgs-audit-1",
    )
    emitted: list[tuple[Envelope, str]] = []
    for batch in ([1, 2], [3, 4, 5, 6, 7], [8]):
        async with session_factory(engine)() as session:
            outcomes = [(command(n), None if n % 2 else "forbidden") for n in batch]
            emitted += await auditor.record(session, outcomes)
            await session.commit()
    records = await stored(engine, table)
    assert [env.type for env, _ in emitted] == [OrgsAuditCheckpoint.TYPE] * 2
    assert {topic for _, topic in emitted} == {ORGS_EVENTS}
    checkpoints = [OrgsAuditCheckpoint.model_validate(env.data) for env, _ in emitted]
    assert [(c.head_seq, c.head_hash) for c in checkpoints] == [
        (3, records[2].hash),
        (6, records[5].hash),
    ]
    assert all(env.subject == "orgs" for env, _ in emitted)
    keys = {"orgs-audit-1": KEY.public_key()}
    assert all(verify_checkpoint(c, keys) for c in checkpoints)
    forged = checkpoints[1].model_copy(update={"head_seq": 5})
    assert not verify_checkpoint(forged, keys)
    assert not verify_checkpoint(checkpoints[0], {"other": KEY.public_key()})
    assert verify(records, expected_head=(6, checkpoints[1].head_hash)) is None


async def test_without_a_signing_key_entries_are_chained_but_not_checkpointed(
    chain: tuple[AsyncEngine, Table],
) -> None:
    engine, table = chain
    auditor = CommandAuditor(service="orgs", table=table, source="/o", checkpoint_every=1)
    async with session_factory(engine)() as session:
        assert await auditor.record(session, [(command(1), None)]) == []
        await session.commit()
    assert len(await stored(engine, table)) == 1


async def test_the_auditor_from_settings_signs_with_a_key_from_bianzhi_keys(
    chain: tuple[AsyncEngine, Table], tmp_path: Path
) -> None:
    engine, table = chain
    create_key(tmp_path, "orgs-audit-1")
    settings = SecuritySettings(
        audit_checkpoint_every=1,
        audit_signing_private_key=tmp_path / "orgs-audit-1.key.pem",
        audit_signing_kid="orgs-audit-1",
    )
    auditor = command_auditor("orgs", table, "/bianzhi/orgs", settings)
    odd = command(1).model_copy(update={"id": "a\x00b", "actorid": "\ud800" + "x" * 300})
    async with session_factory(engine)() as session:
        ((env, _),) = await auditor.record(session, [(odd, "forbidden")])
        await session.commit()
    (record,) = await stored(engine, table)
    assert record.entry.message_id == "a\ufffdb" and len(record.entry.actor_id or "") == 200
    assert verify([record]) is None
    checkpoint = OrgsAuditCheckpoint.model_validate(env.data)
    assert verify_checkpoint(checkpoint, load_public_keys(tmp_path))


# --- `bianzhi audit verify` ---------------------------------------------------------------


async def run_cli(*args: str) -> int:
    return await asyncio.to_thread(main, ["audit", "verify", *args])


async def test_cli_reports_an_intact_chain_and_each_kind_of_tampering(
    chain: tuple[AsyncEngine, Table], db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, table = chain
    written = await append(engine, table, entries(9))
    assert await run_cli("orgs", "--database-url", db_url) == 0
    out = capsys.readouterr().out
    assert f"intact, 9 entries, head seq 9 hash {written[-1].hash}" in out

    async with engine.begin() as conn:
        await conn.execute(delete(table).where(table.c.seq == 9))
    head = f"9:{written[-1].hash}"
    assert await run_cli("orgs", "--database-url", db_url, "--head", head) == 1
    assert "broken at seq 9: missing" in capsys.readouterr().out

    before = await rows(engine, table)
    async with engine.begin() as conn:
        await conn.execute(delete(table).where(table.c.seq.in_([6, 7])))
        await conn.execute(table.insert(), [{**before[7], "seq": 6}, {**before[6], "seq": 7}])
    assert await run_cli("orgs", "--database-url", db_url) == 1
    assert "broken at seq 6: reordered" in capsys.readouterr().out

    async with engine.begin() as conn:
        await conn.execute(delete(table).where(table.c.seq == 3))
    assert await run_cli("orgs", "--database-url", db_url) == 1
    assert "broken at seq 3: missing" in capsys.readouterr().out

    async with engine.begin() as conn:
        await conn.execute(update(table).where(table.c.seq == 2).values(subject="x"))
    assert await run_cli("orgs", "--database-url", db_url) == 1
    assert "broken at seq 2: altered" in capsys.readouterr().out


async def test_cli_on_an_empty_log_and_on_a_database_without_the_table(
    chain: tuple[AsyncEngine, Table], db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_cli("orgs", "--database-url", db_url) == 0
    assert "audit log is empty" in capsys.readouterr().out
    engine, table = chain
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: table.drop(sync))
    assert await run_cli("orgs", "--database-url", db_url) == 2
    err = capsys.readouterr().err
    assert err.startswith("bianzhi: error: SERVICE orgs: cannot read its audit log")
    assert "bianzhi migrate orgs" in err


# --- inside a service's unit of work ------------------------------------------------------


async def test_entries_and_checkpoints_commit_with_the_unit_of_work(
    runtime: ServiceRuntime,
) -> None:
    table = audit_table(MetaData())
    async with runtime.engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
    auditor = CommandAuditor(
        service="orgs",
        table=table,
        source="/bianzhi/orgs",
        checkpoint_every=2,
        signing_key=KEY,
        kid="orgs-audit-1",
    )
    async with runtime.uow() as uow:  # left without commit: nothing is kept
        await auditor.record(uow.session, [(command(1), None), (command(2), None)])
    async with runtime.uow() as uow:
        for env, topic in await auditor.record(uow.session, [(command(3), "forbidden")] * 2):
            uow.stage(env, topic, env.subject)
        await uow.commit()

    records = await stored(runtime.engine, table)
    assert [(r.seq, r.entry.outcome) for r in records] == [(1, "forbidden"), (2, "forbidden")]
    assert verify(records) is None
    outbox = runtime.definition.tables.outbox
    async with runtime.engine.connect() as conn:
        (row,) = (await conn.execute(select(outbox))).mappings()
    assert (row["topic"], row["key"], row["message_type"]) == (
        ORGS_EVENTS,
        "orgs",
        OrgsAuditCheckpoint.TYPE,
    )
    checkpoint = OrgsAuditCheckpoint.model_validate(Envelope.from_bytes(row["value"]).data)
    assert (checkpoint.head_seq, checkpoint.head_hash) == (2, records[1].hash)
    assert verify_checkpoint(checkpoint, {"orgs-audit-1": KEY.public_key()})


def test_cli_without_a_database_or_with_a_bad_head_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BIANZHI_ORGS_DATABASE_URL", raising=False)
    assert main(["audit", "verify", "orgs", "--data-dir", str(tmp_path)]) == 2
    assert f"no database at {tmp_path.resolve() / 'orgs.db'}" in capsys.readouterr().err
    assert not (tmp_path / "orgs.db").exists()
    assert main(["audit", "verify", "orgs", "--head", "12:abc"]) == 2
    assert "--head '12:abc': expected SEQ:HASH" in capsys.readouterr().err
    assert main(["audit", "verify", "payroll"]) == 2
    assert "SERVICE 'payroll'" in capsys.readouterr().err


async def test_a_unit_of_work_that_fails_to_commit_leaves_the_remembered_head_alone(
    runtime: ServiceRuntime,
) -> None:
    commands = [command(n) for n in range(3)]

    async def store(n: int, *, broken: bool = False) -> None:
        async with runtime.uow() as uow:
            env = commands[n]
            await uow.store_result(env, env, None)
            if broken:  # a row the outbox refuses: the commit fails after the audit append
                uow.stage(env, None, None)  # type: ignore[arg-type]
            await uow.commit()

    await store(0)
    with pytest.raises(IntegrityError):
        await store(1, broken=True)
    await store(2)
    records = await stored(runtime.engine, runtime.definition.tables.audit)
    assert [(r.seq, r.entry.message_id) for r in records] == [
        (1, commands[0].id),
        (2, commands[2].id),
    ]
    assert verify(records) is None
