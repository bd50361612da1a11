"""Benchmark: the CPU the roster spends per enrolment, in process, without a broker.

Builds the roster service by its composition root on a fresh database (a SQLite file, or a fresh
PostgreSQL database with ``--postgres URL``, dropped afterwards), with a personal-data key, and
feeds its org projection ``OrgRegistered`` events for ``--orgs`` organs. Then, per fetch size in
``--batches``, ``-n`` enrolments run through the real consumers, the same paths the Kafka
consumers run, in fetches of that size:

  command  ``EnrolPerson`` commands (a clerk of the province, a new valid citizen ID each,
           round-robin over the orgs) to the command consumer's ``process_batch``: validation,
           blind index, encryption, person and saga rows, ``OccupySlot`` into the outbox;
  answer   quota's answers, built here as quota builds them (a ``CommandCompleted`` of each
           ``OccupySlot`` the roster wrote, caused by it), to the consumer of the roster's
           answers topic's ``process_batch``: saga end, person active, ``PersonEnrolled`` and
           its sealed restricted counterpart, history, the command's result, the audit entry;
  ignore   a roster that reads its answers from the shared results topic (a ``--baseline``
           from before the answers topics) also gets its own ``EnrolPerson`` results back
           there, which are not its to apply: they go to the same consumer. A roster with an
           answers topic reads none (0).

The relay does not run (it is the runtime's). Printed per phase: CPU ms per enrolment
(``time.process_time``: this process, every thread, so the database driver's thread too) and
SQL statements per enrolment (``before_cursor_execute``); then the checks (every person active,
one ``PersonEnrolled`` per enrolment, no full citizen ID in any outbox row but the sealed ones).
``--profile`` adds a cProfile top list of the timed parts. ``--baseline`` runs the same
measurement first with ``services/roster`` as committed (``git archive HEAD``, read only) and
the rest of the working tree, then with the working tree: a before/after in one run.
Figures, not assertions: ``.venv/bin/python bench/roster_enrol_inprocess.py -n 1000 --baseline``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import io
import json
import os
import pstats
import re
import sys
import tempfile
import time
import uuid
from datetime import date, timedelta
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

PHASES = ("command", "answer", "ignore")


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    # Imported here so that --baseline can run this file against another tree.
    from sqlalchemy import event, func, select

    from contracts.codes import Category, EntryMethod, OrgKind
    from contracts.common import Document
    from contracts.envelope import Envelope
    from contracts.identifiers import compose_citizen_id
    from contracts.orgs import OrgRegistered
    from contracts.quota import OccupySlot
    from contracts.results import CommandCompleted
    from contracts.roster import EnrolPerson
    from contracts.topics import (
        COMMAND_RESULTS,
        ORGS_EVENTS,
        QUOTA_COMMANDS,
        ROSTER_COMMANDS,
        ROSTER_EVENTS,
    )
    from services.roster.adapters.orm import people
    from services.roster.bootstrap import build
    from services.runtime.events import EventConsumer
    from services.runtime.messaging import RawMessage, caused_envelope, event_routes
    from tests.support.databases import database

    doc = Document(title="关于核定编制的批复", number="冀编〔2026〕7号", date=date(2026, 2, 1))
    approver = {"actorid": "li.na", "actorregion": "130000", "actorroles": "approver"}
    clerk = {"actorid": "wang.fang", "actorregion": "130000", "actorroles": "clerk"}
    people_made = iter(range(1, 10**9))
    numbers: list[str] = []

    def citizen() -> str:
        n = next(people_made)
        number = compose_citizen_id(
            "130102", date(1960, 1, 1) + timedelta(days=n % 15000), n // 15000 % 1000
        )
        numbers.append(number)
        return number

    if args.sqlite_inline:
        os.environ["BIANZHI_SQLITE_INLINE"] = str(args.sqlite_inline == "on")
    sizes = [int(s) for s in args.batches.split(",")]
    backend = "postgres" if args.postgres else "sqlite"
    if args.postgres:
        os.environ["BIANZHI_TEST_POSTGRES_URL"] = args.postgres
    os.environ["BIANZHI_ROSTER_PERSONAL_DATA_KEY"] = base64.b64encode(os.urandom(32)).decode()
    with tempfile.TemporaryDirectory(prefix="bench-roster-") as tmp:
        async with database(backend, Path(tmp), "roster") as url:
            rt = await service_runtime(build, "roster", url, Path(tmp))
            try:
                consumers = {}
                for sub in rt.definition.event_subscriptions:
                    consumers[sub.topic] = EventConsumer(
                        routes=event_routes(sub.routes),
                        # as the service builds it (a committed runtime may not know it yet)
                        prepare=getattr(sub, "prepare", None),
                        service="roster",
                        consumer=f"roster<-{sub.topic}",
                        uow_factory=rt.uow,
                        dead_letter=NoDeadLetters(),
                    )
                # The topic the roster reads quota's answers from, with its commands.
                (answers_topic,) = [
                    sub.topic for sub in rt.definition.event_subscriptions if sub.saga_answers
                ]
                results = consumers[answers_topic]
                orgs: list[uuid.UUID] = []
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
                    env = registered.envelope(source="/bianzhi/orgs", **approver)
                    await consumers[ORGS_EVENTS].process(raw_message(ORGS_EVENTS, env))
                    orgs.append(org_id)

                def enrol(k: int) -> RawMessage:
                    cmd = EnrolPerson(
                        citizen_id=citizen(),
                        name="张伟",
                        org_id=orgs[k % len(orgs)],
                        category=Category.ADMIN,
                        notice_no=f"冀编用〔2026〕bench-{k % len(orgs):03d}号",
                        entry_method=EntryMethod.EXAM,
                        effective_date=date(2026, 3, 1),
                        document=doc,
                        phone="13800138000",
                    )
                    return raw_message(ROSTER_COMMANDS, cmd.envelope(source="/bench", **clerk))

                seen: dict[str, int] = {}

                async def fresh(topic: str) -> list[Envelope]:
                    table = rt.definition.tables.outbox
                    async with rt.sessions() as session:
                        rows = (
                            await session.execute(
                                select(table.c.seq, table.c.value)
                                .where(table.c.topic == topic, table.c.seq > seen.get(topic, 0))
                                .order_by(table.c.seq)
                            )
                        ).all()
                    if rows:
                        seen[topic] = rows[-1].seq
                    return [Envelope.from_bytes(r.value) for r in rows]

                def answer(step: Envelope) -> RawMessage:
                    occupy = OccupySlot.model_validate(step.data)
                    done = CommandCompleted(
                        command_id=step.id,
                        command_type=step.type,
                        subject=occupy.subject_value(),
                        events=[str(uuid.uuid4())],
                    )
                    env = caused_envelope(done, step, source="/bianzhi/quota")
                    return raw_message(answers_topic, env, step.id)

                statements = 0
                # --sql: per statement, how often and how long (wall, to the driver and back).
                per_sql: dict[str, list[float]] = {}
                timing = False
                warm = True

                def count(conn: Any, cursor: Any, sql: str, *_: Any) -> None:
                    nonlocal statements
                    statements += 1
                    if args.sql:
                        conn.info["bench_sql"] = (sql, time.perf_counter())

                def counted(conn: Any, *_: Any) -> None:
                    started = conn.info.pop("bench_sql", None)
                    if started is not None and timing and not warm:
                        sql, at = started
                        entry = per_sql.setdefault(" ".join(sql.split())[:110], [0, 0.0])
                        entry[0] += 1
                        entry[1] += time.perf_counter() - at

                async def run(fetches: list[list[RawMessage]], consumer: Any) -> tuple[float, int]:
                    nonlocal statements, timing
                    statements = 0
                    timing = True
                    cpu = time.process_time()
                    if profiler is not None:
                        profiler.enable()
                    for fetch in fetches:
                        await consumer.process_batch(fetch)
                    if profiler is not None:
                        profiler.disable()
                    timing = False
                    return time.process_time() - cpu, statements

                def chunks(items: list[RawMessage], size: int) -> list[list[RawMessage]]:
                    return [items[i : i + size] for i in range(0, len(items), size)]

                event.listen(rt.engine.sync_engine, "before_cursor_execute", count)
                event.listen(rt.engine.sync_engine, "after_cursor_execute", counted)
                profiler: cProfile.Profile | None = None
                figures: dict[str, Any] = {}
                k = 0
                # A warm-up round (compile caches, the connection pool), then the timed ones.
                for size in [10, *sizes]:
                    n = 30 if size == 10 and not figures else args.n
                    warm = not figures
                    commands = [enrol(k + j) for j in range(n)]
                    k += n
                    took: dict[str, tuple[float, int]] = {}
                    if not warm and args.profile:
                        profiler = cProfile.Profile()
                    took["command"] = await run(chunks(commands, size), rt.command_consumer)
                    answers = [answer(s) for s in await fresh(QUOTA_COMMANDS)]
                    assert len(answers) == n, (len(answers), n)
                    took["answer"] = await run(chunks(answers, size), results)
                    own = [
                        raw_message(COMMAND_RESULTS, e, e.subject)
                        for e in await fresh(COMMAND_RESULTS)
                    ]
                    assert len(own) == n, (len(own), n)
                    if answers_topic == COMMAND_RESULTS:
                        took["ignore"] = await run(chunks(own, size), results)
                    else:
                        took["ignore"] = (0.0, 0)
                    if warm:
                        figures["warm-up"] = True
                        continue
                    figures[str(size)] = {
                        phase: {"cpu_ms": 1000 * cpu / n, "statements": st / n}
                        for phase, (cpu, st) in took.items()
                    } | {"enrolments": n}
                    if profiler is not None:
                        out = io.StringIO()
                        stats = pstats.Stats(profiler, stream=out)
                        stats.sort_stats("tottime").print_stats(args.profile_top)
                        stats.sort_stats("cumulative").print_stats(args.profile_top)
                        # The project's own functions only: where its share of the time goes.
                        stats.print_stats(r"/(services|contracts)/", args.profile_top)
                        figures[f"profile {size}"] = out.getvalue()
                        profiler = None
                if args.sql:
                    figures["sql"] = "\n".join(
                        f"  {n:7d} × {1e6 * t / n:7.0f} µs  {sql}"
                        for sql, (n, t) in sorted(per_sql.items(), key=lambda i: -i[1][1])
                    )
                # The checks: everyone active, one event each, no number in clear in the outbox.
                async with rt.sessions() as session:
                    active = (
                        await session.execute(
                            select(func.count()).where(people.c.status == "active")
                        )
                    ).scalar_one()
                    table = rt.definition.tables.outbox
                    rows = (await session.execute(select(table.c.topic, table.c.value))).all()
                events = [r for r in rows if r.topic == ROSTER_EVENTS]
                text = "\n".join(r.value.decode(errors="replace") for r in rows)
                # Each number looked for in every 18-character stretch of digits (and X) of
                # the outbox: the same as a search of the text for each, without its time
                # growing with numbers × text.
                stretches = {
                    run[i : i + 18]
                    for run in re.findall(r"[0-9X]{18,}", text)
                    for i in range(len(run) - 17)
                }
                leaked = sum(1 for number in numbers if number in stretches)
                figures["check"] = (
                    f"{active} active of {k} enrolled, {len(events)} PersonEnrolled, "
                    f"{leaked} full citizen IDs in the outbox"
                )
                return figures
            finally:
                await rt.engine.dispose()
                await rt.read_engine.dispose()


def report(label: str, figures: dict[str, Any]) -> None:
    for size, f in figures.items():
        if not isinstance(f, dict):
            continue
        total_cpu = sum(f[p]["cpu_ms"] for p in PHASES)
        total_st = sum(f[p]["statements"] for p in PHASES)
        parts = ", ".join(
            f"{p} {f[p]['cpu_ms']:.3f} ms / {f[p]['statements']:.2f} st" for p in PHASES
        )
        say(
            f"  {label:8s} batch {size:>3s}: {total_cpu:.3f} ms CPU, {total_st:.2f} statements "
            f"per enrolment ({parts}; {f['enrolments']} enrolments)"
        )
    say(f"  {label:8s} {figures['check']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(
        parser, per="enrolments", batches="100,10", package="roster", profile_top=35
    )
    parser.add_argument("--sql", action="store_true", help="time each SQL statement (wall)")
    parser.add_argument(
        "--sqlite-inline",
        choices=("on", "off"),
        help="the sqlite_inline setting (SQLite statements on the event loop's thread); "
        "default: BIANZHI_SQLITE_INLINE, else on",
    )
    args = parser.parse_args()
    if args.json:  # a child run: figures as JSON on the last line
        figures = asyncio.run(measure(args))
        print(json.dumps(figures))
        return
    say(f"load average {load_average()}")
    for label, figures in current_and_baseline(
        __file__, sys.argv[1:], package="services/roster", baseline=args.baseline
    ):
        if "sql" in figures:
            say(f"--- {label}: SQL statements (count × mean wall, all timed phases) ---")
            say(figures["sql"])
        for name, text in figures.items():
            if name.startswith("profile"):
                say(f"--- {label}: cProfile of the timed part, batch {name.split()[1]} ---")
                say(text)
        report(label, figures)
    say(f"load average {load_average()}")


if __name__ == "__main__":
    main()
