"""`bianzhi up --require-signatures` as a user runs it: signed commands end to end.

The CLI signs with the platform's dev key, the roster signs the slot requests it sends quota,
unsigned and wrongly signed commands are refused with `forbidden`, and every answer is in the
owning service's audit chain (`bianzhi audit verify`).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from contracts.base import Message
from contracts.codes import Category
from contracts.quota import ApproveQuota, IssueQuotaUseNotice
from contracts.results import CommandCompleted, CommandRejected
from services.cli.keys import create_key
from services.cli.up import DEV_KID
from tests.component.test_roster_sagas import DOC, citizen, enrol
from tests.integration.test_cli import REPO, RunningPlatform, start_platform, stop
from tests.support.builders import register_org
from tests.support.kafka import CommandClient

pytestmark = pytest.mark.broker

APPROVER = ["--actor", "li.na", "--region", "130000", "--roles", "approver"]
CLERK = ["--actor", "wang.fang", "--region", "130100", "--roles", "clerk"]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    data_dir = tmp_path_factory.mktemp("signed") / "data"
    running = start_platform(data_dir, data_dir.parent / "up.stderr", "--require-signatures")
    try:
        yield running
    finally:
        stop(running.process)


def bianzhi(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def send(
    platform: RunningPlatform, payload: Message, actor: list[str], **env: str
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(payload.model_dump(mode="json", exclude_none=True), ensure_ascii=False)
    done = bianzhi(
        "send", payload.TYPE, "--data", data, *actor, "--data-dir", str(platform.data_dir),
        env=env,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def completed(platform: RunningPlatform, payload: Message, actor: list[str]) -> dict[str, Any]:
    """Send until completed: a projection may not yet know an org registered a moment ago."""
    deadline = time.monotonic() + 30
    while True:
        code, result = send(platform, payload, actor)
        if code == 0:
            assert result["type"] == CommandCompleted.TYPE
            return result
        assert result["data"]["code"] == "not_found", result
        assert time.monotonic() < deadline, result
        time.sleep(0.5)


def test_the_cli_signs_and_a_saga_runs_through_signed_steps(platform: RunningPlatform) -> None:
    keys = platform.data_dir / "keys"
    assert (keys / f"{DEV_KID}.key.pem").exists() and (keys / f"{DEV_KID}.pub.pem").exists()
    org = register_org()
    completed(platform, org, APPROVER)
    completed(
        platform,
        ApproveQuota(
            org_id=org.org_id,
            category=Category.ADMIN,
            approved=3,
            document=DOC,
            effective_date=DOC.date,
        ),
        APPROVER,
    )
    notice = IssueQuotaUseNotice(
        notice_no=f"冀编用〔2026〕{uuid.uuid4().hex[:8]}号",
        org_id=org.org_id,
        category=Category.ADMIN,
        count=1,
        valid_until=date(2099, 12, 31),
        document=DOC,
    )
    completed(platform, notice, APPROVER)
    # The enrolment's OccupySlot goes from the roster to quota signed with the roster's key.
    result = completed(platform, enrol(citizen(), org.org_id, notice.notice_no), CLERK)
    assert result["data"]["command_type"] == "bianzhi.roster.EnrolPerson.v1"


def test_an_unsigned_command_is_forbidden(platform: RunningPlatform) -> None:
    async def run() -> Any:
        client = CommandClient(platform.broker)
        await client.start()
        try:
            command_id = await client.send(register_org())
            return await client.result(command_id)
        finally:
            await client.stop()

    result = asyncio.run(run())
    assert result.type == CommandRejected.TYPE
    assert (result.data["code"], result.data["details"]["reason"]) == ("forbidden", "missing")


def test_a_command_signed_with_an_unknown_key_is_forbidden(
    platform: RunningPlatform, tmp_path: Path
) -> None:
    create_key(tmp_path, "stranger")
    code, result = send(
        platform,
        register_org(),
        APPROVER,
        BIANZHI_SIGNING_PRIVATE_KEY=str(tmp_path / "stranger.key.pem"),
        BIANZHI_SIGNING_KID="stranger",
    )
    assert code == 1
    assert result["data"]["code"] == "forbidden"
    assert result["data"]["details"] == {"reason": "unknown_kid", "kid": "stranger"}


def test_every_answer_is_in_an_intact_audit_chain(platform: RunningPlatform) -> None:
    for service in ("orgs", "quota", "roster"):
        done = bianzhi("audit", "verify", service, "--data-dir", str(platform.data_dir))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{service}: audit chain intact" in done.stdout
    # orgs answered at least two registrations, the unsigned one and the stranger's.
    orgs = bianzhi("audit", "verify", "orgs", "--data-dir", str(platform.data_dir)).stdout
    assert int(orgs.split(" entries")[0].rsplit(" ", 1)[-1].replace(",", "")) >= 3
