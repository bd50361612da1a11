"""One fetch of commands, handled as one transaction — and exactly as if one by one.

Each scenario hands a whole batch to ``CommandConsumer.process_batch`` and checks what the
consumer must guarantee whatever the batching: one result per command id (the same result for a
re-sent id), the same effects, nothing written for a refused command.
"""

from __future__ import annotations

import uuid

from sqlalchemy.exc import OperationalError

from contracts.envelope import Envelope
from contracts.orgs import RenameOrg
from services.orgs.adapters.orm import org_history, orgs
from services.runtime import metrics
from tests.component.test_orgs_handlers import (
    COMPLETED,
    DOC,
    REJECTED,
    count,
    envelope,
    outbox,
    raw_envelope,
    record,
    result,
    results,
    stored_results,
)
from tests.support.builders import register_org


def records(*envs: Envelope) -> list:
    return [record(e.to_bytes(), (e.subject or e.id).encode()) for e in envs]


def handled(outcome: str) -> float:
    return metrics.MESSAGES_HANDLED.labels(
        "orgs", "bianzhi.orgs.RegisterOrg.v1", outcome
    )._value.get()


async def test_a_batch_of_good_commands_commits_together(runtime) -> None:
    envs = [envelope(register_org(name=f"单位{i}")) for i in range(20)]
    before = handled("completed")
    await runtime.command_consumer.process_batch(records(*envs))
    assert await count(runtime, orgs) == 20
    assert await count(runtime, org_history) == 20
    for env in envs:
        assert (await result(runtime, env.id)).type == COMPLETED
        assert len(await stored_results(runtime, env.id)) == 1
    assert handled("completed") - before == 20


async def test_repeats_in_and_across_batches_have_one_effect_and_the_same_result(runtime) -> None:
    first = envelope(register_org())
    other = envelope(register_org(name="另一单位"))
    await runtime.command_consumer.process_batch(records(first, first, other))
    await runtime.command_consumer.process_batch(records(other, first))
    assert await count(runtime, orgs) == 2
    for env, sent in ((first, 3), (other, 2)):
        found = await results(runtime, env.id)
        assert len(found) == sent
        assert {r.id for r in found} == {found[0].id}
        assert {r.to_bytes() for r in found} == {found[0].to_bytes()}
        assert len(await stored_results(runtime, env.id)) == 1


async def test_refusals_known_before_the_handler_stay_in_the_batch(runtime) -> None:
    good = envelope(register_org())
    unknown = raw_envelope("bianzhi.orgs.NoSuchThing.v1", {})
    clerk = envelope(register_org(name="越权单位"), actorroles="clerk")
    bad_division = raw_envelope(
        "bianzhi.orgs.RegisterOrg.v1",
        {**register_org().model_dump(mode="json"), "division_code": "999999"},
    )
    await runtime.command_consumer.process_batch(records(good, unknown, clerk, bad_division))
    assert (await result(runtime, good.id)).type == COMPLETED
    codes = {
        env.id: (await result(runtime, env.id)).data["code"]
        for env in (unknown, clerk, bad_division)
    }
    assert codes == {
        unknown.id: "unknown_type",
        clerk.id: "forbidden",
        bad_division.id: "unknown_division",
    }
    assert await count(runtime, orgs) == 1


async def test_a_handler_refusal_mid_batch_leaves_the_others_intact(runtime) -> None:
    existing = register_org()
    await runtime.command_consumer.process_batch(records(envelope(existing)))
    before = envelope(register_org(name="前一单位"))
    duplicate_org = envelope(register_org(existing.org_id, name="重复标识"))
    rename_missing = envelope(RenameOrg(org_id=uuid.uuid4(), name="无此机构", document=DOC))
    after = envelope(register_org(name="后一单位"))
    await runtime.command_consumer.process_batch(
        records(before, duplicate_org, rename_missing, after)
    )
    assert (await result(runtime, before.id)).type == COMPLETED
    assert (await result(runtime, after.id)).type == COMPLETED
    assert (await result(runtime, duplicate_org.id)).data["code"] == "conflict"
    assert (await result(runtime, rename_missing.id)).data["code"] == "not_found"
    assert (await result(runtime, rename_missing.id)).type == REJECTED
    assert await count(runtime, orgs) == 3
    assert await count(runtime, org_history) == 3


async def test_a_transient_failure_retries_the_whole_batch_once_it_passes(runtime) -> None:
    envs = [envelope(register_org(name=f"单位{i}")) for i in range(5)]
    uow_class = runtime.definition.uow_class
    failures = {"left": 2}
    original_commit = uow_class.commit

    async def flaky_commit(self) -> None:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OperationalError("COMMIT", {}, Exception("database is locked"))
        await original_commit(self)

    uow_class.commit = flaky_commit  # type: ignore[method-assign]
    try:
        await runtime.command_consumer.process_batch(records(*envs))
    finally:
        uow_class.commit = original_commit  # type: ignore[method-assign]
    assert failures["left"] == 0
    assert await count(runtime, orgs) == 5
    for env in envs:
        assert len(await results(runtime, env.id)) == 1
    assert len(await outbox(runtime)) == 10  # 5 events + 5 results, nothing twice
