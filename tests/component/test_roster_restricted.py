"""The personal-data boundary's restricted topic: every ``Person*`` event the roster writes is
accompanied, in the same transaction, by exactly one ``Person*Restricted`` event on
``bianzhi.roster.events.restricted.v1`` carrying the full citizen ID, while the public event stays
masked (SQLite and PostgreSQL, no broker: the outboxes are read directly).
"""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import select, update

from contracts.base import Event, registry
from contracts.codes import Category, ReleaseReason
from contracts.envelope import Envelope
from contracts.identifiers import mask_citizen_id
from contracts.orgs import OrgsMerged
from contracts.roster import (
    PersonEnrolled,
    PersonReleased,
    PersonTransferred,
    PersonUpdated,
    ReleasePerson,
    RestrictedPersonEvent,
    TransferPerson,
    UpdatePerson,
)
from contracts.topics import (
    ORGS_EVENTS,
    RESTRICTED_TOPICS,
    ROSTER_EVENTS,
    ROSTER_EVENTS_RESTRICTED,
)
from services.roster.adapters.orm import people
from services.runtime.sealing import SEALED_HEADER
from tests.component.test_orgs_handlers import DeadLetters
from tests.component.test_roster_sagas import (
    APPROVER,
    COMPLETED,
    DOC,
    REJECTED,
    Platform,
    citizen,
    enrol,
    platform,  # noqa: F401  (fixture)
    raw,
)

PUBLIC = (PersonEnrolled, PersonTransferred, PersonReleased, PersonUpdated)


class Outboxes:
    """The roster's public and restricted events, and which of them a step added."""

    def __init__(self, wired: Platform) -> None:
        self.platform = wired
        self.public: list[Envelope] = []
        self.restricted: list[Envelope] = []

    async def rows(self, topic: str) -> list[Any]:
        table = self.platform.roster.definition.tables.outbox
        async with self.platform.roster.sessions() as session:
            query = select(table).where(table.c.topic == topic).order_by(table.c.seq)
            return list((await session.execute(query)).all())

    async def added(self) -> tuple[list[Envelope], list[Envelope]]:
        """The public and the restricted events written since the last call."""
        public = [Envelope.from_bytes(r.value) for r in await self.rows(ROSTER_EVENTS)]
        rows = await self.rows(ROSTER_EVENTS_RESTRICTED)
        restricted = [self.opened(row) for row in rows]
        for row, env in zip(rows, restricted, strict=True):
            # Keyed like the public event, so one person's events stay in order.
            assert row.key == env.data["person_id"]
        new = (public[len(self.public) :], restricted[len(self.restricted) :])
        self.public, self.restricted = public, restricted
        return new

    def opened(self, row: Any) -> Envelope:
        """A restricted row waits in the outbox sealed with the personal-data key; the relay
        opens it as it publishes."""
        assert row.headers[SEALED_HEADER].startswith("roster-personal-data:")
        sealer = self.platform.roster.definition.sealer
        assert sealer is not None
        return Envelope.from_bytes(sealer.unseal(row.value, ROSTER_EVENTS_RESTRICTED))

    async def one_pair(self, type_: str, number: str) -> tuple[Envelope, Envelope]:
        """The one public event of ``type_`` the last step wrote and its one restricted
        counterpart, checked against each other."""
        (public,), (restricted,) = await self.added()
        assert public.type == f"bianzhi.roster.{type_}.v1"
        assert restricted.type == f"bianzhi.roster.{type_}Restricted.v1"
        assert_counterpart(public, restricted, number)
        return public, restricted


def assert_counterpart(public: Envelope, restricted: Envelope, number: str) -> None:
    # The public event is masked; its counterpart holds the number in full and the same facts.
    assert number not in public.to_bytes().decode()
    assert public.data["citizen_id_masked"] == mask_citizen_id(number)
    assert restricted.data["citizen_id"] == number
    assert restricted.data["event_id"] == public.id != restricted.id
    assert {k: v for k, v in restricted.data.items() if k not in ("citizen_id", "event_id")} == (
        public.data
    )
    assert restricted.subject == public.subject == public.data["person_id"]
    same = ("source", "correlationid", "causationid", "actorid", "actorregion", "time")
    assert [getattr(restricted, a) for a in same] == [getattr(public, a) for a in same]
    model = registry()[restricted.type]
    assert model.TOPIC == ROSTER_EVENTS_RESTRICTED
    assert model.model_validate(restricted.data).citizen_id == number  # type: ignore[attr-defined]


def test_each_public_person_event_has_one_restricted_counterpart_and_nothing_else_is_full() -> None:
    restricted = {t: m for t, m in registry().items() if issubclass(m, RestrictedPersonEvent)}
    for public in PUBLIC:
        (counterpart,) = [m for m in restricted.values() if issubclass(m, public)]
        assert public.TYPE.replace(".v1", "Restricted.v1") == counterpart.TYPE
        assert set(counterpart.model_fields) == set(public.model_fields) | {
            "citizen_id",
            "event_id",
        }
        assert counterpart.SUBJECT == public.SUBJECT == "person_id"
    assert len(restricted) == len(PUBLIC)
    # A full citizen ID is a field of the restricted events only, and only they travel there.
    for type_, model in registry().items():
        if issubclass(model, Event):
            full = "citizen_id" in model.model_fields
            assert full == (model.TOPIC in RESTRICTED_TOPICS) == (type_ in restricted), type_


async def test_enrol_update_transfer_release_each_stage_one_restricted_event(
    platform: Platform,  # noqa: F811
) -> None:
    box = Outboxes(platform)
    source, target = await platform.org(), await platform.org()
    number = citizen()
    enrolment = await platform.send(enrol(number, source, await platform.notice(source, 1)))
    public, restricted = await box.one_pair("PersonEnrolled", number)
    assert restricted.correlationid == enrolment.id
    person_id = public.data["person_id"]
    assert restricted.data["name"] == "张伟" and restricted.data["org_id"] == str(source)

    await platform.send(UpdatePerson(citizen_id=number, position="副科长", phone="13900139000"))
    _, restricted = await box.one_pair("PersonUpdated", number)
    assert restricted.data["changed"] == ["position", "phone"]
    assert "13900139000" not in restricted.to_bytes().decode()  # the phone is never published

    await platform.send(
        TransferPerson(
            citizen_id=number,
            to_org_id=target,
            category=Category.ADMIN,
            notice_no=await platform.notice(target, 1),
            effective_date=date(2026, 6, 1),
            document=DOC,
        )
    )
    _, restricted = await box.one_pair("PersonTransferred", number)
    assert (restricted.data["from_org_id"], restricted.data["to_org_id"]) == (
        str(source),
        str(target),
    )

    release = await platform.send(
        ReleasePerson(
            citizen_id=number, reason=ReleaseReason.RETIRED, effective_date=date(2026, 12, 31)
        )
    )
    _, restricted = await box.one_pair("PersonReleased", number)
    assert restricted.data["reason"] == "retired" and restricted.data["person_id"] == person_id
    assert (await platform.result(platform.roster, release.id)).type == COMPLETED
    # Every other topic the roster writes stays free of the number.
    table = platform.roster.definition.tables.outbox
    async with platform.roster.sessions() as session:
        rows = (await session.execute(select(table))).all()
    # The restricted rows are sealed too: the number is nowhere in the roster's outbox.
    assert len(rows) > 12 and not any(number.encode() in r.value for r in rows)
    restricted = [box.opened(r) for r in rows if r.topic == ROSTER_EVENTS_RESTRICTED]
    assert [e.data["citizen_id"] for e in restricted] == [number] * 4


async def test_refused_commands_stage_no_restricted_event(platform: Platform) -> None:  # noqa: F811
    box = Outboxes(platform)
    org_id = await platform.org()
    number = citizen()
    full = await platform.notice(org_id, 1)
    await platform.send(enrol(number, org_id, full))
    await box.added()
    refusals = [
        enrol(citizen(), org_id, full),  # quota refuses: the notice has no place left
        enrol(number, org_id, full),  # the roster refuses: already enrolled
        UpdatePerson(citizen_id=number, position=None, education=None, phone="13800138000"),
        UpdatePerson(citizen_id=citizen(), position="科员"),  # not on the roster
    ]
    for cmd in refusals:
        env = await platform.send(cmd)
        assert (await platform.result(platform.roster, env.id)).type == REJECTED
    assert await box.added() == ([], [])


async def test_a_merge_moves_people_with_their_restricted_counterparts(
    platform: Platform,  # noqa: F811
) -> None:
    box = Outboxes(platform)
    source, target = await platform.org(), await platform.org()
    notice_no = await platform.notice(source, 3)
    settled = [citizen(), citizen()]
    for number in settled:
        await platform.send(enrol(number, source, notice_no))
    await platform.send(enrol(citizen(), source, notice_no), pump=False)  # still enrolling
    await box.added()
    merged = OrgsMerged(
        source_org_ids=[source],
        target_org_id=target,
        document=DOC,
        effective_date=date(2026, 9, 1),
    ).envelope(source="/orgs", **APPROVER)
    await platform.roster_orgs.process(raw(ORGS_EVENTS, merged))
    public, restricted = await box.added()
    assert len(public) == len(restricted) == 2  # the person still enrolling is not transferred
    by_number = {r.data["citizen_id"]: r for r in restricted}
    assert sorted(by_number) == sorted(settled)
    for event in public:
        number = next(n for n in settled if mask_citizen_id(n) == event.data["citizen_id_masked"])
        assert_counterpart(event, by_number[number], number)
        assert by_number[number].data["by_merge"] is True
        assert by_number[number].causationid == merged.id
    # The merge event seen again (a replay) moves no one and stages nothing.
    await platform.roster_orgs.process(raw(ORGS_EVENTS, merged))
    assert await box.added() == ([], [])


async def test_no_public_event_is_written_without_its_restricted_counterpart(
    platform: Platform,  # noqa: F811
) -> None:
    # If the stored number cannot be read, the whole unit of work fails: the update is not
    # applied and neither event is written (the command goes to the dead-letter topic).
    box = Outboxes(platform)
    org_id = await platform.org()
    notice_no = await platform.notice(org_id, 2)
    good, broken = citizen(), citizen()
    for number in (good, broken):
        await platform.send(enrol(number, org_id, notice_no))
    enrolled, _ = await box.added()
    ids = {e.data["citizen_id_masked"]: e.data["person_id"] for e in enrolled}
    good_id, broken_id = ids[mask_citizen_id(good)], ids[mask_citizen_id(broken)]
    async with platform.roster.sessions() as session:
        # good's ciphertext, bound to good's person id, put in broken's row: it cannot decrypt
        stolen = (await platform.person(good_id)).citizen_enc
        await session.execute(
            update(people).where(people.c.person_id == broken_id).values(citizen_enc=stolen)
        )
        await session.commit()
    platform.roster.command_consumer.retry_initial_s = 0.0
    dead = platform.roster.command_consumer.dead_letter
    assert isinstance(dead, DeadLetters)
    cmd = await platform.send(UpdatePerson(citizen_id=broken, position="处长"))
    assert await platform.results(platform.roster, cmd.id) == []
    assert len(dead.sent) == 1
    assert await box.added() == ([], [])
    assert (await platform.person(broken_id)).position is None
    # The other person, whose number decrypts, is updated as usual.
    await platform.send(UpdatePerson(citizen_id=good, position="科员"))
    (public,), (restricted,) = await box.added()
    assert_counterpart(public, restricted, good)
    assert (await platform.person(good_id)).position == "科员"
