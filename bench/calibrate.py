"""How fast this machine is today: fixed pieces of the services' own kind of work, timed.

The benchmarks run on a shared 2-core machine whose speed changes from day to day and within a
day (the same code's enrolment burst went from 543 to 1,018 enrolments/s in one afternoon).
A figure from one run can only be compared with another run's when both say how fast the
machine was. ``machine_speed`` times, in this process, on one core, before anything else runs:

- **envelopes**: an ``EnrolPerson`` envelope made from its command, written to bytes and read
  back (what every command, event and result costs a service in Python);
- **SQLite**: rows of about 300 bytes inserted into a file database under two indexes, 100 per
  transaction, WAL journal (what a service's transactions cost in the database).

Each is the best of three short runs (a neighbour's burst slows one run, not all three).
``python bench/calibrate.py`` prints them alone.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from contracts import identifiers
from contracts.codes import Category, EntryMethod
from contracts.envelope import Envelope
from contracts.roster import EnrolPerson

_ENVELOPES = 2_000
_ROWS = 20_000
_ROWS_PER_TRANSACTION = 100


@dataclass(frozen=True)
class Speed:
    envelopes_per_s: float  # one core: made, written and read back
    sqlite_rows_per_s: float  # one core: inserted, 100 per transaction

    def describe(self) -> str:
        return (
            f"machine speed (one core, best of 3): {self.envelopes_per_s:,.0f} envelopes/s "
            f"made, written and read back; {self.sqlite_rows_per_s:,.0f} SQLite rows/s "
            "inserted (compare figures across runs only with these)"
        )


def _best_rate(work: Callable[[], int]) -> float:
    """Items per CPU second of ``work`` (which returns how many it did), best of three."""
    best = 0.0
    for _ in range(3):
        started = time.process_time()
        done = work()
        spent = time.process_time() - started
        if spent > 0:
            best = max(best, done / spent)
    return best


def _envelopes() -> int:
    actor = {"actorid": "calibrate", "actorregion": "130000", "actorroles": "clerk"}
    org_id = uuid.uuid4()
    for i in range(_ENVELOPES):
        command = EnrolPerson(
            citizen_id=identifiers.compose_citizen_id("130102", date(1990, 1, 1), i % 1000),
            name="张三",
            org_id=org_id,
            category=Category.ADMIN,
            notice_no="冀编通〔2026〕1号",
            entry_method=EntryMethod.EXAM,
            effective_date=date(2026, 1, 1),
        )
        raw = command.envelope(source="/bench/calibrate", **actor).to_bytes()
        EnrolPerson.model_validate(Envelope.from_bytes(raw).data)
    return _ENVELOPES


def _sqlite_rows() -> int:
    with tempfile.TemporaryDirectory(prefix="bianzhi-calibrate-") as tmp:
        conn = sqlite3.connect(Path(tmp) / "calibrate.db", isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE t (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, "
                "org TEXT NOT NULL, value BLOB NOT NULL)"
            )
            conn.execute("CREATE INDEX ix_t_org ON t (org, seq)")
            value = os.urandom(200)
            for start in range(0, _ROWS, _ROWS_PER_TRANSACTION):
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "INSERT INTO t (id, org, value) VALUES (?, ?, ?)",
                    (
                        (str(uuid.uuid4()), f"org-{i % 24}", value)
                        for i in range(start, start + _ROWS_PER_TRANSACTION)
                    ),
                )
                conn.execute("COMMIT")
        finally:
            conn.close()
    return _ROWS


def machine_speed() -> Speed:
    """Time the fixed work (about a second in all)."""
    return Speed(_best_rate(_envelopes), _best_rate(_sqlite_rows))


if __name__ == "__main__":
    print(machine_speed().describe())
