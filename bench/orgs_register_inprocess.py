"""Benchmark: the CPU orgs spends per ``RegisterOrg``, in process, without a broker.

Builds the orgs service by its composition root on a fresh SQLite file and hands ``-n``
``RegisterOrg`` commands (an approver of the province, a new organ each) to the command
consumer's ``process_batch`` in fetches of each ``--batches`` size: the path the Kafka consumer
runs (parse, authorize, one transaction per fetch, results and events into the outbox). The
relay does not run. Each setting of ``sqlite_inline`` named by ``--inline`` (default: off then
on) runs in a process of its own, so the two are measured in one run.

Printed per batch size: CPU ms per command (``time.process_time``: this process, every thread,
so the database driver's thread too), SQL statements per command and wall ms per command.
Figures, not assertions: ``.venv/bin/python bench/orgs_register_inprocess.py -n 1000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any

from inprocess import ROOT, load_average, raw_message, run_child, say, service_runtime


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from sqlalchemy import event, func, select

    from contracts.codes import OrgKind
    from contracts.common import Document
    from contracts.orgs import RegisterOrg
    from contracts.topics import ORGS_COMMANDS
    from services.orgs.bootstrap import build
    from services.runtime.messaging import RawMessage

    doc = Document(title="基准测试批复", number="冀编〔2026〕99号", date=date(2026, 1, 1))
    approver = {"actorid": "bench", "actorregion": "130000", "actorroles": "approver"}
    made = iter(range(10**9))

    def register() -> RawMessage:
        org_id = uuid.uuid4()
        cmd = RegisterOrg(
            org_id=org_id,
            name=f"基准测试单位{next(made):06d}",
            kind=OrgKind.PUBLIC_INSTITUTION,
            division_code="130102",
            functions=["承担基准测试"],
            document=doc,
        )
        return raw_message(ORGS_COMMANDS, cmd.envelope(source="/bench", **approver))

    with tempfile.TemporaryDirectory(prefix="bench-orgs-") as tmp:
        rt = await service_runtime(build, "orgs", f"sqlite+aiosqlite:///{tmp}/orgs.db", Path(tmp))
        try:
            statements = 0

            def count(*_: Any) -> None:
                nonlocal statements
                statements += 1

            event.listen(rt.engine.sync_engine, "before_cursor_execute", count)
            for _ in range(3):  # warm-up: compile caches, the connection pool
                await rt.command_consumer.process_batch([register() for _ in range(10)])
            figures: dict[str, Any] = {}
            for size in [int(s) for s in args.batches.split(",")]:
                fetches = [[register() for _ in range(size)] for _ in range(args.n // size)]
                done = sum(len(f) for f in fetches)
                statements = 0
                wall, cpu = time.perf_counter(), time.process_time()
                for fetch in fetches:
                    await rt.command_consumer.process_batch(fetch)
                cpu = time.process_time() - cpu
                wall = time.perf_counter() - wall
                figures[size] = {
                    "cpu_ms": 1000 * cpu / done,
                    "wall_ms": 1000 * wall / done,
                    "statements": statements / done,
                    "commands": done,
                }
            orgs = rt.definition.metadata.tables["orgs"]
            async with rt.sessions() as session:
                count_ = (await session.execute(select(func.count()).select_from(orgs))).scalar()
            figures["check"] = f"{count_} orgs of {next(made)} registered"
            return figures
        finally:
            await rt.engine.dispose()
            await rt.read_engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=1000, help="commands per batch size")
    parser.add_argument("--batches", default="100,10,1", help="fetch sizes, comma-separated")
    parser.add_argument("--inline", default="off,on", help="sqlite_inline settings to run")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json:  # a child run: figures as JSON on the last line
        print(json.dumps(asyncio.run(measure(args))))
        return
    say(f"load average {load_average()}")
    for setting in args.inline.split(","):
        label = f"inline {setting:3s}"
        figures = run_child(__file__, sys.argv[1:], ROOT, label, BIANZHI_SQLITE_INLINE=setting)
        for size, f in figures.items():
            if size == "check":
                continue
            say(
                f"  {label} batch {size:>3s}: {f['cpu_ms']:.3f} ms CPU/command, "
                f"{f['statements']:.2f} statements/command, {f['wall_ms']:.3f} ms wall/command "
                f"({f['commands']} commands)"
            )
        say(f"  {label} {figures['check']}")
    say(f"load average {load_average()}")


if __name__ == "__main__":
    main()
