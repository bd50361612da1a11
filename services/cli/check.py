"""`bianzhi check`: the reconciliation an office runs (督查) — does the roster agree with quota?

For every org of a division (and below) it compares the people the roster has in each category
with the places quota counts as occupied, and lists over-quota orgs and over-held leader posts.
People whose enrolment, transfer or release is still in flight may already count on one side
only; they widen the tolerance of their org and are shown, and the sagas in flight are counted.
Exit status: 0 everything agrees, 1 something to look at, 2 error.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

from contracts import identifiers
from services.cli.common import add_data_dir_option
from services.cli.report import Api, format_table, service_url

DEFAULT_QUOTA_URL = "http://127.0.0.1:8081"
DEFAULT_ROSTER_URL = "http://127.0.0.1:8082"
EXIT_OK = 0
EXIT_FINDINGS = 1


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "check",
        help="reconcile the roster with quota (督查): mismatches, over-quota, leader posts",
        description=(
            "Compare, per org and category, the people on the roster with the places quota "
            "counts as occupied, and list over-quota orgs and over-held leader posts. Exit "
            "status 0 when everything agrees, 1 when there are findings."
        ),
    )
    parser.add_argument(
        "--division",
        default="130000",
        type=_division_code,
        metavar="CODE",
        help="the division to check, with everything below it (default 130000)",
    )
    parser.add_argument("--quota-url", metavar="URL", help="the quota query API")
    parser.add_argument("--roster-url", metavar="URL", help="the roster query API")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    add_data_dir_option(parser)
    parser.set_defaults(run=run)


def _division_code(text: str) -> str:
    if identifiers.division(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a known GB/T 2260 division code")
    return text


@dataclass(frozen=True)
class Mismatch:
    org_id: str
    division_code: str | None
    category: str
    quota_occupied: int
    roster_held: int
    roster_changing: int
    roster_enrolling: int


@dataclass
class Findings:
    division: str
    orgs_checked: int
    people: int
    occupied: int
    mismatches: list[Mismatch]
    in_flight: list[Mismatch]
    over_quota: list[dict[str, Any]]
    over_held_posts: list[dict[str, Any]]
    sagas_in_flight: int

    @property
    def clean(self) -> bool:
        return not self.mismatches and not self.over_quota and not self.over_held_posts


def reconcile(
    occupancy: dict[str, Any], counts: dict[str, Any]
) -> tuple[list[Mismatch], list[Mismatch], int, int, int]:
    """Mismatches (outside any tolerance), differences explained by work in flight, orgs
    checked, people on the roster and places occupied in quota."""
    quota = {
        (o["org_id"], cat): (o["division_code"], n["occupied"])
        for o in occupancy["orgs"]
        for cat, n in o["categories"].items()
    }
    roster = {
        (o["org_id"], cat): (o["division_code"], n)
        for o in counts["orgs"]
        for cat, n in o["categories"].items()
    }
    zero = {"held": 0, "changing": 0, "enrolling": 0}
    mismatches: list[Mismatch] = []
    in_flight: list[Mismatch] = []
    for key in sorted(set(quota) | set(roster)):
        q_division, occupied = quota.get(key, (None, 0))
        r_division, n = roster.get(key, (None, zero))
        if occupied == n["held"]:
            continue
        found = Mismatch(
            org_id=key[0],
            division_code=q_division or r_division,
            category=key[1],
            quota_occupied=occupied,
            roster_held=n["held"],
            roster_changing=n["changing"],
            roster_enrolling=n["enrolling"],
        )
        low, high = n["held"] - n["changing"], n["held"] + n["enrolling"]
        (in_flight if low <= occupied <= high else mismatches).append(found)
    orgs = {k[0] for k in quota} | {k[0] for k in roster}
    people = sum(n["held"] for _, n in roster.values())
    occupied_total = sum(o for _, o in quota.values())
    return mismatches, in_flight, len(orgs), people, occupied_total


def run(args: argparse.Namespace) -> int:
    quota = Api("quota", service_url(args, "quota", args.quota_url, DEFAULT_QUOTA_URL))
    roster = Api("roster", service_url(args, "roster", args.roster_url, DEFAULT_ROSTER_URL))
    occupancy = quota.get("/occupancy", division_code=args.division)
    counts = roster.get("/counts", division_code=args.division)
    over = quota.get("/over-quota", division_code=args.division)
    sagas = roster.get("/sagas", status="waiting", limit=1000)
    mismatches, in_flight, orgs, people, occupied = reconcile(occupancy, counts)
    findings = Findings(
        division=args.division,
        orgs_checked=orgs,
        people=people,
        occupied=occupied,
        mismatches=mismatches,
        in_flight=in_flight,
        over_quota=over["establishment"],
        over_held_posts=over["leader_posts"],
        sagas_in_flight=len(sagas["sagas"]),
    )
    if args.format == "json":
        body = asdict(findings) | {"clean": findings.clean}
        sys.stdout.write(json.dumps(body, ensure_ascii=False, indent=2) + "\n")
    else:
        sys.stdout.write(render(findings))
    return EXIT_OK if findings.clean else EXIT_FINDINGS


def render(f: Findings) -> str:
    division = identifiers.division(f.division)
    name = division.name if division else ""
    lines = [
        f"督查 {f.division} {name}: {f.orgs_checked} orgs, roster {f.people} people, "
        f"quota {f.occupied} occupied, {f.sagas_in_flight} sagas in flight",
    ]
    headers = (
        "单位ID",
        "区划",
        "编制类别",
        "编制实有(quota)",
        "在编人员(roster)",
        "办理中",
        "入编中",
    )

    def rows(items: list[Mismatch]) -> list[list[Any]]:
        return [
            [
                m.org_id,
                m.division_code or "",
                m.category,
                m.quota_occupied,
                m.roster_held,
                m.roster_changing,
                m.roster_enrolling,
            ]
            for m in items
        ]

    if f.mismatches:
        lines += [
            "",
            f"不一致 mismatches: {len(f.mismatches)}",
            *format_table(headers, rows(f.mismatches)),
        ]
    if f.in_flight:
        lines += [
            "",
            f"办理中 explained by work in flight (check again later): {len(f.in_flight)}",
            *format_table(headers, rows(f.in_flight)),
        ]
    if f.over_quota:
        lines += ["", f"超编 orgs holding more than approved: {len(f.over_quota)}"]
        lines += format_table(
            ("单位ID", "单位名称", "区划", "编制类别", "核定数", "实有数"),
            [
                [
                    o["org_id"],
                    o["name"] or "",
                    o["division_code"] or "",
                    o["category"],
                    o["approved"],
                    o["occupied"],
                ]
                for o in f.over_quota
            ],
        )
    if f.over_held_posts:
        lines += ["", f"超职数 leader posts held over approved: {len(f.over_held_posts)}"]
        lines += [json.dumps(o, ensure_ascii=False) for o in f.over_held_posts]
    lines += ["", "一致 everything agrees" if f.clean else "有问题 findings above"]
    return "\n".join(lines) + "\n"
