"""Run the chaos scenarios from the command line, at small or full scale.

    python -m tests.chaos --full                      # kill -9, ≥ 10,000 commands, 12 kills
    python -m tests.chaos --full --scenario poison recovery
    python -m tests.chaos --scenario mixed --postgres postgresql+asyncpg://postgres@127.0.0.1/postgres

Each scenario starts its own embedded broker and service processes (SQLite files by default,
fresh PostgreSQL databases with ``--postgres``), prints the checker's report and writes its
ledger (JSON lines) under ``--keep DIR`` or a temporary directory. Exit status 0 when every
scenario passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from tests.chaos.platform import SERVICES
from tests.chaos.scenarios import (
    FAULTS,
    FULL,
    SAGA_TIMEOUT_S,
    SMALL,
    Outcome,
    own_broker,
    run_recovery,
    run_scenario,
    scaled,
)
from tests.support.databases import database

SCENARIOS = (
    "kill9",
    "poison",
    "recovery",
    "mixed",
    "sigterm",
    "pause",
    "database",
    "saga_timeouts",
)


def say(text: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    sys.stderr.write(f"[{stamp}] {text}\n")
    sys.stderr.flush()


@contextlib.asynccontextmanager
async def databases(base: str | None) -> AsyncIterator[dict[str, str]]:
    """A fresh PostgreSQL database per service (dropped afterwards), or {} for SQLite files."""
    if not base:
        yield {}
        return
    async with contextlib.AsyncExitStack() as stack:
        yield {
            name: await stack.enter_async_context(
                database("postgres", Path("."), name, server=base)
            )
            for name in SERVICES
        }


async def one(name: str, args: argparse.Namespace, root: Path) -> Outcome:
    scale = FULL if args.full else SMALL
    if args.commands:
        scale = scaled(scale, commands=args.commands)
    if args.faults is not None:
        scale = scaled(scale, faults=args.faults)
    if args.rate:
        scale = scaled(scale, rate=args.rate)
    data_dir = root / name
    async with databases(args.postgres) as urls:
        if name == "recovery":
            return await run_recovery(
                data_dir=data_dir, database_urls=urls, scale=scale, seed=args.seed, say=say
            )
        async with own_broker(data_dir / "broker.log") as broker:
            return await run_scenario(
                name,
                bootstrap=broker.bootstrap,
                data_dir=data_dir,
                database_urls=urls,
                scale=scale,
                fault=FAULTS[name](),
                seed=args.seed,
                say=say,
                **(
                    {"saga_timeout_s": SAGA_TIMEOUT_S, "tolerated": frozenset({"timeout"})}
                    if name == "saga_timeouts"
                    else {}
                ),
            )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full scale (≥ 10,000 commands)")
    parser.add_argument("--scenario", nargs="+", choices=SCENARIOS, default=["kill9"])
    parser.add_argument("--commands", type=int, help="commands of the load (overrides the scale)")
    parser.add_argument("--faults", type=int, help="fault injections (overrides the scale)")
    parser.add_argument("--rate", type=float, help="commands per second offered")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--postgres", metavar="URL", help="fresh PostgreSQL databases on URL")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep ledgers and logs in DIR")
    parser.add_argument("--json", action="store_true", help="print each report as JSON too")
    args = parser.parse_args()
    failed = 0
    with contextlib.ExitStack() as stack:
        root = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory("-chaos")))
        for name in args.scenario:
            outcome = await one(name, args, root)
            print(outcome.render(), flush=True)
            if args.json:
                body = outcome.report.summary() | {
                    "scenario": name,
                    "recovery_s": outcome.recovery_s,
                    "catch_up_s": outcome.catch_up_s,
                    "wall_s": outcome.wall_s,
                    "faults": outcome.faults,
                }
                print(json.dumps(body, ensure_ascii=False, default=str), flush=True)
            failed += not outcome.report.passed
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
