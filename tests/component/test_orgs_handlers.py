"""The orgs service layer without Kafka: envelopes go straight into the command consumer.

The service is built by its composition root on a migrated database (SQLite and PostgreSQL);
each record is handed to ``CommandConsumer.process`` as if it came off the command topic. The
relay does not run, so what the service would publish stays in the outbox, where it is checked.
"""

from __future__ import annotations

import itertools
import json
import uuid
from datetime import date
from typing import Any

import pytest
from faststream.kafka import KafkaMessage, TestKafkaBroker
from sqlalchemy import func, select

from contracts.base import Message
from contracts.common import Document
from contracts.envelope import CONTENT_TYPE, Envelope, new_id
from contracts.orgs import (
    AddInternalUnit,
    MoveOrg,
    RegisterOrg,
    RenameOrg,
    UpdateFunctions,
)
from contracts.topics import COMMAND_RESULTS, ORGS_COMMANDS, ORGS_EVENTS, dlq
from services.orgs.adapters.orm import org_history, org_units, orgs
from services.runtime.app import ServiceRuntime
from services.runtime.messaging import RawMessage
from tests.support.builders import register_org

COMPLETED = "bianzhi.CommandCompleted.v1"
REJECTED = "bianzhi.CommandRejected.v1"
ACTOR = {"actorid": "li.na", "actorregion": "130000", "actorroles": "approver"}
DOC = Document(title="关于设立机构的批复", number="冀编〔2026〕1号", date=date(2026, 1, 5))
ORGAN_USCC = "11610923MB2900168E"

_offsets = itertools.count()


class DeadLetters:
    """Stands in for the broker's dead-letter publisher."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None, dict[str, str]]] = []

    async def __call__(
        self, topic: str, value: bytes, key: bytes | None, headers: dict[str, str]
    ) -> None:
        self.sent.append((topic, value, key, headers))


@pytest.fixture
def dead_letters(runtime: ServiceRuntime) -> DeadLetters:
    fake = DeadLetters()
    runtime.command_consumer.dead_letter = fake
    return fake


# --- helpers ------------------------------------------------------------------------------


def envelope(payload: Message, *, id: str | None = None, **actor: Any) -> Envelope:
    return payload.envelope(source="/tests", id=id or new_id(), **{**ACTOR, **actor})


def raw_envelope(type_: str, data: dict[str, Any], **fields: Any) -> Envelope:
    """An envelope whose data is not validated here (to carry what the service must refuse)."""
    return Envelope.model_validate(
        {
            "id": new_id(),
            "source": "/tests",
            "type": type_,
            "time": "2026-01-05T09:30:00+08:00",
            "data": data,
            **ACTOR,
            **fields,
        }
    )


def record(value: bytes, key: bytes | None = None) -> RawMessage:
    return RawMessage(
        topic=ORGS_COMMANDS,
        partition=0,
        offset=next(_offsets),
        key=key,
        value=value,
        headers=(("content-type", CONTENT_TYPE.encode()),),
    )


async def process(rt: ServiceRuntime, env: Envelope) -> str:
    await rt.command_consumer.process(record(env.to_bytes(), (env.subject or env.id).encode()))
    return env.id


async def outbox(rt: ServiceRuntime, **where: str) -> list[Any]:
    table = rt.definition.tables.outbox
    query = select(table).order_by(table.c.seq)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    async with rt.sessions() as session:
        return list((await session.execute(query)).all())


async def results(rt: ServiceRuntime, command_id: str) -> list[Envelope]:
    rows = await outbox(rt, topic=COMMAND_RESULTS, key=command_id)
    return [Envelope.from_bytes(r.value) for r in rows]


async def result(rt: ServiceRuntime, command_id: str) -> Envelope:
    found = await results(rt, command_id)
    assert len(found) == 1, found
    return found[0]


async def rejected(rt: ServiceRuntime, env: Envelope, code: str) -> dict[str, Any]:
    """Process ``env``; assert it was rejected with ``code``; return the result's data."""
    res = await result(rt, await process(rt, env))
    assert res.type == REJECTED, res.data
    assert res.data["code"] == code, res.data
    assert res.data["command_id"] == env.id
    assert res.data["command_type"] == env.type
    stored = await stored_results(rt, env.id)
    assert [(r.result_type, r.code) for r in stored] == [(REJECTED, code)]
    return res.data


async def completed(rt: ServiceRuntime, payload: Message, **actor: Any) -> Envelope:
    env = envelope(payload, **actor)
    res = await result(rt, await process(rt, env))
    assert res.type == COMPLETED, res.data
    return res


async def stored_results(rt: ServiceRuntime, command_id: str) -> list[Any]:
    table = rt.definition.tables.command_results
    async with rt.sessions() as session:
        query = select(table).where(table.c.command_id == command_id)
        return list((await session.execute(query)).all())


async def count(rt: ServiceRuntime, table: Any, *where: Any) -> int:
    async with rt.sessions() as session:
        query = select(func.count()).select_from(table).where(*where)
        return (await session.execute(query)).scalar_one()


async def org_row(rt: ServiceRuntime, org_id: uuid.UUID) -> Any:
    async with rt.sessions() as session:
        query = select(orgs).where(orgs.c.org_id == str(org_id))
        return (await session.execute(query)).one_or_none()


async def nothing_but_results(rt: ServiceRuntime) -> bool:
    """No state and no events: only command results were written."""
    rows = await outbox(rt)
    return (
        await count(rt, orgs) == 0
        and await count(rt, org_history) == 0
        and all(r.topic == COMMAND_RESULTS for r in rows)
    )


# --- the happy path -----------------------------------------------------------------------


async def test_register_writes_org_history_event_and_result_in_one_go(runtime) -> None:
    cmd = register_org(uscc=ORGAN_USCC, functions=["预算管理"], alt_names=["长安区国资办"])
    env = envelope(cmd)
    res = await result(runtime, await process(runtime, env))
    assert res.type == COMPLETED
    assert res.data["subject"] == str(cmd.org_id)
    assert res.correlationid == env.id and res.causationid == env.id
    assert (res.actorid, res.actorregion, res.actorroles) == tuple(ACTOR.values())

    [event_row] = await outbox(runtime, topic=ORGS_EVENTS)
    assert event_row.key == str(cmd.org_id)
    assert event_row.published_at is None  # the relay is not running
    assert event_row.headers == {"content-type": CONTENT_TYPE}
    event = Envelope.from_bytes(event_row.value)
    assert res.data["events"] == [event.id] == [event_row.message_id]
    assert event.type == "bianzhi.orgs.OrgRegistered.v1"
    assert event.subject == str(cmd.org_id)
    assert event.correlationid == env.id and event.causationid == env.id
    assert event.actorid == "li.na" and event.actorregion == "130000"
    assert event.data["effective_date"] == "2026-01-05"  # from the document
    assert event.data["warnings"] == []

    row = await org_row(runtime, cmd.org_id)
    assert (row.name, row.kind, row.division_code, row.status) == (
        "石家庄市长安区财政局",
        "organ",
        "130102",
        "active",
    )
    assert (row.uscc, row.alt_names, row.functions, row.version) == (
        ORGAN_USCC,
        ["长安区国资办"],
        ["预算管理"],
        1,
    )
    async with runtime.sessions() as session:
        [history] = (await session.execute(select(org_history))).all()
    assert history.event_id == event.id
    assert history.command_id == env.id
    assert history.document == DOC.model_dump(mode="json")
    assert history.effective_date == date(2026, 1, 5)
    assert history.actor_id == "li.na"
    inbox = runtime.definition.tables.inbox
    assert await count(runtime, inbox, inbox.c.message_id == env.id) == 1


async def test_uscc_that_does_not_fit_the_kind_completes_with_a_warning(runtime) -> None:
    await completed(runtime, register_org(uscc="121526004609138637"))  # 12…: an institution's
    [row] = await outbox(runtime, topic=ORGS_EVENTS)
    warnings = json.loads(row.value)["data"]["warnings"]
    assert len(warnings) == 1 and "121526004609138637" in warnings[0]


async def test_clerk_may_change_details_and_lower_regions_may_act_inside(runtime) -> None:
    cmd = register_org()
    await completed(runtime, cmd)
    clerk = {"actorroles": "clerk", "actorregion": "130102"}
    await completed(
        runtime, AddInternalUnit(org_id=cmd.org_id, unit_id=uuid.uuid4(), name="办公室"), **clerk
    )
    await completed(
        runtime, UpdateFunctions(org_id=cmd.org_id, functions=["统筹"], document=DOC), **clerk
    )
    several = {"actorroles": " clerk , approver ", "actorregion": "130100"}
    await completed(
        runtime, RenameOrg(org_id=cmd.org_id, name="长安区财政局", document=DOC), **several
    )
    row = await org_row(runtime, cmd.org_id)
    assert (row.name, row.functions, row.version) == ("长安区财政局", ["统筹"], 4)
    assert await count(runtime, org_units, org_units.c.org_id == str(cmd.org_id)) == 1


# --- refusals before the handler ----------------------------------------------------------


async def test_malformed_envelope_with_a_readable_id_is_rejected(runtime, dead_letters) -> None:
    command_id = new_id()
    value = json.dumps(
        {"id": command_id, "type": RegisterOrg.TYPE, "source": "/tests", "correlationid": "c-1"}
    ).encode()  # no time
    await runtime.command_consumer.process(record(value, command_id.encode()))
    res = await result(runtime, command_id)
    assert res.type == REJECTED
    assert res.data["code"] == "invalid_message"
    assert res.data["command_type"] == RegisterOrg.TYPE
    assert res.correlationid == "c-1" and res.causationid == command_id
    assert {e["field"] for e in res.data["details"]["errors"]} == {"time"}
    assert [r.code for r in await stored_results(runtime, command_id)] == ["invalid_message"]
    assert dead_letters.sent == []
    assert await nothing_but_results(runtime)


async def test_a_malformed_envelope_with_an_overlong_correlation_id_still_gets_its_result(
    runtime, dead_letters
) -> None:
    command_id = new_id()
    value = json.dumps(
        {
            "id": command_id,
            "type": RegisterOrg.TYPE,
            "specversion": None,
            "correlationid": "x" * 201,
        }
    ).encode()
    await runtime.command_consumer.process(record(value, command_id.encode()))
    res = await result(runtime, command_id)
    assert (res.type, res.data["code"]) == (REJECTED, "invalid_message")
    assert res.correlationid == command_id  # the overlong one could not be sent on
    assert dead_letters.sent == []


async def test_a_lone_surrogate_in_a_malformed_envelope_is_not_written_into_its_result(
    runtime, dead_letters
) -> None:
    """JSON may escape a lone surrogate (``\\ud800``), which no UTF-8 text can carry: the
    envelope fails to parse, and what is read from it for the result must not hold one."""
    command_id = new_id()
    value = (
        f'{{"id": "{command_id}", "type": "\\ud800", "source": "/tests", '
        f'"correlationid": "\\udfff"}}'
    ).encode()
    await runtime.command_consumer.process(record(value, command_id.encode()))
    res = await result(runtime, command_id)
    assert (res.type, res.data["code"]) == (REJECTED, "invalid_message")
    assert res.data["command_type"] == "unknown"
    assert res.correlationid == command_id
    assert dead_letters.sent == []
    # With such an id, nothing can answer it: the record goes to the dead-letter topic.
    unanswerable = b'{"id": "\\ud800x", "type": "x", "source": "/tests"}'
    await runtime.command_consumer.process(record(unanswerable, b"k-2"))
    [(topic, dead_value, _, headers)] = dead_letters.sent
    assert (topic, dead_value) == (dlq(ORGS_COMMANDS), unanswerable)
    assert "not a CloudEvents envelope" in headers["x-dlq-error"]


@pytest.mark.parametrize(
    "value",
    [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"id": 17, "type": "x"}', b'{"type": "x"}', b""],
    ids=["truncated", "not-utf8", "array", "numeric-id", "no-id", "empty"],
)
async def test_unreadable_record_goes_to_the_dead_letter_topic(
    runtime, dead_letters, value
) -> None:
    await runtime.command_consumer.process(record(value, b"k-1"))
    assert await outbox(runtime) == []
    [(topic, dead_value, key, headers)] = dead_letters.sent
    assert (topic, dead_value, key) == (dlq(ORGS_COMMANDS), value, b"k-1")
    assert headers["content-type"] == CONTENT_TYPE
    assert headers["x-dlq-topic"] == ORGS_COMMANDS
    assert headers["x-dlq-consumer"] == "orgs.commands"
    assert "not a CloudEvents envelope" in headers["x-dlq-error"]


async def test_unknown_type_is_rejected(runtime) -> None:
    env = raw_envelope("bianzhi.orgs.PaintOrg.v1", {"org_id": str(uuid.uuid4())})
    data = await rejected(runtime, env, "unknown_type")
    assert data["details"]["type"] == "bianzhi.orgs.PaintOrg.v1"
    assert RegisterOrg.TYPE in data["details"]["known"]
    assert await nothing_but_results(runtime)


@pytest.mark.parametrize("missing", ["actorid", "actorregion", "actorroles"])
async def test_command_without_actor_is_forbidden(runtime, missing) -> None:
    env = envelope(register_org(), **{missing: None})
    data = await rejected(runtime, env, "forbidden")
    assert data["details"] == {"missing": [missing]}
    assert await nothing_but_results(runtime)


@pytest.mark.parametrize("roles", ["clerk", "auditor", "clerk,auditor", ","])
async def test_register_needs_an_approver(runtime, roles) -> None:
    data = await rejected(runtime, envelope(register_org(), actorroles=roles), "forbidden")
    assert data["details"]["required_role"] == "approver"
    assert await nothing_but_results(runtime)


async def test_admin_includes_the_approver(runtime) -> None:
    await completed(runtime, register_org(), actorroles="admin")


async def test_register_outside_the_actors_region_is_forbidden(runtime) -> None:
    env = envelope(register_org(division_code="130102"), actorregion="130200")
    data = await rejected(runtime, env, "forbidden")
    assert data["details"] == {"division_code": "130102", "actor_region": "130200"}
    assert await nothing_but_results(runtime)


@pytest.mark.parametrize("region", ["13", "abcdef", "1301020"])
async def test_malformed_actor_region_is_forbidden(runtime, dead_letters, region) -> None:
    await rejected(runtime, envelope(register_org(), actorregion=region), "forbidden")
    assert dead_letters.sent == []
    assert await nothing_but_results(runtime)


def _data(**changes: Any) -> dict[str, Any]:
    data = register_org().model_dump(mode="json", exclude_none=True)
    data.update(changes)
    return data


async def test_invalid_uscc_is_rejected(runtime) -> None:
    env = raw_envelope(RegisterOrg.TYPE, _data(uscc="11610923MB2900168F"))  # wrong check char
    data = await rejected(runtime, env, "invalid_uscc")
    [error] = data["details"]["errors"]
    assert (error["field"], error["type"]) == ("uscc", "invalid_uscc")
    assert await nothing_but_results(runtime)


async def test_unknown_division_is_rejected(runtime) -> None:
    env = raw_envelope(RegisterOrg.TYPE, _data(division_code="999999"))
    data = await rejected(runtime, env, "unknown_division")
    assert data["details"]["errors"][0]["field"] == "division_code"
    assert await nothing_but_results(runtime)


async def test_schema_violation_is_invalid_message_with_field_details(runtime) -> None:
    env = raw_envelope(RegisterOrg.TYPE, _data(colour="red", kind="ministry", document=None))
    data = await rejected(runtime, env, "invalid_message")
    errors = {e["field"]: e["type"] for e in data["details"]["errors"]}
    assert errors == {"colour": "extra_forbidden", "kind": "enum", "document": "model_type"}
    assert "colour" in data["message"]
    assert await nothing_but_results(runtime)


async def test_identifier_code_wins_over_other_field_errors(runtime) -> None:
    env = raw_envelope(RegisterOrg.TYPE, _data(colour="red", uscc="X"))
    # 'X' is too short: a length error, so the code stays invalid_message
    await rejected(runtime, env, "invalid_message")
    env = raw_envelope(RegisterOrg.TYPE, _data(colour="red", uscc="11610923MB2900168F"))
    await rejected(runtime, env, "invalid_uscc")


# --- refusals by the handler --------------------------------------------------------------


async def test_duplicate_org_id_is_a_conflict_and_changes_nothing(runtime) -> None:
    first = register_org()
    await completed(runtime, first)
    again = register_org(first.org_id, name="另一个机构", division_code="130104")
    data = await rejected(runtime, envelope(again), "conflict")
    assert data["details"] == {"org_id": str(first.org_id)}
    row = await org_row(runtime, first.org_id)
    assert (row.name, row.division_code, row.version) == ("石家庄市长安区财政局", "130102", 1)
    assert await count(runtime, org_history) == 1
    assert len(await outbox(runtime, topic=ORGS_EVENTS)) == 1


async def test_uscc_held_by_another_org_is_a_conflict(runtime) -> None:
    holder = register_org(uscc=ORGAN_USCC)
    await completed(runtime, holder)
    data = await rejected(runtime, envelope(register_org(uscc=ORGAN_USCC)), "conflict")
    assert data["details"] == {"uscc": ORGAN_USCC, "org_id": str(holder.org_id)}
    assert await count(runtime, orgs) == 1


async def test_unknown_parent_and_unknown_org_are_not_found(runtime) -> None:
    missing = uuid.uuid4()
    await rejected(runtime, envelope(register_org(parent_org_id=missing)), "not_found")
    rename = RenameOrg(org_id=missing, name="新名称", document=DOC)
    data = await rejected(runtime, envelope(rename), "not_found")
    assert data["details"] == {"org_id": str(missing)}
    assert await nothing_but_results(runtime)


async def test_rejection_inside_the_handler_rolls_back_its_writes(runtime) -> None:
    parent, child = register_org(division_code="130100"), register_org()
    await completed(runtime, parent)
    await completed(runtime, child)
    before = await outbox(runtime)
    # the parent (130100) does not lie inside the child's division (130102): checked after loads
    move = MoveOrg(org_id=parent.org_id, parent_org_id=child.org_id, document=DOC)
    await rejected(runtime, envelope(move), "conflict")
    assert (await org_row(runtime, parent.org_id)).parent_org_id is None
    assert (await org_row(runtime, parent.org_id)).version == 1
    after = await outbox(runtime)
    assert [r.topic for r in after[len(before) :]] == [COMMAND_RESULTS]
    assert await count(runtime, org_history) == 2


async def test_target_org_outside_the_actors_region_is_forbidden(runtime) -> None:
    city = register_org(name="石家庄市人民政府", division_code="130100")
    await completed(runtime, city)
    env = envelope(RenameOrg(org_id=city.org_id, name="新名称", document=DOC), actorregion="130102")
    data = await rejected(runtime, env, "forbidden")
    assert data["details"] == {"division_code": "130100", "actor_region": "130102"}
    assert (await org_row(runtime, city.org_id)).name == "石家庄市人民政府"


# --- exactly one effect, the same result again ----------------------------------------------


async def test_same_command_id_twice_has_one_effect_and_the_same_result(runtime) -> None:
    cmd = register_org()
    env = envelope(cmd)
    await process(runtime, env)
    await process(runtime, env)
    assert await count(runtime, orgs) == 1
    assert await count(runtime, org_history) == 1
    assert len(await outbox(runtime, topic=ORGS_EVENTS)) == 1
    rows = await outbox(runtime, topic=COMMAND_RESULTS)
    assert len(rows) == 2
    assert rows[0].message_id == rows[1].message_id
    assert rows[0].value == rows[1].value
    assert rows[0].key == rows[1].key == env.id
    assert Envelope.from_bytes(rows[0].value).type == COMPLETED
    assert len(await stored_results(runtime, env.id)) == 1
    inbox = runtime.definition.tables.inbox
    assert await count(runtime, inbox, inbox.c.message_id == env.id) == 1


async def test_a_rejected_command_sent_again_gets_the_same_rejection(runtime) -> None:
    env = envelope(register_org(), actorregion="130200")
    await rejected(runtime, env, "forbidden")
    await process(runtime, env)
    rows = await outbox(runtime, topic=COMMAND_RESULTS)
    assert [r.message_id for r in rows] == [rows[0].message_id] * 2
    assert rows[0].value == rows[1].value
    # re-sending with a fixed actor does not turn the stored rejection into a success
    await process(runtime, env.model_copy(update={"actorregion": "130000"}))
    assert len(await outbox(runtime, topic=COMMAND_RESULTS)) == 3
    assert await count(runtime, orgs) == 0


# --- through FastStream's test broker -----------------------------------------------------


async def test_the_subscriber_under_faststreams_test_broker(runtime) -> None:
    dead: list[tuple[bytes, dict[str, str]]] = []

    @runtime.broker.subscriber(dlq(ORGS_COMMANDS))
    async def on_dead_letter(body: bytes, message: KafkaMessage) -> None:
        dead.append((message.raw_message.value, message.headers))

    cmd = register_org()
    env = envelope(cmd)
    async with TestKafkaBroker(runtime.broker) as br:
        await br.publish(
            env.to_bytes(),
            topic=ORGS_COMMANDS,
            key=str(cmd.org_id).encode(),
            headers={"content-type": CONTENT_TYPE},
        )
        await br.publish(b"{garbage", topic=ORGS_COMMANDS, key=b"k-9")
    res = await result(runtime, env.id)
    assert res.type == COMPLETED
    assert (await org_row(runtime, cmd.org_id)) is not None
    assert len(await outbox(runtime, topic=ORGS_EVENTS)) == 1
    [(value, headers)] = dead
    assert value == b"{garbage"
    assert headers["x-dlq-topic"] == ORGS_COMMANDS
