"""What the in-process benchmarks share (``*_inprocess.py``): records as a consumer hands them
to a service, a dead-letter hook that fails the run, and child runs of a script with its figures
as JSON on the last line of its output, on the working tree or on a copy of it with one service's
package as committed (``--baseline``)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_offsets = itertools.count()


def say(msg: str) -> None:
    print(msg, flush=True)


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def raw_message(topic: str, env: Any, key: str | None = None) -> Any:
    """``env`` as the Kafka consumer would hand it over (``RawMessage``), keyed by ``key``, else
    by its subject or id, at the next offset."""
    from contracts.envelope import CONTENT_TYPE
    from services.runtime.messaging import RawMessage

    return RawMessage(
        topic=topic,
        partition=0,
        offset=next(_offsets),
        key=(key or env.subject or env.id).encode(),
        value=env.to_bytes(),
        headers=(("content-type", CONTENT_TYPE.encode()),),
    )


class NoDeadLetters:
    """A dead-letter hook for a run in which nothing may be dead-lettered."""

    async def __call__(self, *a: Any, **kw: Any) -> None:
        raise AssertionError(f"dead-lettered: {a} {kw}")


def baseline_tree(dest: Path, package: str) -> Path:
    """A copy of the working tree in ``dest`` with ``package`` (e.g. ``services/quota``) as
    committed (``git archive HEAD``); git's state is not touched."""
    for part in ("contracts", "services", "tests"):
        shutil.copytree(
            ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    shutil.rmtree(dest / package)
    archive = subprocess.run(
        ["git", "archive", "HEAD", package], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_child(script: str, argv: list[str], tree: Path, label: str, **env: str) -> dict[str, Any]:
    """Run ``script`` with ``argv`` and ``--json`` on ``tree`` (its imports from there), with
    ``env`` added to the environment; its figures. A failed run stops the benchmark with the
    end of its error output."""
    done = subprocess.run(
        [sys.executable, str(Path(script).resolve()), *argv, "--json"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), **env},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        say(done.stderr[-4000:])
        raise SystemExit(f"the {label} run failed")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def current_and_baseline(
    script: str, argv: list[str], *, package: str, baseline: bool
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The figures of ``script`` run on a copy of the tree with ``package`` as committed (when
    ``baseline``), then on the working tree: a before/after under the same machine load."""
    child = [a for a in argv if a != "--baseline"]
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as base:
        if baseline:
            tree = baseline_tree(Path(base), package)
            yield "baseline", run_child(script, child, tree, "baseline")
        yield "current", run_child(script, child, ROOT, "current")


async def service_runtime(build: Callable[[Any], Any], name: str, url: str, data_dir: Path) -> Any:
    """Service ``name`` built by its composition root on the database ``url`` and migrated,
    with no broker (its consumers are called directly) and nothing allowed to be dead-lettered.
    """
    from services.runtime.settings import Settings

    os.environ[f"BIANZHI_{name.upper()}_DATABASE_URL"] = url
    runtime = build(
        Settings(
            data_dir=data_dir,
            kafka_bootstrap="localhost:1",
            kafka_group_prefix="bench",
            log_level="WARNING",
        )
    )
    runtime.command_consumer.dead_letter = NoDeadLetters()
    await runtime.migrate()
    return runtime


def add_common_arguments(
    parser: argparse.ArgumentParser, *, per: str, batches: str, package: str, profile_top: int
) -> None:
    """The options every in-process benchmark of a service's database takes."""
    parser.add_argument("-n", type=int, default=1000, help=f"{per} per fetch size")
    parser.add_argument("--batches", default=batches, help="fetch sizes, comma-separated")
    parser.add_argument("--orgs", type=int, default=24)
    parser.add_argument("--postgres", metavar="URL", help="a PostgreSQL server to use")
    parser.add_argument("--profile", action="store_true", help="print a cProfile top list")
    parser.add_argument("--profile-top", type=int, default=profile_top)
    parser.add_argument("--baseline", action="store_true", help=f"also run the committed {package}")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
