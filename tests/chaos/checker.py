"""The checker: after a run, the ledger against the databases (through the query APIs and the
reconciliation of `bianzhi check`) and the topics.

Every ``bad`` count must be zero for the run to pass; ``counts`` are the figures of the run.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from contracts.topics import events
from services.cli.check import reconcile
from tests.chaos.ledger import COMPLETED, Ledger
from tests.chaos.load import CAT, World
from tests.chaos.platform import get_json

# Events one command may legitimately cause more than once (one per threshold or category).
REPEATABLE = frozenset(
    {"bianzhi.quota.RegionLimitReached.v1", "bianzhi.quota.OverQuotaDetected.v1"}
)
HOLDING = frozenset({"enrolling", "active", "transferring", "releasing"})
PERSON_EVENTS = {
    "bianzhi.roster.PersonEnrolled.v1": "enrolled",
    "bianzhi.roster.PersonTransferred.v1": "transferred",
    "bianzhi.roster.PersonReleased.v1": "released",
}
# Roster saga statuses that may still change something: waiting for quota's answer, a
# transfer's or release's step being cancelled, and an enrolment's compensation under way
# (`timed_out`; a transfer or release whose step was cancelled ends as `cancelled`).
OPEN_SAGA_STATUSES = ("waiting", "cancelling", "timed_out")


def saga_open(saga: dict[str, Any]) -> bool:
    return saga["status"] in OPEN_SAGA_STATUSES


BAD = (
    "commands_without_result",
    "commands_with_more_than_one_result",
    "commands_with_more_than_one_effect",
    "effects_missing",
    "effects_of_refused_commands",
    "valid_commands_refused",
    "malformed_commands_accepted",
    "rule_breaking_commands_accepted",
    "events_out_of_order",
    "poison_not_dead_lettered",
    "dead_letters_without_error",
    "unexpected_dead_letters",
    "quota_state_mismatches",
    "roster_state_mismatches",
    "orgs_state_mismatches",
    "leader_post_mismatches",
    "invariant_occupied_reserved_over_approved",
    "invariant_region_over_limit",
    "invariant_more_than_one_slot",
    "invariant_leader_posts_over_approved",
    "check_mismatches",
    "check_in_flight",
    "check_over_quota",
    "check_over_held_posts",
    "sagas_open",
    "model_surprises",
)


@dataclass
class Report:
    counts: dict[str, int] = field(default_factory=dict)
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD, 0))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not any(self.bad.values())

    def flag(self, what: str, example: str) -> None:
        self.bad[what] += 1
        if len(self.examples[what]) < 5:
            self.examples[what].append(example)

    def render(self) -> str:
        lines = ["chaos check: " + ("PASS" if self.passed else "FAIL")]
        lines += [f"  {k}: {v:,}" for k, v in self.counts.items()]
        for k, v in self.extra.items():
            lines.append(f"  {k}: {v}")
        lines.append("  bad outcomes (each must be 0):")
        for k, v in self.bad.items():
            lines.append(f"    {k}: {v}" + ("  <-- " if v else ""))
            lines += [f"      e.g. {e}" for e in self.examples.get(k, [])]
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "counts": dict(self.counts),
            "bad": {k: v for k, v in self.bad.items() if v},
            "examples": {k: v for k, v in self.examples.items() if v},
            **self.extra,
        }


def check_ledger(ledger: Ledger, report: Report, tolerated: frozenset[str] = frozenset()) -> None:
    """Results, effects, order and dead letters: the topics against what was sent. A valid
    command refused with a code in ``tolerated`` (say ``timeout``, when a scenario makes sagas
    time out on purpose) is counted, not flagged."""
    sent = ledger.sent
    report.counts["commands_sent"] = len(sent)
    report.counts["sends_total"] = sum(s.sends for s in sent.values())
    report.counts["duplicates_resent"] = sum(s.sends - 1 for s in sent.values())
    for kind in ("valid", "malformed", "rule"):
        report.counts[f"commands_{kind}"] = sum(1 for s in sent.values() if s.kind == kind)
    ours = {cid: rs for cid, rs in ledger.results.items() if cid in sent}
    report.counts["results_seen"] = sum(len(rs) for rs in ours.values())
    report.counts["results_distinct"] = sum(len({r.result_id for r in rs}) for rs in ours.values())
    outcomes: Counter[str] = Counter()

    first_event: dict[str, Any] = {}
    for e in ledger.events:
        first_event.setdefault(e.id, e)
    report.counts["events_seen"] = len(ledger.events)
    report.counts["events_distinct"] = len(first_event)
    by_correlation: dict[str, list[Any]] = defaultdict(list)
    for e in first_event.values():
        if e.correlationid:
            by_correlation[e.correlationid].append(e)

    for cid, s in sent.items():
        rs = ours.get(cid, [])
        if not rs:
            report.flag("commands_without_result", f"{s.op} {s.type} {cid}")
            continue
        distinct = {(r.result_id, r.type, r.code) for r in rs}
        if len({r.result_id for r in rs}) > 1 or len({(t, c) for _, t, c in distinct}) > 1:
            report.flag("commands_with_more_than_one_result", f"{s.op} {cid}: {sorted(distinct)}")
        first = rs[0]
        ok = first.type == COMPLETED
        outcomes[f"{s.kind}:{'completed' if ok else first.code}"] += 1
        if s.kind == "valid" and not ok and first.code in tolerated:
            report.counts["valid_commands_refused_as_tolerated"] = (
                report.counts.get("valid_commands_refused_as_tolerated", 0) + 1
            )
        elif s.kind == "valid" and not ok:
            report.flag("valid_commands_refused", f"{s.op} {cid}: {first.code}")
        if s.kind == "malformed" and ok:
            report.flag("malformed_commands_accepted", f"{s.op} {cid}")
        if s.kind == "rule" and ok:
            report.flag("rule_breaking_commands_accepted", f"{s.op} {cid}")
        if s.kind == "rule" and not ok and first.code != s.expect:
            report.examples["rule_breaking_other_code"].append(f"{s.op}: {first.code}")
        caused = by_correlation.get(cid, [])
        per_type = Counter(e.type for e in caused if e.type not in REPEATABLE)
        doubled = {t: n for t, n in per_type.items() if n > 1}
        if doubled:
            report.flag("commands_with_more_than_one_effect", f"{s.op} {cid}: {doubled}")
        if ok:
            missing = [e for e in first.events if e not in first_event]
            if missing:
                report.flag("effects_missing", f"{s.op} {cid}: {len(missing)} of {first.events}")
        else:
            own = [e for e in caused if e.topic == events(s.service)]
            if own:
                report.flag("effects_of_refused_commands", f"{s.op} {cid}: {[e.type for e in own]}")
    report.extra["outcomes"] = dict(sorted(outcomes.items()))
    _check_order(first_event.values(), report)
    _check_dead_letters(ledger, report)


def _check_order(first: Any, report: Report) -> None:
    """Per topic and key, in the order the broker holds them: event times never go back, and
    a person's life goes enrolled → transferred* → released (→ enrolled again)."""
    streams: dict[tuple[str, str | None], list[Any]] = defaultdict(list)
    for e in first:
        streams[(e.topic, e.key)].append(e)
    checked = 0
    for (topic, key), items in streams.items():
        items.sort(key=lambda e: (e.broker, e.partition, e.offset))
        last: datetime | None = None
        life: str | None = None
        for e in items:
            checked += 1
            try:
                at = datetime.fromisoformat(e.time)
            except ValueError:
                at = None
            if at is not None and last is not None and at < last:
                report.flag("events_out_of_order", f"{topic} key {key}: {e.type} {e.id} earlier")
            if at is not None:
                last = at
            step = PERSON_EVENTS.get(e.type)
            if step is not None:
                allowed = {
                    None: {"enrolled"},
                    "enrolled": {"transferred", "released"},
                    "transferred": {"transferred", "released"},
                    "released": {"enrolled"},
                }[life]
                if step not in allowed:
                    report.flag(
                        "events_out_of_order", f"person {key}: {step} after {life or 'nothing'}"
                    )
                life = step
    report.counts["events_checked_for_order"] = checked


def _check_dead_letters(ledger: Ledger, report: Report) -> None:
    report.counts["poison_sent"] = len(ledger.poison)
    report.counts["dead_letters_seen"] = len(ledger.dead)
    report.counts["dead_letters_sealed"] = sum(1 for d in ledger.dead if d.sealed)
    matched: set[int] = set()
    for p in ledger.poison:
        hits = [
            i
            for i, d in enumerate(ledger.dead)
            if d.topic == f"{p.topic}.dlq"
            and (
                (d.broker, d.original_partition, d.original_offset)
                == (p.broker, p.partition, p.offset)
                # by content where the service does not seal what it dead-letters
                or p.token.encode() in d.value
            )
        ]
        if not hits:
            report.flag("poison_not_dead_lettered", f"{p.topic} {p.token}")
            continue
        matched.update(hits)
        if not any(ledger.dead[i].error for i in hits):
            report.flag("dead_letters_without_error", p.token)
    for i, d in enumerate(ledger.dead):
        if i not in matched:
            report.flag("unexpected_dead_letters", f"{d.topic}: {d.error} {d.value[:120]!r}")


async def check_state(
    world: World, urls: dict[str, str], report: Report, *, registered_orgs: list[str]
) -> None:
    """The databases, through the query APIs, against the model and WIRE-CONTRACT §7."""
    quota, roster, orgs = urls["quota"], urls["roster"], urls["orgs"]
    division = "130000"
    _, occupancy = await _get(f"{quota}/occupancy?division_code={division}")
    _, counts = await _get(f"{roster}/counts?division_code={division}")
    _, over = await _get(f"{quota}/over-quota?division_code={division}")

    # §7.1 and the model: approved, occupied, reserved per org.
    live = {o["org_id"]: o["categories"].get(CAT.value, {}) for o in occupancy["orgs"]}
    for o in occupancy["orgs"]:
        for cat, n in o["categories"].items():
            if n["occupied"] + n["reserved"] > n["approved"]:
                report.flag(
                    "invariant_occupied_reserved_over_approved", f"{o['org_id']} {cat}: {n}"
                )
    for org_id, org in world.orgs.items():
        expected = {
            "approved": org.approved,
            "occupied": world.occupied(org_id),
            "reserved": world.reserved(org_id),
        }
        got = {k: live.get(org_id, {}).get(k, 0) for k in expected}
        if got != expected:
            report.flag("quota_state_mismatches", f"{org_id}: quota {got}, model {expected}")
    report.counts["occupied_expected"] = sum(world.occupied(o) for o in world.orgs)
    report.counts["occupied_in_quota"] = sum(n.get("occupied", 0) for n in live.values())

    # §7.2: every county with a limit; and its approved total against the model.
    for code, county in world.counties.items():
        _, body = await _get(f"{quota}/divisions/{code}/establishment")
        row = next((c for c in body["categories"] if c["category"] == CAT.value), None)
        approved = row["approved"] if row else 0
        limit = row["limit"] if row else None
        if limit is not None and approved > limit:
            report.flag("invariant_region_over_limit", f"{code}: {approved} > {limit}")
        if limit != county.limit or approved != county.approved:
            report.flag(
                "quota_state_mismatches",
                f"division {code}: approved {approved} limit {limit}, model "
                f"{county.approved} limit {county.limit}",
            )

    # §7.4: leader posts of every org, against their approved counts and the model.
    async def posts(org_id: str) -> tuple[str, Any]:
        return org_id, (await _get(f"{quota}/orgs/{org_id}/establishment"))[1]

    for org_id, body in await _gather([posts(o) for o in world.orgs]):
        org = world.orgs[org_id]
        rows = [p for p in body["leader_posts"] if p["unit_id"] is None]
        for p in body["leader_posts"]:
            if p["principal_held"] > p["principal"] or p["deputy_held"] > p["deputy"]:
                report.flag("invariant_leader_posts_over_approved", f"{org_id}: {p}")
        got = (rows[0]["principal_held"], rows[0]["deputy_held"]) if rows else (0, 0)
        if got != (org.principal_held, org.deputy_held):
            report.flag(
                "leader_post_mismatches",
                f"{org_id}: held {got}, model {(org.principal_held, org.deputy_held)}",
            )

    # §7.3: one slot per person: every person the load touched, against the model.
    async def person(pid: str) -> tuple[str, int, Any]:
        status, body = await _get(f"{roster}/people/{pid}", allow=(200, 404))
        return pid, status, body

    people = await _gather([person(p) for p in world.people])
    holders = 0
    for pid, status, body in people:
        model = world.people[pid]
        state = body.get("status") if status == 200 and body else None
        if model.org_id is not None:
            holders += 1
            if state != "active" or body.get("org_id") != model.org_id:
                report.flag(
                    "roster_state_mismatches",
                    f"{pid}: roster {state} in {body.get('org_id') if body else None}, "
                    f"model active in {model.org_id}",
                )
        elif state in HOLDING:
            report.flag("roster_state_mismatches", f"{pid}: roster {state}, model holds no slot")
    report.counts["people_touched"] = len(world.people)
    report.counts["people_holding_expected"] = holders
    totals = counts["totals"].get(CAT.value, {"held": 0, "changing": 0, "enrolling": 0})
    report.counts["people_holding_in_roster"] = totals["held"]
    if totals["held"] != holders:
        report.flag(
            "invariant_more_than_one_slot", f"roster holds {totals['held']}, model {holders}"
        )
    if (
        report.counts["occupied_in_quota"] != totals["held"]
        and not report.bad["quota_state_mismatches"]
    ):
        report.flag(
            "invariant_more_than_one_slot",
            f"quota occupied {report.counts['occupied_in_quota']}, roster holds {totals['held']}",
        )

    # `bianzhi check` (督查): the reconciliation an office runs, reused as it is.
    mismatches, in_flight, orgs_checked, people_n, occupied = reconcile(occupancy, counts)
    report.extra["bianzhi_check"] = (
        f"{orgs_checked} orgs, roster {people_n} people, quota {occupied} occupied"
    )
    for m in mismatches:
        report.flag("check_mismatches", str(m))
    for m in in_flight:
        report.flag("check_in_flight", str(m))
    for o in over["establishment"]:
        report.flag("check_over_quota", str(o))
    for o in over["leader_posts"]:
        report.flag("check_over_held_posts", str(o))
    for status in OPEN_SAGA_STATUSES:
        _, sagas = await _get(f"{roster}/sagas?status={status}&limit=1000")
        for s in sagas["sagas"]:
            if saga_open(s):
                report.flag("sagas_open", f"{status}: {s['kind']} {s['command_id']}")

    # orgs: every org registered (set-up and load) is there.
    async def org(org_id: str) -> tuple[str, int]:
        status, _ = await _get(f"{orgs}/orgs/{org_id}", allow=(200, 404))
        return org_id, status

    for org_id, status in await _gather([org(o) for o in registered_orgs]):
        if status != 200:
            report.flag("orgs_state_mismatches", f"org {org_id}: {status}")
    report.counts["orgs_registered"] = len(registered_orgs)
    for surprise in world.unexpected:
        report.flag("model_surprises", surprise)


async def check(
    ledger: Ledger,
    world: World,
    urls: dict[str, str],
    tolerated: frozenset[str] = frozenset(),
) -> Report:
    report = Report()
    check_ledger(ledger, report, tolerated)
    registered = sorted(set(world.orgs) | world.registered)
    await check_state(world, urls, report, registered_orgs=registered)
    report.extra["faults"] = len(ledger.faults)
    return report


async def _get(url: str, allow: tuple[int, ...] = (200,)) -> tuple[int, Any]:
    for _ in range(20):
        status, body = await get_json(url)
        if status in allow:
            return status, body
        await asyncio.sleep(0.5)
    raise RuntimeError(f"GET {url}: {status} {body}")


async def _gather(calls: list[Any], width: int = 16) -> list[Any]:
    """Run the calls at most ``width`` at a time."""
    out: list[Any] = []
    for i in range(0, len(calls), width):
        out += await asyncio.gather(*calls[i : i + width])
    return out
