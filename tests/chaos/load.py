"""The load generator: a mix of commands through the real broker, with a ledger.

It keeps a model of what the platform must end up holding, updated from the results it reads:
approved places per org, quota-use notices and their used places, leader posts held, and where
every person it enrolled stands. To keep that model exact while commands run concurrently it
never has two commands in flight on the same person, nor two quota changes (approve, notice,
transfer of quota) on the same org, and it reserves a notice's place (and a leader post, and a
region's headroom) when it sends, giving it back if the command is refused.

Mix (weights, see ``MIX``): enrol, transfer and release people, update a person, approve quota,
issue quota-use notices, transfer quota between orgs, register orgs; plus duplicates (an earlier
envelope re-sent unchanged, same id), malformed commands (bad envelopes, bad data: they must be
refused, nothing else) and rule-breaking ones (enrol on a used-up notice, transfer to an org
whose notice is used up, a second principal, approve past a region limit, enrol someone already
enrolled, release someone never enrolled, a notice larger than the vacancy: each must be refused
with its reason code).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from contracts import identifiers
from contracts.base import Command
from contracts.codes import Category, EntryMethod, LeaderPost, OrgKind, ReleaseReason
from contracts.common import Document
from contracts.envelope import CONTENT_TYPE, Envelope
from contracts.orgs import RegisterOrg
from contracts.quota import (
    ApproveQuota,
    IssueQuotaUseNotice,
    SetLeaderPosts,
    SetRegionLimit,
    TransferQuota,
)
from contracts.roster import EnrolPerson, ReleasePerson, TransferPerson, UpdatePerson
from tests.chaos.ledger import COMPLETED, Ledger, Poison, Reader, ResultSeen, Sent
from tests.chaos.platform import get_json

ACTOR = {"actorid": "chaos.approver", "actorregion": "130000", "actorroles": "approver"}
DOC = Document(title="压力测试核编批复", number="冀编〔2026〕77号", date=date(2026, 1, 5))
EFFECTIVE = date(2026, 3, 1)
VALID_UNTIL = date(2099, 12, 31)
CAT = Category.ADMIN
SOURCE = "/chaos"

# Relative weights of the valid operations.
MIX: dict[str, int] = {
    "enrol": 40,
    "transfer": 14,
    "release": 9,
    "update": 5,
    "approve": 8,
    "notice": 8,
    "transfer_quota": 5,
    "register_org": 6,
    "re_enrol": 5,
}
RULE_BREAKERS = (
    "enrol_on_used_notice",
    "transfer_to_full_org",
    "second_principal",
    "approve_past_limit",
    "enrol_enrolled",
    "release_never_enrolled",
    "notice_past_vacancy",
)
MALFORMED = ("no_specversion", "bad_citizen_id", "unknown_type", "no_actor", "bad_division")


def counties(prefix: str = "1301") -> list[str]:
    """Current county-level divisions under ``prefix`` (bundled GB/T 2260 data)."""
    found = []
    for n in range(100):
        code = f"{prefix}{n:02d}"
        division = identifiers.division(code)
        if division is not None and division.current and division.level == 3:
            found.append(code)
    return found


# --- the model ------------------------------------------------------------------------------


@dataclass
class County:
    code: str
    limit: int = 0
    approved: int = 0  # committed: sum of approved of its orgs
    pending: int = 0  # increases sent, not yet answered


@dataclass
class NoticeModel:
    no: str
    org_id: str
    count: int
    used: int = 0
    pending: int = 0  # places taken by enrolments/transfers in flight

    @property
    def available(self) -> int:
        return self.count - self.used - self.pending


@dataclass
class OrgModel:
    org_id: str
    county: str
    approved: int = 0
    principal: int = 0
    deputy: int = 0
    principal_held: int = 0
    deputy_held: int = 0
    deputy_pending: int = 0
    occupied: int = 0  # people holding one of its slots (see World.move)
    notices: list[str] = field(default_factory=list)
    used_notice: str | None = None  # a notice whose only place is used: every use is refused
    busy: bool = False  # a quota change of this org is in flight


@dataclass
class PersonModel:
    person_id: str
    citizen_id: str
    name: str
    org_id: str | None = None  # the org whose slot the person holds; None when not holding
    leader_post: str | None = None
    busy: bool = False
    setup: bool = False  # the principal of an org, enrolled in set-up: never moved


@dataclass
class World:
    counties: dict[str, County] = field(default_factory=dict)
    orgs: dict[str, OrgModel] = field(default_factory=dict)
    notices: dict[str, NoticeModel] = field(default_factory=dict)
    people: dict[str, PersonModel] = field(default_factory=dict)
    registered: set[str] = field(default_factory=set)  # orgs registered during the load
    released: set[str] = field(default_factory=set)  # people released, who may enrol again
    unexpected: list[str] = field(default_factory=list)  # model updates that made no sense

    def move(self, person: PersonModel, org_id: str | None) -> None:
        """The person now holds a slot of ``org_id`` (None: no slot)."""
        if person.org_id is not None:
            self.orgs[person.org_id].occupied -= 1
        person.org_id = org_id
        if org_id is not None:
            self.orgs[org_id].occupied += 1

    def reserved(self, org_id: str) -> int:
        return sum((n := self.notices[no]).count - n.used for no in self.orgs[org_id].notices)

    def occupied(self, org_id: str) -> int:
        return self.orgs[org_id].occupied

    def held(self, org_id: str) -> int:
        return self.occupied(org_id) + self.reserved(org_id)


# --- the generator --------------------------------------------------------------------------


OnResult = Callable[[bool, str | None], None]


class LoadGenerator:
    def __init__(
        self,
        bootstrap: str,
        ledger: Ledger,
        *,
        seed: int = 1,
        malformed_share: float = 0.01,
        rule_share: float = 0.01,
        duplicate_share: float = 0.05,
    ) -> None:
        self.bootstrap = bootstrap
        self.ledger = ledger
        self.rng = random.Random(seed)
        self.world = World()
        self.malformed_share = malformed_share
        self.rule_share = rule_share
        self.duplicate_share = duplicate_share
        self.pending: dict[str, OnResult] = {}
        self.producer: AIOKafkaProducer | None = None
        self.reader: Reader | None = None
        self._people_seq = 0
        self._org_seq = 0
        self._notice_seq = 0
        self._position_seq = 0
        self._run_tag = uuid.uuid4().hex[:6]
        self._progress = asyncio.Event()
        self.sent_count = 0
        self.load_sent = 0  # commands sent by `run` (set-up and re-sends after a loss excluded)

    # --- broker ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", linger_ms=5, request_timeout_ms=15000
        )
        await self.producer.start()
        self.reader = Reader(self.bootstrap, self.ledger, self._on_first_result)
        await self.reader.start()

    async def stop(self) -> list[str]:
        """Close the reader and the producer for good, even when their broker is gone (then the
        producer drops what it could not deliver once its request timeout has passed: aiokafka
        has no public way to drop it sooner). Returns the Kafka client tasks that ran before
        and still run after (waited for a few seconds, so that a fetch or send finishing its
        last attempt is not counted): none, when every client closed for good."""
        before = kafka_tasks()
        if self.reader is not None:
            reader, self.reader = self.reader, None
            await quietly(reader.stop(), timeout=60.0)
        if self.producer is not None:
            producer, self.producer = self.producer, None
            await quietly(producer.stop(), timeout=60.0)
        if not before:
            return []
        _, left = await asyncio.wait(before, timeout=5.0)
        return sorted(describe_task(task) for task in left)

    async def switch_broker(self, bootstrap: str) -> None:
        """Follow the platform to a fresh broker: read everything on it from the beginning."""
        await self.stop()
        self.bootstrap = bootstrap
        self.ledger.broker_generation += 1
        await self.start()

    def _on_first_result(self, result: ResultSeen) -> None:
        done = self.pending.pop(result.command_id, None)
        if done is not None:
            done(result.type == COMPLETED, result.code)
        self._progress.set()

    async def _publish(self, topic: str, key: bytes, value: bytes) -> RecordMetadata:
        assert self.producer is not None
        return await self.producer.send_and_wait(
            topic, value, key=key, headers=[("content-type", CONTENT_TYPE.encode())]
        )

    async def send(
        self,
        payload: Command,
        *,
        op: str,
        kind: str = "valid",
        expect: str = "completed",
        on_result: OnResult | None = None,
        mutate: Callable[[dict[str, Any]], None] | None = None,
    ) -> str:
        env = payload.envelope(source=SOURCE, **ACTOR)
        return await self.send_envelope(
            env, payload.TOPIC, op=op, kind=kind, expect=expect, on_result=on_result, mutate=mutate
        )

    async def send_envelope(
        self,
        env: Envelope,
        topic: str,
        *,
        op: str,
        kind: str,
        expect: str,
        on_result: OnResult | None,
        mutate: Callable[[dict[str, Any]], None] | None = None,
    ) -> str:
        key = (env.subject or env.id).encode()
        value = env.to_bytes()
        if mutate is not None:
            body = json.loads(value)
            mutate(body)
            value = json.dumps(body, ensure_ascii=False).encode()
        service = topic.split(".")[1]
        sent = Sent(
            id=env.id,
            topic=topic,
            type=env.type,
            kind=kind,
            op=op,
            expect=expect,
            key=key.decode(),
            service=service,
        )
        if on_result is not None:
            self.pending[env.id] = on_result
        self.ledger.record_send(sent, topic, key, value)
        self.sent_count += 1
        await self._publish(topic, key, value)
        return env.id

    async def resend(self, command_id: str) -> None:
        """The same envelope again, byte for byte (a front-end retrying by id)."""
        topic, key, value = self.ledger.payloads[command_id]
        self.ledger.record_send(self.ledger.sent[command_id], topic, key, value)
        self.sent_count += 1
        await self._publish(topic, key, value)

    async def send_poison(self, topic: str) -> None:
        """Garbage bytes (no envelope, no id) and a JSON envelope without an id."""
        for value in (b"\xff\xfe\x00%s\x00", b'{"type": "bianzhi.x.y.v1", "note": "%s"}'):
            token = f"chaos-poison-{uuid.uuid4().hex}"
            meta = await self._publish(topic, token.encode(), value % token.encode())
            self.ledger.record_poison(
                Poison(
                    token=token,
                    topic=topic,
                    sent_at=time.time(),
                    partition=meta.partition,
                    offset=meta.offset,
                    broker=self.ledger.broker_generation,
                )
            )

    async def wait_answered(self, ids: list[str], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            missing = [i for i in ids if i not in self.ledger.results]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: {len(missing)} of {len(ids)} commands unanswered")
            await self.ledger.wait_changed(0.5)

    # --- set-up ---------------------------------------------------------------------------

    async def setup(
        self,
        *,
        orgs: int,
        county_count: int,
        places: int,
        notice_places: int,
        quota_url: str,
        roster_url: str,
        timeout: float = 180.0,
    ) -> None:
        """Region limits, orgs, their quota, leader posts and notices, and one principal per
        org enrolled on a one-place notice (so that notice is used up and the principal post is
        full: the rule-breakers rely on both)."""
        codes = counties()[:county_count]
        w = self.world
        for code in codes:
            w.counties[code] = County(code=code)
        ids: list[str] = []
        for i in range(orgs):
            code = codes[i % len(codes)]
            org_id = str(uuid.uuid4())
            w.orgs[org_id] = OrgModel(org_id=org_id, county=code)
            ids.append(
                await self.send(self._register(org_id, code, f"压力测试机关{i:03d}"), op="setup")
            )
        await self.wait_answered(ids, timeout, "set-up: orgs")
        self._require_completed(ids, "set-up: orgs")
        await self._wait_projected(quota_url, roster_url, list(w.orgs), timeout)
        ids = []
        for code, county in w.counties.items():
            inside = [o for o in w.orgs.values() if o.county == code]
            county.limit = len(inside) * places * 3
            ids.append(
                await self.send(
                    SetRegionLimit(
                        division_code=code, category=CAT, limit=county.limit, document=DOC
                    ),
                    op="setup",
                )
            )
        await self.wait_answered(ids, timeout, "set-up: limits")
        ids = []
        for org in w.orgs.values():
            org.approved = places
            w.counties[org.county].approved += places
            org.principal, org.deputy = 1, 3
            ids.append(await self.send(self._approve(org.org_id, places), op="setup"))
            ids.append(
                await self.send(
                    SetLeaderPosts(
                        org_id=uuid.UUID(org.org_id), principal=1, deputy=3, document=DOC
                    ),
                    op="setup",
                )
            )
        await self.wait_answered(ids, timeout, "set-up: quota")
        ids = []
        for org in w.orgs.values():
            main = self._new_notice(org, notice_places)
            used = self._new_notice(org, 1)
            org.used_notice = used.no
            ids.append(await self.send(self._issue(main), op="setup"))
            ids.append(await self.send(self._issue(used), op="setup"))
        await self.wait_answered(ids, timeout, "set-up: notices")
        ids = []
        for org in w.orgs.values():
            assert org.used_notice is not None
            person = self._new_person()
            person.setup = True
            self.world.move(person, org.org_id)
            person.leader_post = LeaderPost.PRINCIPAL.value
            org.principal_held = 1
            w.notices[org.used_notice].used = 1
            ids.append(
                await self.send(
                    self._enrol(person, org.org_id, org.used_notice, LeaderPost.PRINCIPAL),
                    op="setup",
                )
            )
        await self.wait_answered(ids, timeout, "set-up: principals")
        self._require_completed(
            [i for i, s in self.ledger.sent.items() if s.op == "setup"], "set-up"
        )

    def _require_completed(self, ids: list[str], what: str) -> None:
        refused = [
            (self.ledger.sent[i].type, self.ledger.results[i][0].code)
            for i in ids
            if self.ledger.results[i][0].type != COMPLETED
        ]
        if refused:
            raise RuntimeError(f"{what}: refused {refused[:5]}")

    async def _wait_projected(
        self, quota_url: str, roster_url: str, org_ids: list[str], timeout: float
    ) -> None:
        """Until quota knows every org, and roster has applied as many OrgRegistered events."""
        deadline = time.monotonic() + timeout
        pending = set(org_ids)
        while pending:
            for org_id in list(pending):
                status, _ = await get_json(f"{quota_url}/orgs/{org_id}/establishment")
                if status == 200:
                    pending.discard(org_id)
            if time.monotonic() > deadline:
                raise RuntimeError(f"quota has not projected {len(pending)} orgs")
            if pending:
                await asyncio.sleep(0.3)
        while True:
            applied = await _metric(
                roster_url,
                "bianzhi_messages_handled_total",
                'type="bianzhi.orgs.OrgRegistered.v1"',
                'outcome="applied"',
            )
            if applied >= len(org_ids):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"roster has projected {applied} of {len(org_ids)} orgs")
            await asyncio.sleep(0.3)

    # --- builders -------------------------------------------------------------------------

    def _register(self, org_id: str, county: str, name: str) -> RegisterOrg:
        return RegisterOrg(
            org_id=uuid.UUID(org_id),
            name=name,
            kind=OrgKind.ORGAN,
            division_code=county,
            document=DOC,
        )

    def _approve(self, org_id: str, approved: int) -> ApproveQuota:
        return ApproveQuota(
            org_id=uuid.UUID(org_id),
            category=CAT,
            approved=approved,
            document=DOC,
            effective_date=DOC.date,
        )

    def _new_notice(self, org: OrgModel, count: int) -> NoticeModel:
        self._notice_seq += 1
        notice = NoticeModel(
            no=f"冀编用〔2026〕{self._run_tag}-{self._notice_seq:05d}号",
            org_id=org.org_id,
            count=count,
        )
        return notice

    def _issue(self, notice: NoticeModel) -> IssueQuotaUseNotice:
        # Known to the model at once: its places are reserved at issue (the org is busy until
        # the answer, so nothing else looks at its vacancy meanwhile).
        self.world.notices[notice.no] = notice
        org = self.world.orgs[notice.org_id]
        org.notices.append(notice.no)
        return IssueQuotaUseNotice(
            notice_no=notice.no,
            org_id=uuid.UUID(notice.org_id),
            category=CAT,
            count=notice.count,
            valid_until=VALID_UNTIL,
            document=DOC,
        )

    def _new_person(self) -> PersonModel:
        i = self._people_seq
        self._people_seq += 1
        born = date(1960, 1, 1) + timedelta(days=(i // 1000) * 7 + self.rng.randrange(5))
        county = self.rng.choice(list(self.world.counties) or ["130102"])
        citizen_id = identifiers.compose_citizen_id(county, born, i % 1000)
        person = PersonModel(
            person_id=str(uuid.uuid4()), citizen_id=citizen_id, name=f"压测人员{i:06d}"
        )
        self.world.people[person.person_id] = person
        return person

    def _enrol(
        self, person: PersonModel, org_id: str, notice_no: str, post: LeaderPost | None = None
    ) -> EnrolPerson:
        return EnrolPerson(
            citizen_id=person.citizen_id,
            person_id=uuid.UUID(person.person_id),
            name=person.name,
            org_id=uuid.UUID(org_id),
            category=CAT,
            notice_no=notice_no,
            leader_post=post,
            entry_method=EntryMethod.EXAM,
            effective_date=EFFECTIVE,
        )

    # --- the load -------------------------------------------------------------------------

    async def run(
        self,
        n: int,
        *,
        rate: float,
        max_in_flight: int = 100,
        stop: asyncio.Event | None = None,
    ) -> int:
        """Send ``n`` commands (duplicates, malformed and rule-breaking ones included) at about
        ``rate`` per second with at most ``max_in_flight`` awaiting their result."""
        started = time.monotonic()
        sent = 0
        while sent < n and not (stop is not None and stop.is_set()):
            pause = started + sent / rate - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            while len(self.pending) >= max_in_flight:
                self._progress.clear()
                try:
                    await asyncio.wait_for(self._progress.wait(), 1.0)
                except TimeoutError:
                    continue
            roll = self.rng.random()
            done = False
            if roll < self.duplicate_share and self.ledger.payloads:
                await self.resend(self.rng.choice(list(self.ledger.payloads)))
                done = True
            elif roll < self.duplicate_share + self.malformed_share:
                done = await self.malformed(self.rng.choice(MALFORMED))
            elif roll < self.duplicate_share + self.malformed_share + self.rule_share:
                done = await self.rule_breaker(self.rng.choice(RULE_BREAKERS))
            if not done:
                done = await self.valid_op()
            if done:
                sent += 1
                self.load_sent += 1
            else:  # nothing possible right now: wait for an answer
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), 1.0)
        return sent

    async def valid_op(self) -> bool:
        ops = list(MIX)
        weights = [MIX[o] for o in ops]
        first = self.rng.choices(ops, weights)[0]
        order = [first] + [o for o in self.rng.sample(ops, len(ops)) if o != first]
        for op in order:
            if await getattr(self, f"op_{op}")():
                return True
        return False

    # Each op returns False when the model allows it nowhere right now.

    def _idle_orgs(self) -> list[OrgModel]:
        return [o for o in self.world.orgs.values() if not o.busy]

    def _holding(self, setup: bool = False) -> list[PersonModel]:
        return [
            p
            for p in self.world.people.values()
            if p.org_id is not None and not p.busy and (setup or not p.setup)
        ]

    def _open_notices(self, exclude_org: str | None = None) -> list[NoticeModel]:
        return [
            n
            for n in self.world.notices.values()
            if n.available > 0 and n.org_id != exclude_org and n.count > 1
        ]

    async def op_enrol(self, person: PersonModel | None = None, op: str = "enrol") -> bool:
        notices = self._open_notices()
        if not notices:
            return False
        notice = self.rng.choice(notices)
        org = self.world.orgs[notice.org_id]
        post = None
        if self.rng.random() < 0.1 and org.deputy_held + org.deputy_pending < org.deputy:
            post = LeaderPost.DEPUTY
            org.deputy_pending += 1
        person = person or self._new_person()
        person.busy = True
        notice.pending += 1

        def done(ok: bool, code: str | None) -> None:
            person.busy = False
            notice.pending -= 1
            if post is not None:
                org.deputy_pending -= 1
            if not ok and op == "re_enrol":
                self.world.released.add(person.person_id)
            if ok:
                notice.used += 1
                self.world.move(person, org.org_id)
                person.leader_post = post.value if post else None
                if post is not None:
                    org.deputy_held += 1

        await self.send(self._enrol(person, org.org_id, notice.no, post), op=op, on_result=done)
        return True

    async def op_re_enrol(self) -> bool:
        released = [
            self.world.people[pid]
            for pid in self.world.released
            if self.world.people[pid].org_id is None and not self.world.people[pid].busy
        ]
        if not released:
            return False
        person = self.rng.choice(released)
        self.world.released.discard(person.person_id)
        return await self.op_enrol(person, op="re_enrol")

    async def op_transfer(self) -> bool:
        people = self._holding()
        if not people:
            return False
        person = self.rng.choice(people)
        notices = self._open_notices(exclude_org=person.org_id)
        if not notices:
            return False
        notice = self.rng.choice(notices)
        source = self.world.orgs[person.org_id] if person.org_id else None
        target = self.world.orgs[notice.org_id]
        person.busy = True
        notice.pending += 1

        def done(ok: bool, code: str | None) -> None:
            person.busy = False
            notice.pending -= 1
            if ok:
                notice.used += 1
                self._drop_post(person, source)
                self.world.move(person, target.org_id)

        cmd = TransferPerson(
            citizen_id=person.citizen_id,
            to_org_id=uuid.UUID(target.org_id),
            category=CAT,
            notice_no=notice.no,
            effective_date=EFFECTIVE,
            document=DOC,
        )
        await self.send(cmd, op="transfer", on_result=done)
        return True

    def _drop_post(self, person: PersonModel, org: OrgModel | None) -> None:
        if org is not None and person.leader_post == LeaderPost.DEPUTY.value:
            org.deputy_held -= 1
        elif org is not None and person.leader_post == LeaderPost.PRINCIPAL.value:
            org.principal_held -= 1
        person.leader_post = None

    async def op_release(self) -> bool:
        people = self._holding()
        if not people:
            return False
        person = self.rng.choice(people)
        org = self.world.orgs[person.org_id] if person.org_id else None
        person.busy = True

        def done(ok: bool, code: str | None) -> None:
            person.busy = False
            if ok:
                self._drop_post(person, org)
                self.world.move(person, None)
                self.world.released.add(person.person_id)

        cmd = ReleasePerson(
            citizen_id=person.citizen_id,
            reason=self.rng.choice(list(ReleaseReason)),
            effective_date=EFFECTIVE,
        )
        await self.send(cmd, op="release", on_result=done)
        return True

    async def op_update(self) -> bool:
        people = self._holding(setup=True)
        if not people:
            return False
        person = self.rng.choice(people)
        person.busy = True

        def done(ok: bool, code: str | None) -> None:
            person.busy = False

        # A post never given before: an update that changes nothing is refused (conflict).
        self._position_seq += 1
        cmd = UpdatePerson(citizen_id=person.citizen_id, position=f"科员{self._position_seq}")
        await self.send(cmd, op="update", on_result=done)
        return True

    async def op_approve(self) -> bool:
        candidates = [
            o
            for o in self._idle_orgs()
            if (c := self.world.counties[o.county]).approved + c.pending + 1 <= c.limit
        ]
        if not candidates:
            return False
        org = self.rng.choice(candidates)
        county = self.world.counties[org.county]
        more = min(self.rng.randint(1, 5), county.limit - county.approved - county.pending)
        org.busy = True
        county.pending += more
        new_total = org.approved + more

        def done(ok: bool, code: str | None) -> None:
            org.busy = False
            county.pending -= more
            if ok:
                org.approved = new_total
                county.approved += more

        await self.send(self._approve(org.org_id, new_total), op="approve", on_result=done)
        return True

    async def op_notice(self) -> bool:
        candidates = [o for o in self._idle_orgs() if o.approved - self.world.held(o.org_id) >= 2]
        if not candidates:
            return False
        org = self.rng.choice(candidates)
        vacancy = org.approved - self.world.held(org.org_id)
        notice = self._new_notice(org, self.rng.randint(2, min(vacancy, 12)))
        org.busy = True
        cmd = self._issue(notice)
        notice.pending = notice.count  # not usable before it is known to be issued

        def done(ok: bool, code: str | None) -> None:
            org.busy = False
            notice.pending = 0
            if not ok:
                notice.count = notice.used = 0

        await self.send(cmd, op="notice", on_result=done)
        return True

    async def op_transfer_quota(self) -> bool:
        idle = self._idle_orgs()
        sources = [o for o in idle if o.approved - self.world.held(o.org_id) >= 1]
        self.rng.shuffle(sources)
        for source in sources:
            targets = [o for o in idle if o.county == source.county and o is not source]
            if not targets:
                continue
            target = self.rng.choice(targets)
            source.busy = target.busy = True

            def done(
                ok: bool, code: str | None, s: OrgModel = source, t: OrgModel = target
            ) -> None:
                s.busy = t.busy = False
                if ok:
                    s.approved -= 1
                    t.approved += 1

            cmd = TransferQuota(
                from_org_id=uuid.UUID(source.org_id),
                to_org_id=uuid.UUID(target.org_id),
                category=CAT,
                amount=1,
                document=DOC,
            )
            await self.send(cmd, op="transfer_quota", on_result=done)
            return True
        return False

    async def op_register_org(self) -> bool:
        self._org_seq += 1
        org_id = str(uuid.uuid4())
        county = self.rng.choice(list(self.world.counties))

        def done(ok: bool, code: str | None) -> None:
            if ok:
                self.world.registered.add(org_id)

        await self.send(
            self._register(org_id, county, f"压测新设机构{self._org_seq:05d}"),
            op="register_org",
            on_result=done,
        )
        return True

    # --- rule-breaking commands ------------------------------------------------------------

    async def rule_breaker(self, which: str) -> bool:
        w = self.world
        if which == "enrol_on_used_notice":
            org = self.rng.choice(list(w.orgs.values()))
            assert org.used_notice is not None
            person = self._new_person()
            person.busy = True
            await self.send(
                self._enrol(person, org.org_id, org.used_notice),
                op=which,
                kind="rule",
                expect="notice_exhausted",
                on_result=lambda ok, code: setattr(person, "busy", False),
            )
            return True
        if which == "transfer_to_full_org":
            people = self._holding()
            if not people:
                return False
            person = self.rng.choice(people)
            target = self.rng.choice([o for o in w.orgs.values() if o.org_id != person.org_id])
            assert target.used_notice is not None
            person.busy = True
            cmd = TransferPerson(
                citizen_id=person.citizen_id,
                to_org_id=uuid.UUID(target.org_id),
                category=CAT,
                notice_no=target.used_notice,
                effective_date=EFFECTIVE,
                document=DOC,
            )
            await self.send(
                cmd,
                op=which,
                kind="rule",
                expect="notice_exhausted",
                on_result=lambda ok, code: setattr(person, "busy", False),
            )
            return True
        if which == "second_principal":
            notices = self._open_notices()
            if not notices:
                return False
            notice = self.rng.choice(notices)
            org = w.orgs[notice.org_id]
            if org.principal_held < org.principal:
                return False
            person = self._new_person()
            person.busy = True
            notice.pending += 1

            def done(ok: bool, code: str | None) -> None:
                person.busy = False
                notice.pending -= 1
                if ok:  # refused by the checker; keep the model honest meanwhile
                    notice.used += 1
                    self.world.move(person, org.org_id)
                    w.unexpected.append(f"second principal enrolled in {org.org_id}")

            await self.send(
                self._enrol(person, org.org_id, notice.no, LeaderPost.PRINCIPAL),
                op=which,
                kind="rule",
                expect="leader_posts_exceeded",
                on_result=done,
            )
            return True
        if which == "approve_past_limit":
            idle = self._idle_orgs()
            if not idle:
                return False
            org = self.rng.choice(idle)
            county = w.counties[org.county]
            asked = org.approved + (county.limit - county.approved) + 1
            org.busy = True

            def unbusy(ok: bool, code: str | None) -> None:
                org.busy = False
                if ok:
                    w.unexpected.append(f"approval past the limit of {county.code} accepted")

            await self.send(
                self._approve(org.org_id, asked),
                op=which,
                kind="rule",
                expect="region_limit_exceeded",
                on_result=unbusy,
            )
            return True
        if which == "enrol_enrolled":
            people = self._holding(setup=True)
            notices = self._open_notices()
            if not people or not notices:
                return False
            person = self.rng.choice(people)
            notice = self.rng.choice(notices)
            person.busy = True
            notice.pending += 1

            def back(ok: bool, code: str | None) -> None:
                person.busy = False
                notice.pending -= 1
                if ok:
                    w.unexpected.append(f"person {person.person_id} enrolled twice")

            await self.send(
                self._enrol(person, notice.org_id, notice.no),
                op=which,
                kind="rule",
                expect="already_enrolled",
                on_result=back,
            )
            return True
        if which == "release_never_enrolled":
            county = self.rng.choice(list(w.counties))
            citizen = identifiers.compose_citizen_id(
                county, date(1950, 1, 1) + timedelta(days=self.rng.randrange(3000)), 999
            )
            cmd = ReleasePerson(
                citizen_id=citizen, reason=ReleaseReason.RETIRED, effective_date=EFFECTIVE
            )
            await self.send(cmd, op=which, kind="rule", expect="not_enrolled")
            return True
        if which == "notice_past_vacancy":
            idle = self._idle_orgs()
            if not idle:
                return False
            org = self.rng.choice(idle)
            org.busy = True
            notice = self._new_notice(org, org.approved + 1)
            cmd = IssueQuotaUseNotice(
                notice_no=notice.no,
                org_id=uuid.UUID(org.org_id),
                category=CAT,
                count=notice.count,
                valid_until=VALID_UNTIL,
                document=DOC,
            )

            def freed(ok: bool, code: str | None) -> None:
                org.busy = False
                if ok:
                    w.unexpected.append(f"notice past the vacancy of {org.org_id} issued")

            await self.send(cmd, op=which, kind="rule", expect="no_vacancy", on_result=freed)
            return True
        raise ValueError(which)

    # --- malformed commands ----------------------------------------------------------------

    async def malformed(self, which: str) -> bool:
        org = self.rng.choice(list(self.world.orgs.values()))
        if which == "no_specversion":
            cmd: Command = self._register(str(uuid.uuid4()), org.county, "格式错误机构")

            def strip(body: dict[str, Any]) -> None:
                body.pop("specversion", None)
                body.pop("source", None)

            await self.send(cmd, op=which, kind="malformed", expect="invalid_message", mutate=strip)
            return True
        if which == "bad_citizen_id":
            person = PersonModel(
                person_id=str(uuid.uuid4()),
                citizen_id=identifiers.compose_citizen_id(org.county, date(1980, 5, 5), 1),
                name="证号错误",
            )
            notice = org.notices[0] if org.notices else "none"
            cmd = self._enrol(person, org.org_id, notice)

            def spoil(body: dict[str, Any]) -> None:
                cid = body["data"]["citizen_id"]
                last = "0" if cid[-1] != "0" else "1"
                body["data"]["citizen_id"] = cid[:-1] + last

            await self.send(
                cmd, op=which, kind="malformed", expect="invalid_citizen_id", mutate=spoil
            )
            return True
        if which == "unknown_type":
            cmd = self._approve(org.org_id, 1)

            def retype(body: dict[str, Any]) -> None:
                body["type"] = "bianzhi.quota.ApproveEverything.v1"

            await self.send(cmd, op=which, kind="malformed", expect="unknown_type", mutate=retype)
            return True
        if which == "no_actor":
            cmd = self._approve(org.org_id, 1)

            def anonymous(body: dict[str, Any]) -> None:
                for name in ("actorid", "actorregion", "actorroles"):
                    body.pop(name, None)

            await self.send(cmd, op=which, kind="malformed", expect="forbidden", mutate=anonymous)
            return True
        if which == "bad_division":
            cmd = self._register(str(uuid.uuid4()), org.county, "区划错误机构")

            def misplace(body: dict[str, Any]) -> None:
                body["data"]["division_code"] = "139999"

            await self.send(cmd, op=which, kind="malformed", expect="rejected", mutate=misplace)
            return True
        raise ValueError(which)

    async def resend_unanswered(self) -> int:
        """Re-send (same id) every command without a result: what a front-end does after the
        broker lost what it had not yet delivered."""
        missing = self.ledger.unanswered()
        for cid in missing:
            await self.resend(cid)
        return len(missing)


def kafka_tasks() -> set[asyncio.Task[Any]]:
    """The running asyncio tasks of Kafka clients (aiokafka's background tasks)."""
    return {
        task
        for task in asyncio.all_tasks()
        if not task.done() and _AIOKAFKA_DIR in _code_file(task.get_coro())
    }


_AIOKAFKA_DIR = f"{os.sep}aiokafka{os.sep}"


def _code_file(coro: Any) -> str:
    code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
    return str(getattr(code, "co_filename", ""))


def describe_task(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", repr(coro))


async def quietly(stopping: Any, timeout: float = 20.0) -> None:
    """Stop a Kafka client whose broker may be gone: errors (and the client's own internal
    cancellation) are swallowed; a cancellation of the caller is not."""
    try:
        await asyncio.wait_for(stopping, timeout)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception:  # the broker is gone: nothing to flush to
        pass


async def _metric(url: str, name: str, *labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include all of ``labels``."""

    def fetch() -> str:
        import urllib.request

        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(fetch)
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total
