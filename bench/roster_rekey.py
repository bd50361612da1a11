"""Benchmark: re-encrypting the roster's personal data under a new key, and what it costs the
enrolments that go on meanwhile.

Fills a fresh roster database (a SQLite file, or a fresh PostgreSQL database with
``--postgres URL``) with ``-n`` people whose citizen ID and phone number are encrypted under a
key ``k1`` (rows written directly, as the roster writes them), then builds the roster by its
composition root with a new key ``k2`` and ``k1`` retired, and times
``services.roster.service_layer.keys.reencrypt_all``:

  walk     every person under k1: read, decrypted, encrypted under k2, written back, a locked
           page at a time (people re-encrypted per second);
  again    the same walk with nothing left to do: the cost of reading alone (the baseline in
           this run; the ratio says what the re-encryption adds);
  writes   the longest and the mean write transaction (``keys.WRITE_CHUNK`` people of a page):
           on SQLite the write lock is held that long, so a handler waiting for it waits at
           most about that.

Figures, not assertions: ``.venv/bin/python bench/roster_rekey.py -n 20000``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from calibrate import machine_speed  # noqa: E402
from inprocess import load_average, say, service_runtime  # noqa: E402

K1 = os.urandom(32)
K2 = os.urandom(32)


async def fill(rt: Any, n: int) -> None:
    """``n`` active people encrypted under k1, in transactions of 1,000."""
    from sqlalchemy import insert

    from contracts.identifiers import compose_citizen_id, mask_citizen_id
    from services.roster.adapters.orm import people
    from services.roster.domain.personal_data import PersonalDataCipher

    old = PersonalDataCipher(K1, "k1")
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    org = str(uuid.uuid4())
    for start in range(0, n, 1000):
        rows = []
        for i in range(start, min(n, start + 1000)):
            number = compose_citizen_id(
                "130102", date(1960, 1, 1) + timedelta(days=i % 15000), i // 15000 % 1000
            )
            person_id = str(uuid.uuid4())
            rows.append(
                {
                    "person_id": person_id,
                    "citizen_index": old.blind_index(number),
                    "citizen_enc": old.encrypt(number, context=person_id),
                    "citizen_masked": mask_citizen_id(number),
                    "name": "张伟",
                    "sex": "male",
                    "birth_date": date(1960, 1, 1),
                    "phone_enc": old.encrypt("13800138000", context=person_id),
                    "status": "active",
                    "org_id": org,
                    "category": "admin",
                    "notice_no": "冀编用〔2026〕1号",
                    "entry_method": "exam",
                    "created_at": stamp,
                    "updated_at": stamp,
                    "version": 1,
                }
            )
        async with rt.sessions() as session:
            await session.execute(insert(people), rows)
            await session.commit()


class TimedUow:
    """``rt.uow`` that records how long each write transaction (a page) held it."""

    def __init__(self, rt: Any) -> None:
        self.factory = rt.uow
        self.held: list[float] = []

    def __call__(self) -> Any:
        outer = self
        uow = self.factory()

        class Timed:
            async def __aenter__(self) -> Any:
                self.t = time.perf_counter()
                return await uow.__aenter__()

            async def __aexit__(self, *exc: Any) -> Any:
                try:
                    return await uow.__aexit__(*exc)
                finally:
                    outer.held.append(time.perf_counter() - self.t)

        return Timed()


async def measure(args: argparse.Namespace) -> None:
    from services.roster.bootstrap import build
    from services.roster.service_layer import keys
    from tests.support.databases import database

    if args.page:
        keys.PAGE = args.page
    backend = "postgres" if args.postgres else "sqlite"
    if args.postgres:
        os.environ["BIANZHI_TEST_POSTGRES_URL"] = args.postgres
    with tempfile.TemporaryDirectory(prefix="bench-rekey-") as tmp:
        retired = Path(tmp) / "retired"
        retired.mkdir()
        (retired / "k1.key").write_text(base64.b64encode(K1).decode())
        async with database(backend, Path(tmp), "roster") as url:
            os.environ["BIANZHI_ROSTER_PERSONAL_DATA_KEY"] = base64.b64encode(K1).decode()
            os.environ["BIANZHI_ROSTER_PERSONAL_DATA_KEY_ID"] = "k1"
            first = await service_runtime(build, "roster", url, Path(tmp))
            started = time.perf_counter()
            await fill(first, args.n)
            say(f"filled {args.n:,} people under k1 in {time.perf_counter() - started:.1f} s")
            await first.engine.dispose()
            await first.read_engine.dispose()

            os.environ["BIANZHI_ROSTER_PERSONAL_DATA_KEY"] = base64.b64encode(K2).decode()
            os.environ["BIANZHI_ROSTER_PERSONAL_DATA_KEY_ID"] = "k2"
            os.environ["BIANZHI_ROSTER_PERSONAL_DATA_RETIRED_KEYS_DIR"] = str(retired)
            rt = await service_runtime(build, "roster", url, Path(tmp))
            try:
                await keys.check_personal_data_keys(rt)
                timed = TimedUow(rt)
                rt.uow = timed
                figures = {}
                for phase in ("walk", "again"):
                    timed.held.clear()
                    cpu, wall = time.process_time(), time.perf_counter()
                    progress = await keys.reencrypt_all(rt)
                    wall = time.perf_counter() - wall
                    cpu = time.process_time() - cpu
                    figures[phase] = (wall, cpu, progress, list(timed.held))
                    say(
                        f"{phase:6} {progress.people_seen:,} people seen, "
                        f"{progress.people_reencrypted:,} re-encrypted in {wall:.2f} s wall, "
                        f"{cpu:.2f} s CPU: {progress.people_seen / wall:,.0f} people/s; "
                        f"{len(timed.held)} write transactions"
                        + (
                            f", longest {max(timed.held) * 1000:.1f} ms, mean "
                            f"{sum(timed.held) / len(timed.held) * 1000:.1f} ms"
                            if timed.held
                            else ""
                        )
                    )
            finally:
                await rt.engine.dispose()
                await rt.read_engine.dispose()
    walk, again = figures["walk"], figures["again"]
    assert walk[2].people_reencrypted == args.n and again[2].people_reencrypted == 0
    say(
        f"RESULT people={args.n} database={backend} page={keys.PAGE} "
        f"reencrypted_per_s={args.n / walk[0]:,.0f} read_only_per_s={args.n / again[0]:,.0f} "
        f"ratio_to_read_only={walk[0] / again[0]:.1f} "
        f"longest_page_ms={max(walk[3]) * 1000:.1f} load={load_average()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20_000, help="people on the roster")
    parser.add_argument("--postgres", metavar="URL", help="a PostgreSQL server to use")
    parser.add_argument("--page", type=int, help="people per page (default: the service's)")
    args = parser.parse_args()
    say(f"{machine_speed().describe()}; load average {load_average()}")
    asyncio.run(measure(args))


if __name__ == "__main__":
    main()
