"""`bianzhi demo` dates its plan once per data directory, scope and seed."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from contracts.common import office_today
from services.cli.demo import DEMO_FILE, demo_date


def test_a_later_run_dates_the_plan_as_the_first_did(
    tmp_path: Path,
) -> None:
    first, remembered = demo_date(tmp_path, "130000", 1, None)
    assert (first, remembered) == (office_today(), False)
    # Next year, without --as-of: the date of the first run, hence the same plan.
    again, remembered = demo_date(tmp_path, "130000", 1, None)
    assert (again, remembered) == (first, True)


def test_a_date_given_wins_and_the_first_one_given_is_the_one_remembered(tmp_path: Path) -> None:
    given = date(2025, 3, 1)
    assert demo_date(tmp_path, "130000", 1, given) == (given, False)
    assert demo_date(tmp_path, "130000", 1, date(2027, 1, 1)) == (date(2027, 1, 1), False)
    assert demo_date(tmp_path, "130000", 1, None) == (given, True)
    # Another seed or scope is another plan, dated on its own.
    assert demo_date(tmp_path, "130000", 2, None) == (office_today(), False)
    assert demo_date(tmp_path, "130100", 1, None) == (office_today(), False)
    stored = json.loads((tmp_path / DEMO_FILE).read_text())["dated"]
    assert stored["130000/seed-1"] == "2025-03-01"


def test_without_a_data_directory_nothing_is_written(tmp_path: Path) -> None:
    missing = tmp_path / "no-platform-here"
    assert demo_date(missing, "130000", 1, None) == (office_today(), False)
    assert not missing.exists()


def test_an_unreadable_file_is_taken_as_no_date_and_written_again(tmp_path: Path) -> None:
    (tmp_path / DEMO_FILE).write_text("{not json")
    assert demo_date(tmp_path, "130000", 1, date(2026, 5, 4)) == (date(2026, 5, 4), False)
    assert demo_date(tmp_path, "130000", 1, None) == (date(2026, 5, 4), True)
