"""The rules of quota-use notices, vacancies and leader posts (pure, no database)."""

from __future__ import annotations

import uuid
from datetime import date

import pytest

from contracts.codes import Category, LeaderPost
from services.quota.domain import model
from services.runtime.rules import Rejection

ORG = uuid.uuid4()


def notice(**changes: object) -> model.Notice:
    values: dict[str, object] = {
        "notice_no": "N-1",
        "org_id": ORG,
        "category": Category.ADMIN,
        "count": 2,
        "used": 0,
        "valid_until": date(2030, 6, 30),
        "status": model.NoticeStatus.ISSUED,
    }
    values.update(changes)
    return model.Notice(**values)  # type: ignore[arg-type]


def code(exc: pytest.ExceptionInfo[Rejection]) -> str:
    return exc.value.code.value


def test_a_notice_is_valid_through_its_last_day() -> None:
    n = notice()
    assert model.check_notice_usable(n, "N-1", ORG, Category.ADMIN, date(2030, 6, 30)) is n
    assert not n.lapsed(date(2030, 6, 30)) and n.lapsed(date(2030, 7, 1))
    with pytest.raises(Rejection) as exc:
        model.check_notice_usable(n, "N-1", ORG, Category.ADMIN, date(2030, 7, 1))
    assert code(exc) == "notice_expired"


@pytest.mark.parametrize(
    ("found", "org_id", "category", "expected"),
    [
        (None, ORG, Category.ADMIN, "notice_invalid"),
        (notice(), uuid.uuid4(), Category.ADMIN, "notice_invalid"),
        (notice(), ORG, Category.SUPPORT, "notice_invalid"),
        (notice(status=model.NoticeStatus.CANCELLED), ORG, Category.ADMIN, "notice_invalid"),
        (notice(status=model.NoticeStatus.EXPIRED), ORG, Category.ADMIN, "notice_expired"),
        (notice(used=2), ORG, Category.ADMIN, "notice_exhausted"),
    ],
)
def test_an_unusable_notice_is_refused_with_its_reason(found, org_id, category, expected) -> None:
    with pytest.raises(Rejection) as exc:
        model.check_notice_usable(found, "N-1", org_id, category, date(2030, 1, 1))
    assert code(exc) == expected


def test_only_an_open_notice_can_be_cancelled_and_remaining_counts_unused_places() -> None:
    assert notice(used=1).remaining == 1
    assert notice(status=model.NoticeStatus.CANCELLED).remaining == 0
    for closed in (notice(status=model.NoticeStatus.EXPIRED), notice(), None):
        with pytest.raises(Rejection) as exc:
            model.check_notice_open(closed, "N-1", date(2030, 7, 1))
        assert code(exc) == "notice_invalid"
    model.check_notice_open(notice(), "N-1", date(2030, 6, 30))


def test_vacancy_counts_occupied_and_reserved() -> None:
    est = model.Establishment(ORG, Category.ADMIN, approved=10, occupied=4, reserved=3)
    model.check_vacancy(est, 3)
    with pytest.raises(Rejection) as exc:
        model.check_vacancy(est, 4)
    assert code(exc) == "no_vacancy"
    assert exc.value.details["vacant"] == 3


def test_a_leader_post_is_free_only_below_the_approved_count() -> None:
    posts = model.LeaderPosts(principal=1, deputy=2, principal_held=1, deputy_held=1)
    model.check_leader_post_free(posts, LeaderPost.DEPUTY)
    for held, post in ((posts, LeaderPost.PRINCIPAL), (None, LeaderPost.DEPUTY)):
        with pytest.raises(Rejection) as exc:
            model.check_leader_post_free(held, post)
        assert code(exc) == "leader_posts_exceeded"
