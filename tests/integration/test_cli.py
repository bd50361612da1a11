"""`bianzhi up`, `send`, `tail` and `replay` as real processes: broker, services, signals.

One platform is started for the module (`bianzhi up` as a subprocess, exactly as a user runs it);
the last test stops it with SIGTERM and checks that nothing it started is left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue

import pytest

from contracts.orgs import RegisterOrg
from contracts.results import CommandCompleted, CommandRejected
from contracts.topics import COMMAND_RESULTS, ORGS_COMMANDS, ORGS_EVENTS, all_topics
from services.cli.common import load_settings
from services.cli.up import free_http_base, partitions_past
from services.runtime.embedded_broker import free_port

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 90
READY_LINE = re.compile(r"^bianzhi ready broker=(127\.0\.0\.1:\d+)( \w+=http://127\.0\.0\.1:\d+)+$")
ACTOR = ["--actor", "zhang.wei", "--region", "130100", "--roles", "approver"]


@dataclass
class RunningPlatform:
    process: subprocess.Popen[str]
    data_dir: Path
    stderr_path: Path
    broker: str
    urls: dict[str, str]
    ready_after_s: float

    def child_pids(self) -> list[int]:
        """The broker and service pids `bianzhi up` reported starting."""
        text = self.stderr_path.read_text()
        return [int(pid) for pid in re.findall(r"\(pid (\d+)\)", text)]


def bianzhi(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for all purposes but the process table.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def read_lines(stream: object, lines: Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)


def start_platform(data_dir: Path, stderr_path: Path, *extra: str) -> RunningPlatform:
    """`bianzhi up` on free ports (and ``extra`` options); returns once it printed its ready
    line."""
    argv = [
        sys.executable,
        "-m",
        "services.cli.main",
        "up",
        "--data-dir",
        str(data_dir),
        "--broker-port",
        str(free_port()),
        "--http-port",
        str(free_http_base()),
        *extra,
    ]
    started = time.monotonic()
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO)
    lines: Queue[str] = Queue()
    threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True).start()
    try:
        line = lines.get(timeout=READY_TIMEOUT_S).rstrip("\n")
    except Empty:
        stop(process)
        pytest.fail(f"no ready line within {READY_TIMEOUT_S} s:\n{stderr_path.read_text()}")
    ready_after = time.monotonic() - started
    if not READY_LINE.match(line):
        stop(process)
        pytest.fail(f"not a ready line: {line!r}\n{stderr_path.read_text()}")
    fields = dict(part.split("=", 1) for part in line.split()[2:])
    broker = fields.pop("broker")
    print(f"bianzhi up ready in {ready_after:.1f} s: {line}")
    return RunningPlatform(process, data_dir, stderr_path, broker, fields, ready_after)


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("platform") / "data"


@pytest.fixture(scope="module")
def platform(data_dir: Path) -> Iterator[RunningPlatform]:
    running = start_platform(data_dir, data_dir.parent / "up.stderr")
    try:
        yield running
    finally:
        stop(running.process)


def register_org_data(org_id: str) -> dict[str, object]:
    return {
        "org_id": org_id,
        "name": "石家庄市长安区民政局",
        "kind": "organ",
        "division_code": "130102",
        "document": {"title": "关于设立的批复", "number": "长编〔2026〕1号", "date": "2026-01-05"},
    }


def get_json(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def test_up_announces_the_broker_and_every_present_service(platform: RunningPlatform) -> None:
    assert "orgs" in platform.urls
    assert list(platform.urls) == [
        s for s in ("orgs", "quota", "roster", "notify") if s in platform.urls
    ]
    written = json.loads((platform.data_dir / "platform.json").read_text())
    assert written["broker"] == platform.broker
    assert written["services"] == platform.urls
    assert written["pid"] == platform.process.pid
    for url in platform.urls.values():
        assert get_json(f"{url}/health/ready")[0] == 200
    assert platform.ready_after_s < 60


def test_send_waits_for_completion_and_the_query_shows_the_org(platform: RunningPlatform) -> None:
    org_id = str(uuid.uuid4())
    sent = bianzhi(
        "send",
        "orgs.RegisterOrg",
        "--data",
        json.dumps(register_org_data(org_id)),
        *ACTOR,
        "--data-dir",
        str(platform.data_dir),
    )
    assert sent.returncode == 0, sent.stderr
    result = json.loads(sent.stdout)
    assert result["type"] == CommandCompleted.TYPE
    assert result["data"]["command_type"] == RegisterOrg.TYPE
    assert result["data"]["subject"] == org_id

    status, org = get_json(f"{platform.urls['orgs']}/orgs/{org_id}")
    assert status == 200
    assert isinstance(org, dict)
    assert org["name"] == "石家庄市长安区民政局"
    assert org["status"] == "active"


def test_a_rejected_command_exits_1(platform: RunningPlatform) -> None:
    sent = bianzhi(
        "send",
        "bianzhi.orgs.RegisterOrg.v1",
        "--data",
        json.dumps(register_org_data(str(uuid.uuid4()))),
        "--actor",
        "li.na",
        "--region",
        "130100",
        "--roles",
        "clerk",
        "--broker",
        platform.broker,
    )
    assert sent.returncode == 1, sent.stderr
    result = json.loads(sent.stdout)
    assert result["type"] == CommandRejected.TYPE
    assert result["data"]["code"] == "forbidden"


def test_tail_prints_the_results_from_the_beginning(platform: RunningPlatform) -> None:
    tailed = bianzhi(
        "tail", "results", "--from-beginning", "--max", "2", "--timeout", "10",
        "--data-dir", str(platform.data_dir),
    )  # fmt: skip
    assert tailed.returncode == 0, tailed.stderr
    messages = [json.loads(line) for line in tailed.stdout.splitlines()]
    assert len(messages) == 2
    assert {m["topic"] for m in messages} == {COMMAND_RESULTS}
    assert all(m["headers"]["content-type"] == "application/cloudevents+json" for m in messages)
    assert {m["value"]["type"] for m in messages} == {CommandCompleted.TYPE, CommandRejected.TYPE}


def test_replay_publishes_the_outbox_again(platform: RunningPlatform) -> None:
    replayed = bianzhi("replay", "orgs", "--since", "1h", "--data-dir", str(platform.data_dir))
    assert replayed.returncode == 0, replayed.stderr
    # RegisterOrg wrote an event and a result; the rejection wrote a result.
    assert re.match(r"^orgs: re-published 3 outbox rows created since ", replayed.stdout)


async def test_the_partition_watch_sees_end_offsets(platform: RunningPlatform) -> None:
    settings = load_settings(kafka_bootstrap=platform.broker)
    over = await partitions_past(settings, all_topics(), 1)
    assert {topic for topic, _, _ in over} == {ORGS_COMMANDS, ORGS_EVENTS, COMMAND_RESULTS}
    assert await partitions_past(settings, all_topics(), 10_000) == []


def test_no_result_in_time_exits_3(platform: RunningPlatform) -> None:
    # No service answers within a millisecond: the command's fetch alone waits longer.
    sent = bianzhi(
        "send", "orgs.RegisterOrg", "--data", json.dumps(register_org_data(str(uuid.uuid4()))),
        "--actor", "li.na", "--region", "130100", "--roles", "clerk",
        "--broker", platform.broker, "--timeout", "0.001",
    )  # fmt: skip
    assert sent.returncode == 3, sent.stderr
    assert sent.stdout == ""
    assert "no result for command" in sent.stderr


def test_sigterm_stops_everything_and_exits_0(platform: RunningPlatform) -> None:
    children = platform.child_pids()
    assert len(children) == 1 + len(platform.urls)
    assert all(alive(pid) for pid in children)

    started = time.monotonic()
    platform.process.send_signal(signal.SIGTERM)
    assert platform.process.wait(30) == 0
    took = time.monotonic() - started
    print(f"bianzhi up stopped in {took:.1f} s")

    assert not any(alive(pid) for pid in children)
    assert not (platform.data_dir / "platform.json").exists()
    assert "stopped" in platform.stderr_path.read_text().splitlines()[-1]
    no_platform = bianzhi("tail", "results", "--data-dir", str(platform.data_dir))
    assert no_platform.returncode == 2
    assert "no running platform found" in no_platform.stderr


def test_a_restart_re_publishes_the_outbox_to_the_fresh_broker(data_dir: Path) -> None:
    restarted = start_platform(data_dir, data_dir.parent / "up-again.stderr")
    try:
        said = restarted.stderr_path.read_text()
        # Three rows before the replay test, one more from the unanswered (rejected) command.
        assert "fresh broker: re-publishing 4 retained outbox rows (orgs 4)" in said
        tailed = bianzhi(
            "tail", "orgs.events", "--from-beginning", "--max", "1", "--timeout", "10",
            "--broker", restarted.broker,
        )  # fmt: skip
        assert tailed.returncode == 0, tailed.stderr
        assert json.loads(tailed.stdout)["value"]["type"] == "bianzhi.orgs.OrgRegistered.v1"

        # The embedded broker dies: the platform must not run on half-broken.
        broker_pid, *service_pids = restarted.child_pids()
        started = time.monotonic()
        os.kill(broker_pid, signal.SIGKILL)
        assert restarted.process.wait(30) == 1
        print(f"bianzhi up stopped {time.monotonic() - started:.1f} s after the broker died")
        assert not any(alive(pid) for pid in service_pids)
        assert "the broker stopped unexpectedly; stopping all services" in (
            restarted.stderr_path.read_text()
        )
        assert not (data_dir / "platform.json").exists()
    finally:
        stop(restarted.process)


def test_migrate_creates_the_databases(tmp_path: Path) -> None:
    migrated = bianzhi("migrate", "--data-dir", str(tmp_path))
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.startswith("orgs: at the latest schema (sqlite+aiosqlite:///")
    assert (tmp_path / "orgs.db").exists()
