"""The `bianzhi` command without a broker: names, times, data and one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from contracts.orgs import RegisterOrg
from contracts.topics import COMMAND_RESULTS
from services.cli import common, replay, send, up
from services.cli.common import (
    CliError,
    Platform,
    parse_since,
    read_platform,
    resolve_command_type,
    resolve_topic,
    write_platform,
)
from services.cli.main import COMMANDS, build_parser, main
from services.runtime.embedded_broker import free_port

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def register_org_data() -> dict[str, object]:
    return {
        "org_id": str(uuid.uuid4()),
        "name": "石家庄市长安区民政局",
        "kind": "organ",
        "division_code": "130102",
        "document": {"title": "关于设立的批复", "number": "长编〔2026〕1号", "date": "2026-01-05"},
    }


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bianzhi: error: ")
    return lines[0]


# --- type names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "bianzhi.orgs.RegisterOrg.v1",
        "orgs.RegisterOrg",
        "orgs.RegisterOrg.v1",
        "RegisterOrg",
        "orgs.registerorg",
        " orgs.RegisterOrg ",
    ],
)
def test_command_types_resolve_from_full_and_short_names(name: str) -> None:
    assert resolve_command_type(name) is RegisterOrg


def test_an_unknown_type_names_close_matches() -> None:
    with pytest.raises(CliError) as raised:
        resolve_command_type("orgs.RegistrOrg")
    assert "did you mean orgs.RegisterOrg" in str(raised.value)


def test_a_missing_version_is_not_taken_for_another() -> None:
    with pytest.raises(CliError, match="not a known command type"):
        resolve_command_type("orgs.RegisterOrg.v9")


def test_an_event_type_is_not_sent() -> None:
    with pytest.raises(CliError, match="is not a command"):
        resolve_command_type("orgs.OrgRegistered")


# --- topic names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "topic"),
    [
        ("orgs.events", "bianzhi.orgs.events.v1"),
        ("quota.commands", "bianzhi.quota.commands.v1"),
        ("results", COMMAND_RESULTS),
        ("command-results", COMMAND_RESULTS),
        ("roster.events.dlq", "bianzhi.roster.events.v1.dlq"),
        ("results.dlq", f"{COMMAND_RESULTS}.dlq"),
        ("roster.answers", "bianzhi.roster.answers.v1"),
        ("orgs.answers.dlq", "bianzhi.orgs.answers.v1.dlq"),
        ("bianzhi.notify.events.v1", "bianzhi.notify.events.v1"),
        ("bianzhi.future.events.v2", "bianzhi.future.events.v2"),
    ],
)
def test_topics_resolve_from_short_and_full_names(name: str, topic: str) -> None:
    assert resolve_topic(name) == topic


def test_an_unknown_topic_names_close_matches() -> None:
    with pytest.raises(CliError) as raised:
        resolve_topic("org.events")
    assert "did you mean orgs.events" in str(raised.value)


# --- times --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ago"),
    [
        ("30m", timedelta(minutes=30)),
        ("2h", timedelta(hours=2)),
        ("7d", timedelta(days=7)),
        ("45s", timedelta(seconds=45)),
        ("1w", timedelta(weeks=1)),
        ("1.5h", timedelta(minutes=90)),
        ("2H", timedelta(hours=2)),
    ],
)
def test_ages_count_back_from_now(text: str, ago: timedelta) -> None:
    assert parse_since(text, now=NOW) == NOW - ago


def test_iso_datetimes_keep_their_offset_and_come_back_in_utc() -> None:
    since = parse_since("2026-11-25T09:30:00+08:00")
    assert since == datetime(2026, 11, 25, 1, 30, tzinfo=UTC)
    assert since.tzinfo is UTC


def test_a_date_or_a_naive_time_is_local_time() -> None:
    local = datetime(2026, 11, 25).astimezone()
    assert parse_since("2026-11-25") == local
    assert parse_since("2026-11-25T00:00") == local
    assert parse_since("2026-11-25").tzinfo is UTC


@pytest.mark.parametrize("text", ["yesterday", "2x", "-2h", "2026-13-01", ""])
def test_a_bad_time_says_what_is_expected(text: str) -> None:
    with pytest.raises(CliError, match="expected an ISO date or datetime"):
        parse_since(text)


# --- data and envelope --------------------------------------------------------------------


def test_data_comes_inline_or_from_a_file(tmp_path: Path) -> None:
    data = register_org_data()
    path = tmp_path / "org.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    assert send.load_data(json.dumps(data)) == data
    assert send.load_data(f"@{path}") == data


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{bad", "--data: expected a JSON object; Expecting property name"),
        ("[1, 2]", "--data: expected a JSON object, got list"),
        ("@/nonexistent/org.json", "--data @/nonexistent/org.json: cannot read the file"),
    ],
)
def test_bad_data_says_what_is_wrong(text: str, expected: str) -> None:
    with pytest.raises(CliError) as raised:
        send.load_data(text)
    assert str(raised.value).startswith(expected)


def test_the_envelope_carries_the_actor_and_the_subject() -> None:
    data = register_org_data()
    envelope = send.build_envelope(
        RegisterOrg,
        data,
        command_id="c-1",
        source="/cli",
        actor="zhang.wei",
        region="130100",
        roles=" clerk, approver ",
    )
    assert envelope.type == RegisterOrg.TYPE
    assert envelope.subject == data["org_id"]
    assert envelope.correlationid == "c-1"
    assert (envelope.actorid, envelope.actorregion, envelope.actorroles) == (
        "zhang.wei",
        "130100",
        "clerk,approver",
    )
    assert envelope.data["document"]["number"] == "长编〔2026〕1号"


def test_without_validation_the_data_goes_as_given() -> None:
    envelope = send.build_envelope(
        RegisterOrg,
        {"org_id": "not-a-uuid", "extra": 1},
        command_id="c-2",
        source="/cli",
        actor=None,
        region=None,
        roles=None,
        validate=False,
    )
    assert envelope.data == {"org_id": "not-a-uuid", "extra": 1}
    assert envelope.subject == "not-a-uuid"
    assert envelope.actorid is None


@pytest.mark.parametrize(
    ("actor", "region", "roles", "expected"),
    [
        (None, "130100", "clerk", "--actor: a command must name its actor"),
        ("a", "1301", "clerk", "--region '1301': expected a six-digit"),
        ("a", "130100", "clerk,boss", "unknown role boss"),
    ],
)
def test_the_actor_is_checked(actor: str | None, region: str, roles: str, expected: str) -> None:
    with pytest.raises(CliError, match=expected):
        send.build_envelope(
            RegisterOrg,
            register_org_data(),
            command_id="c-3",
            source="/cli",
            actor=actor,
            region=region,
            roles=roles,
        )


# --- the platform file --------------------------------------------------------------------


def test_the_platform_file_round_trips_while_its_process_lives(tmp_path: Path) -> None:
    platform = Platform("127.0.0.1:9092", {"orgs": "http://127.0.0.1:8080"}, os.getpid(), "now")
    write_platform(tmp_path, platform)
    assert read_platform(tmp_path) == platform
    assert common.find_broker(None, tmp_path) == "127.0.0.1:9092"
    assert common.find_broker("kafka:9093", tmp_path) == "kafka:9093"


def test_a_platform_file_of_a_dead_process_is_no_platform(tmp_path: Path) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    write_platform(tmp_path, Platform("127.0.0.1:9092", {}, int(gone.stdout), "then"))
    assert read_platform(tmp_path) is None


# --- main: one-line errors and exit statuses -----------------------------------------------


def test_bad_json_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["send", "orgs.RegisterOrg", "--data", "{not json", "--actor", "a"])
    assert status == 2
    assert "--data: expected a JSON object" in one_line_error(capsys)


def test_an_unknown_type_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["send", "orgs.RegistrOrg", "--data", "{}"])
    assert status == 2
    assert "did you mean orgs.RegisterOrg" in one_line_error(capsys)


def test_data_that_does_not_fit_lists_the_fields(capsys: pytest.CaptureFixture[str]) -> None:
    data = register_org_data() | {"kind": "ministry"}
    del data["name"]
    argv = ["send", "orgs.RegisterOrg", "--data", json.dumps(data)]
    status = main([*argv, "--actor", "a", "--region", "130100", "--roles", "approver"])
    assert status == 2
    line = one_line_error(capsys)
    assert "--data does not fit orgs.RegisterOrg: name: Field required; kind: " in line
    assert "--no-validate" in line


def test_no_running_platform_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["send", "orgs.RegisterOrg", "--data", json.dumps(register_org_data())]
    actor = ["--actor", "a", "--region", "130100", "--roles", "approver"]
    status = main([*argv, *actor, "--data-dir", str(tmp_path)])
    assert status == 2
    assert one_line_error(capsys) == (
        f"bianzhi: error: no running platform found in {tmp_path}; "
        "start it with `bianzhi up` or pass --broker"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["tail", "nope", "--data-dir", "/nonexistent"], "TOPIC 'nope': expected a topic name"),
        (["tail", "results", "--max", "0"], "argument --max: expected a number of at least 1"),
        (["replay", "orgs", "--since", "soon"], "--since 'soon': expected an ISO date"),
        (["replay", "payroll", "--since", "1h"], "SERVICE 'payroll': expected one of"),
        (["migrate", "payroll"], "SERVICE 'payroll': expected one of"),
        (["send", "orgs.RegisterOrg"], "the following arguments are required: --data"),
        (["send", "orgs.RegisterOrg", "--data", "{}", "--timeout", "-1"], "--timeout"),
        (["up", "--http-port", "70000"], "argument --http-port: expected a TCP port"),
        (["up", "--fresh", "--kafka", "k:9092"], "--fresh: only the embedded broker"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert expected in one_line_error(capsys)


def test_up_refuses_a_data_dir_whose_platform_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_platform(tmp_path, Platform("127.0.0.1:1", {}, os.getpid(), "now"))
    assert main(["up", "--data-dir", str(tmp_path)]) == 2
    assert "a platform is already running from it" in one_line_error(capsys)


def test_a_command_for_a_service_the_platform_lacks_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    urls = {"orgs": "http://127.0.0.1:8080"}
    write_platform(tmp_path, Platform("127.0.0.1:1", urls, os.getpid(), "now"))
    data = json.dumps({"subscription_id": str(uuid.uuid4())})
    argv = ["send", "notify.Unsubscribe", "--data", data, "--data-dir", str(tmp_path)]
    assert main([*argv, "--actor", "a", "--region", "130100", "--roles", "admin"]) == 2
    assert "the notify service is not running in this platform (running: orgs)" in (
        one_line_error(capsys)
    )


def test_ctrl_c_exits_130_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(_args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(send, "run", interrupted)
    assert main(["send", "orgs.RegisterOrg", "--data", "{}"]) == 130
    assert capsys.readouterr() == ("", "")


def test_an_unexpected_failure_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(_args: object) -> int:
        raise RuntimeError("disk on fire\nreally")

    monkeypatch.delenv("BIANZHI_DEBUG", raising=False)
    monkeypatch.setattr(send, "run", broken)
    assert main(["send", "orgs.RegisterOrg", "--data", "{}"]) == 1
    line = one_line_error(capsys)
    assert "unexpected RuntimeError: disk on fire really" in line
    assert "BIANZHI_DEBUG=1" in line


def test_a_reader_going_away_is_no_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def piped(_args: object) -> int:
        raise BrokenPipeError

    monkeypatch.setattr(send, "run", piped)
    assert main(["send", "orgs.RegisterOrg", "--data", "{}"]) == 0
    assert capsys.readouterr().err == ""


async def test_kafka_failures_become_one_line_errors_but_a_broken_pipe_stays() -> None:
    with pytest.raises(CliError, match=r"^cannot reach the Kafka broker at k:1 \(TimeoutError"):
        async with common.kafka_errors("k:1"):
            raise TimeoutError
    with pytest.raises(BrokenPipeError):
        async with common.kafka_errors("k:1"):
            raise BrokenPipeError


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--help"]) == 0
    assert "--fresh" in capsys.readouterr().out


# --- up: start-up failures and progress ----------------------------------------------------


async def start_fake_service(log_path: Path, code: str) -> up.ServiceProcess:
    with log_path.open("a") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdout=log, stderr=asyncio.subprocess.STDOUT
        )
    return up.ServiceProcess("orgs", "http://127.0.0.1:1", log_path, process)


def fake_up(tmp_path: Path, ready_timeout_s: float) -> up.Up:
    return up.Up(
        settings=common.load_settings(data_dir=tmp_path),
        services=["orgs"],
        host="127.0.0.1",
        ports={"orgs": free_port()},
        ready_timeout_s=ready_timeout_s,
    )


async def test_a_service_exiting_during_start_up_is_named_with_its_log(tmp_path: Path) -> None:
    proc = await start_fake_service(
        tmp_path / "orgs.log", "print('cannot open the database'); raise SystemExit(3)"
    )
    with pytest.raises(up.StartupFailed) as raised:
        await fake_up(tmp_path, 10).wait_ready(proc)
    message = str(raised.value)
    assert message.startswith("service orgs exited during start-up (status 3); last lines of ")
    assert message.endswith("orgs.log:\ncannot open the database")


async def test_a_service_never_ready_is_named_after_the_timeout(tmp_path: Path) -> None:
    proc = await start_fake_service(tmp_path / "orgs.log", "import time; time.sleep(30)")
    try:
        with pytest.raises(up.StartupFailed, match=r"service orgs was not ready within 0.3 s"):
            await fake_up(tmp_path, 0.3).wait_ready(proc)
    finally:
        proc.process.kill()
        await proc.process.wait()


def test_replay_progress_is_one_line_per_thousand_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    monkeypatch.setattr(replay, "say", said.append)
    progress = replay.progress_reporter("orgs")
    for done in (500, 1000, 1500, 2000, 2500, 2600):
        progress(done, 2600)
    assert said == [
        "orgs: re-published 1,000 of 2,600 outbox rows",
        "orgs: re-published 2,000 of 2,600 outbox rows",
    ]


def test_the_cliff_warning_names_the_fullest_partition_and_the_way_out() -> None:
    warning = up.cliff_warning([("t.a", 0, 10_500), ("t.b", 3, 12_000)])
    assert "2 partition(s) hold more than 10,000 messages" in warning
    assert "partition 3 of t.b, 12,000" in warning
    assert "Restart with `bianzhi up`" in warning


# --- which modules a command line loads ----------------------------------------------------


def _registered(parser: object) -> list[str]:
    (commands,) = [a for a in parser._actions if a.dest == "command"]  # type: ignore[attr-defined]
    return list(commands.choices)


def test_a_command_line_registers_its_command_alone_and_no_command_registers_all() -> None:
    everything = _registered(build_parser([]))
    assert everything == list(COMMANDS)  # each module registers the command it is listed for
    assert _registered(build_parser(["--help"])) == everything
    assert _registered(build_parser(["no-such-command"])) == everything
    for command in COMMANDS:
        assert _registered(build_parser([command, "--help"])) == [command]


@pytest.mark.parametrize("argv", [["report", "notices"], ["check"], ["send"], ["tail"]])
def test_commands_that_only_read_or_send_do_not_load_the_services_stack(argv: list[str]) -> None:
    probe = (
        "import sys; from services.cli.main import build_parser; "
        f"build_parser({argv!r}); "
        "print(sorted(m for m in ('faststream', 'sqlalchemy', 'alembic') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_an_unknown_command_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-command"]) == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'no-such-command'" in error
    assert all(f"'{command}'" in error for command in COMMANDS), error


def test_a_free_http_base_lies_below_the_ports_outgoing_connections_take() -> None:
    import socket

    from services.cli.up import _ephemeral_low, free_http_base

    for _ in range(20):
        base = free_http_base(count=4)
        assert base >= 10_000 and base + 3 < _ephemeral_low()
        for port in range(base, base + 4):  # each one free: a listener can bind it
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", port))
