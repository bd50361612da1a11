"""Benchmark: the CPU quota spends per ``OccupySlot``, in process, without a broker.

Builds the quota service by its composition root on a fresh database (a SQLite file, or a fresh
PostgreSQL database with ``--postgres URL``, dropped afterwards), feeds its org projection
``OrgRegistered`` events for ``--orgs`` organs and gives each, through its command consumer, an
approval and a quota-use notice with room for the run. Then it hands ``-n`` ``OccupySlot``
commands, sent as the roster sends them (message id = request_id, a clerk of the province, one
new person each, round-robin over the orgs), to the command consumer's ``process_batch`` in
fetches of each ``--batches`` size (the same path the Kafka consumer runs: parse, authorize, one
transaction per fetch, results and events into the outbox). The relay does not run.

Printed per batch size: CPU ms per command (``time.process_time``: this process, every thread,
so the database driver's thread too), SQL statements per command (``before_cursor_execute``),
and wall ms per command; ``--profile`` adds a cProfile top list of the timed part.
``--baseline`` runs the same measurement first with ``services/quota`` as committed (``git
archive HEAD``, read only) and the rest of the working tree, then with the working tree: a
before/after in one run. Figures, not assertions:
``.venv/bin/python bench/quota_occupy_inprocess.py -n 1000 --baseline``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any

from inprocess import (
    NoDeadLetters,
    add_common_arguments,
    current_and_baseline,
    load_average,
    raw_message,
    say,
    service_runtime,
)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    # Imported here so that --baseline can run this file against another tree.
    from sqlalchemy import event

    from contracts.codes import Category, OrgKind
    from contracts.common import Document
    from contracts.orgs import OrgRegistered
    from contracts.quota import ApproveQuota, IssueQuotaUseNotice, OccupySlot
    from contracts.topics import ORGS_EVENTS, QUOTA_COMMANDS
    from services.quota.bootstrap import build
    from services.runtime.events import EventConsumer
    from services.runtime.messaging import RawMessage, event_routes
    from tests.support.databases import database

    doc = Document(title="关于核定编制的批复", number="冀编〔2026〕7号", date=date(2026, 2, 1))
    approver = {"actorid": "li.na", "actorregion": "130000", "actorroles": "approver"}
    clerk = {"actorid": "wang.fang", "actorregion": "130000", "actorroles": "clerk"}

    sizes = [int(s) for s in args.batches.split(",")]
    total = args.n * len(sizes)
    backend = "postgres" if args.postgres else "sqlite"
    if args.postgres:
        os.environ["BIANZHI_TEST_POSTGRES_URL"] = args.postgres
    with tempfile.TemporaryDirectory(prefix="bench-quota-") as tmp:
        async with database(backend, Path(tmp), "quota") as url:
            rt = await service_runtime(build, "quota", url, Path(tmp))
            try:
                (sub,) = rt.definition.event_subscriptions
                projection = EventConsumer(
                    routes=event_routes(sub.routes),
                    service="quota",
                    consumer=f"quota<-{sub.topic}",
                    uow_factory=rt.uow,
                    dead_letter=NoDeadLetters(),
                )
                orgs: list[tuple[uuid.UUID, str]] = []
                places = total // args.orgs + 50  # and the warm-up
                for i in range(args.orgs):
                    org_id = uuid.uuid4()
                    registered = OrgRegistered(
                        org_id=org_id,
                        name=f"测试单位{i}",
                        kind=OrgKind.ORGAN,
                        division_code="130102",
                        document=doc,
                        effective_date=doc.date,
                    )
                    env = registered.envelope(source="/orgs", **approver)
                    await projection.process(raw_message(ORGS_EVENTS, env))
                    notice_no = f"冀编用〔2026〕bench-{i:03d}号"
                    setup = [
                        ApproveQuota(
                            org_id=org_id,
                            category=Category.ADMIN,
                            approved=places,
                            document=doc,
                            effective_date=doc.date,
                        ),
                        IssueQuotaUseNotice(
                            notice_no=notice_no,
                            org_id=org_id,
                            category=Category.ADMIN,
                            count=places,
                            valid_until=date(2099, 12, 31),
                            document=doc,
                        ),
                    ]
                    for cmd in setup:
                        env = cmd.envelope(source="/bench", **approver)
                        await rt.command_consumer.process(raw_message(QUOTA_COMMANDS, env))
                    orgs.append((org_id, notice_no))

                def occupy(k: int) -> RawMessage:
                    org_id, notice_no = orgs[k % len(orgs)]
                    request_id = uuid.uuid4()
                    cmd = OccupySlot(
                        request_id=request_id,
                        person_id=uuid.uuid4(),
                        org_id=org_id,
                        category=Category.ADMIN,
                        notice_no=notice_no,
                    )
                    env = cmd.envelope(source="/bianzhi/roster", id=str(request_id), **clerk)
                    return raw_message(QUOTA_COMMANDS, env, str(org_id))

                statements = 0

                def count(*_: Any) -> None:
                    nonlocal statements
                    statements += 1

                event.listen(rt.engine.sync_engine, "before_cursor_execute", count)
                # Warm up: compile caches, connection pool.
                for _ in range(3):
                    await rt.command_consumer.process_batch([occupy(k) for k in range(10)])
                    await rt.command_consumer.process_batch([occupy(0)])
                figures: dict[str, Any] = {}
                profiler = cProfile.Profile() if args.profile else None
                k = 0
                for size in sizes:
                    fetches = []
                    for _ in range(0, args.n, size):
                        fetches.append([occupy(k + j) for j in range(size)])
                        k += size
                    done = sum(len(f) for f in fetches)
                    statements = 0
                    wall, cpu = time.perf_counter(), time.process_time()
                    if profiler is not None:
                        profiler.enable()
                    for fetch in fetches:
                        await rt.command_consumer.process_batch(fetch)
                    if profiler is not None:
                        profiler.disable()
                    cpu = time.process_time() - cpu
                    wall = time.perf_counter() - wall
                    figures[str(size)] = {
                        "cpu_ms": 1000 * cpu / done,
                        "wall_ms": 1000 * wall / done,
                        "statements": statements / done,
                        "commands": done,
                    }
                occupied = await occupied_total(rt)
                expected = 30 + 3 + k
                figures["check"] = f"occupied {occupied}, expected {expected}"
                if profiler is not None:
                    out = io.StringIO()
                    stats = pstats.Stats(profiler, stream=out)
                    stats.sort_stats("tottime").print_stats(args.profile_top)
                    stats.sort_stats("cumulative").print_stats(args.profile_top)
                    figures["profile"] = out.getvalue()
                return figures
            finally:
                await rt.engine.dispose()
                await rt.read_engine.dispose()


async def occupied_total(rt: Any) -> int:
    from sqlalchemy import func, select

    from services.quota.adapters.orm import establishment

    async with rt.sessions() as session:
        return int((await session.execute(select(func.sum(establishment.c.occupied)))).scalar())


def report(label: str, figures: dict[str, Any]) -> None:
    for size, f in figures.items():
        if size in ("check", "profile"):
            continue
        say(
            f"  {label:9s} batch {size:>3s}: {f['cpu_ms']:.3f} ms CPU/command, "
            f"{f['statements']:.2f} statements/command, {f['wall_ms']:.3f} ms wall/command "
            f"({f['commands']} commands)"
        )
    say(f"  {label:9s} {figures['check']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, per="commands", batches="50,1", package="quota", profile_top=30)
    args = parser.parse_args()
    if args.json:  # a child run: figures as JSON on the last line
        figures = asyncio.run(measure(args))
        print(json.dumps(figures))
        return
    say(f"load average {load_average()}")
    for label, figures in current_and_baseline(
        __file__, sys.argv[1:], package="services/quota", baseline=args.baseline
    ):
        if "profile" in figures:
            say(f"--- {label}: cProfile of the timed part ---")
            say(figures["profile"])
        report(label, figures)
    say(f"load average {load_average()}")


if __name__ == "__main__":
    main()
