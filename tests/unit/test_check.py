"""The reconciliation rule of `bianzhi check`: exact, except for people in flight."""

from __future__ import annotations

from typing import Any

from services.cli.check import reconcile


def occupancy(*rows: tuple[str, str, int]) -> dict[str, Any]:
    return {
        "orgs": [
            {"org_id": org, "division_code": "130102", "categories": {cat: {"occupied": n}}}
            for org, cat, n in rows
        ]
    }


def counts(*rows: tuple[str, str, int, int, int]) -> dict[str, Any]:
    return {
        "orgs": [
            {
                "org_id": org,
                "division_code": "130102",
                "categories": {cat: {"held": held, "changing": changing, "enrolling": enrolling}},
            }
            for org, cat, held, changing, enrolling in rows
        ]
    }


def test_equal_counts_agree_and_are_totalled() -> None:
    found = reconcile(
        occupancy(("a", "admin", 3), ("b", "support", 1)),
        counts(("a", "admin", 3, 0, 0), ("b", "support", 1, 0, 0)),
    )
    assert found == ([], [], 2, 4, 4)


def test_people_in_flight_explain_a_difference_within_their_number() -> None:
    mismatches, in_flight, *_ = reconcile(
        occupancy(("a", "admin", 4), ("b", "admin", 1)),
        counts(("a", "admin", 3, 0, 1), ("b", "admin", 2, 1, 0)),
    )
    assert mismatches == []
    assert [(m.org_id, m.quota_occupied, m.roster_held) for m in in_flight] == [
        ("a", 4, 3),
        ("b", 1, 2),
    ]


def test_a_difference_beyond_the_work_in_flight_is_a_mismatch() -> None:
    mismatches, in_flight, *_ = reconcile(
        occupancy(("a", "admin", 5), ("c", "admin", 2)),
        counts(("a", "admin", 3, 0, 1), ("b", "admin", 1, 0, 0)),
    )
    assert [(m.org_id, m.quota_occupied, m.roster_held) for m in mismatches] == [
        ("a", 5, 3),
        ("b", 0, 1),
        ("c", 2, 0),
    ]
    assert in_flight == []
