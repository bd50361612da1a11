"""`bianzhi demo`: load a realistic province into a running platform.

The commands come from `services.cli.demo_data` (deterministic for a seed) and go out stage by
stage — region limits, organs, the institutions under them, quota and leader posts, quota-use
notices, people — each stage waiting for the results of the one before. A stage whose service
does not answer stops the demo with a clear summary instead of hanging (the batch's stall
timeout). Running it again is harmless: every command id is derived from seed, scope and key.
The plan is dated (notice numbers, ages): a data directory remembers the date its first demo of
a scope and seed was loaded on (`demo.json`), so a run in a later year loads the same plan again
instead of a second province beside the first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import date
from pathlib import Path
from typing import Any

from contracts import identifiers
from contracts.codes import ReasonCode
from contracts.common import office_today
from contracts.topics import SERVICES, commands
from services.cli import demo_data
from services.cli.batch import (
    DEFAULT_IN_FLIGHT,
    DEFAULT_STALL_TIMEOUT_S,
    BatchReport,
    Outgoing,
    RetryPolicy,
    Status,
    send_batch,
)
from services.cli.common import (
    CLI_SOURCE,
    CliError,
    add_broker_options,
    broker_settings,
    positive_float,
    positive_int,
    print_json,
    read_platform,
    say,
    write_json,
)
from services.runtime.settings import Settings

EXIT_COMPLETED = 0
EXIT_REJECTED = 1
EXIT_INCOMPLETE = 3
SOURCE = f"{CLI_SOURCE}/demo"

# Quota and roster learn about orgs from the orgs events: a command that arrives before the
# projection caught up is `not_found`, and is retried under a new (deterministic) id.
CATCH_UP = RetryPolicy(frozenset({ReasonCode.NOT_FOUND.value}), attempts=40, delay_s=0.5)
RETRIED_STAGES = frozenset({"quota", "notices", "people"})
DEMO_FILE = "demo.json"


def register(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "demo",
        help="load a realistic province (Hebei) into a running platform",
        description=(
            "Load demo data: the divisions of --within (Hebei by default), organs and public "
            "institutions at each level, region limits, quota, leader posts, quota-use notices "
            "and --people synthetic people. Deterministic for a --seed; running it again has no "
            "second effect. Prints a JSON summary on stdout. Exit status: 0 every command "
            "completed, 1 some rejected, 2 error, 3 some without result (a service not running)."
        ),
    )
    parser.add_argument(
        "--people",
        type=int,
        default=demo_data.DEFAULT_PEOPLE,
        metavar="N",
        help=f"synthetic people to enrol (default {demo_data.DEFAULT_PEOPLE})",
    )
    parser.add_argument("--seed", type=int, default=1, help="the random seed (default 1)")
    parser.add_argument(
        "--within",
        default=demo_data.HEBEI,
        metavar="CODE",
        help="load this division and everything below it (default 130000, Hebei)",
    )
    parser.add_argument(
        "--as-of",
        type=date.fromisoformat,
        metavar="DATE",
        help=(
            "the day the data is dated (default: the day the first demo of this scope and seed "
            "was loaded from this data directory, else today, China Standard Time)"
        ),
    )
    parser.add_argument("--actor", default="bianzhi-demo", metavar="ID", help="the acting user")
    add_broker_options(parser)
    parser.add_argument(
        "--in-flight",
        type=positive_int,
        default=DEFAULT_IN_FLIGHT,
        metavar="N",
        help=f"commands awaiting their result at once (default {DEFAULT_IN_FLIGHT})",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_STALL_TIMEOUT_S,
        metavar="S",
        help="stop when no result at all arrives for S seconds "
        f"(default {DEFAULT_STALL_TIMEOUT_S:g})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.people < 0:
        raise CliError(f"--people {args.people}: expected 0 or more")
    within = identifiers.division(args.within)
    if within is None or not within.current:
        raise CliError(f"--within {args.within!r}: expected a current GB/T 2260 division code")
    settings = broker_settings(args)
    as_of, remembered = demo_date(settings.data_dir, within.code, args.seed, args.as_of)
    say(f"demo of {within.name} ({within.code}): {args.people} people, seed {args.seed}")
    if remembered:
        say(
            f"dated {as_of.isoformat()}, as the demo loaded before from {settings.data_dir} "
            "(--as-of to date it otherwise)"
        )
    plan = demo_data.build_plan(args.people, seed=args.seed, within=within.code, as_of=as_of)
    say(
        f"{len(plan.orgs)} orgs, {len(plan.limits)} region limits, {len(plan.quotas)} quotas, "
        f"{len(plan.leader_posts)} leader posts, {len(plan.notices)} notices, "
        f"{len(plan.people)} people"
    )
    actor = demo_data.Actor(args.actor, within.code, "approver")
    summary = asyncio.run(
        load(
            plan,
            settings,
            actor,
            in_flight=args.in_flight,
            stall_timeout_s=args.timeout,
            progress=not args.no_progress,
            running=None if args.broker else _running_services(settings),
        )
    )
    print_json(summary, pretty=True)
    return exit_status(summary)


def demo_date(data_dir: Path, within: str, seed: int, given: date | None) -> tuple[date, bool]:
    """The day the plan is dated, and whether it is the one ``data_dir`` remembered.

    ``given`` (``--as-of``) wins. Otherwise the date of the first demo of this scope and seed
    loaded from ``data_dir``, so that running it again in a later year sends the same commands
    (same ids, no second effect) instead of a second plan; else today. The date used is
    remembered when ``data_dir`` exists (the embedded platform's) and has none for them yet.
    """
    path = data_dir / DEMO_FILE
    key = f"{within}/seed-{seed}"
    dated: dict[str, str] = {}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            loaded = {}
        found = loaded.get("dated") if isinstance(loaded, dict) else None
        if isinstance(found, dict):
            dated = {str(k): str(v) for k, v in found.items()}
    remembered: date | None = None
    if key in dated:
        try:
            remembered = date.fromisoformat(dated[key])
        except ValueError:
            remembered = None
    as_of = given or remembered or office_today()
    if remembered is None and data_dir.is_dir():
        dated[key] = as_of.isoformat()
        write_json(path, {"dated": dated})
    return as_of, given is None and remembered is not None


def _running_services(settings: Settings) -> list[str] | None:
    platform = read_platform(settings.data_dir)
    return None if platform is None else list(platform.services)


def _service_of(topic: str) -> str | None:
    return next((s for s in SERVICES if commands(s) == topic), None)


async def load(
    plan: demo_data.DemoPlan,
    settings: Settings,
    actor: demo_data.Actor,
    *,
    in_flight: int = DEFAULT_IN_FLIGHT,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    progress: bool = True,
    running: list[str] | None = None,
) -> dict[str, Any]:
    """Send the plan stage by stage; the summary of every stage (stages after one that did not
    finish are reported as not sent)."""
    results: list[dict[str, Any]] = []
    stopped: str | None = None
    for stage in demo_data.stages(plan):
        envelopes = list(demo_data.envelopes(plan, stage, actor, SOURCE))
        topics = {command.TOPIC for _, command in stage.commands}
        missing = sorted(
            s for t in topics if (s := _service_of(t)) and running is not None and s not in running
        )
        if stopped is None and missing:
            stopped = f"the {', '.join(missing)} service is not running in this platform"
        if stopped is not None:
            results.append(
                {"stage": stage.name, "commands": len(envelopes), "sent": 0, "skipped": stopped}
            )
            say(f"{stage.name}: {len(envelopes)} commands not sent: {stopped}")
            continue
        report = await send_batch(
            [
                Outgoing(env, command.TOPIC)
                for env, (_, command) in zip(envelopes, stage.commands, strict=True)
            ],
            settings,
            label=stage.name,
            max_in_flight=in_flight,
            stall_timeout_s=stall_timeout_s,
            retry=CATCH_UP if stage.name in RETRIED_STAGES else None,
            progress=progress,
        )
        say(report.summary())
        results.append(stage_summary(stage.name, report))
        if not report.complete:
            why = report.error or (
                f"no result within {stall_timeout_s:g} s (is its service running?)"
            )
            stopped = (
                f"stage {stage.name} did not finish: {report.count(Status.NO_RESULT)} commands "
                f"without result; {why}"
            )
            say(stopped)
    return {
        "within": plan.within,
        "seed": plan.seed,
        "as_of": plan.as_of.isoformat(),
        "stages": results,
        "complete": stopped is None,
        **({"stopped": stopped} if stopped else {}),
    }


def stage_summary(name: str, report: BatchReport) -> dict[str, Any]:
    examples: dict[str, str] = {}
    for outcome in report.outcomes.values():
        if outcome.status is Status.REJECTED and outcome.code and outcome.code not in examples:
            examples[outcome.code] = outcome.message or ""
    return {
        "stage": name,
        "commands": len(report.outcomes),
        "sent": report.sent,
        "completed": report.count(Status.COMPLETED),
        "rejected": dict(sorted(report.rejected_by_code.items())),
        "without_result": report.count(Status.NO_RESULT),
        "not_sent": report.count(Status.NOT_SENT),
        "seconds": round(report.elapsed_s, 2),
        **({"examples": examples} if examples else {}),
    }


def exit_status(summary: dict[str, Any]) -> int:
    if not summary["complete"]:
        return EXIT_INCOMPLETE
    if any(stage.get("rejected") for stage in summary["stages"]):
        return EXIT_REJECTED
    return EXIT_COMPLETED
