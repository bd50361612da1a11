"""The pure parts of `bianzhi report`: division subtrees, table layout, the statistics sheets."""

from __future__ import annotations

from typing import Any

from services.cli.report import (
    OrgStats,
    display_width,
    format_table,
    org_notices,
    render_establishment,
    render_notices,
    subtree,
    table1,
    table2,
)


def test_subtree_lists_the_division_then_the_current_divisions_below_it() -> None:
    rows = subtree("130000", 1)
    assert rows[0] == (0, "130000")
    cities = [code for level, code in rows if level == 1]
    assert "130100" in cities and "130200" in cities
    assert all(code.startswith("13") and code != "130000" for code in cities)
    assert subtree("130102", 2) == [(0, "130102")]  # a county has nothing below it
    deep = subtree("130100", 1)
    assert (1, "130102") in deep and all(level <= 1 for level, _ in deep)
    assert subtree("130100", 0) == [(0, "130100")]


def test_chinese_text_takes_two_columns_and_numbers_align_right() -> None:
    assert display_width("石家庄市") == 8
    assert display_width("a1") == 2
    lines = list(format_table(("名称", "核定数"), [("长安区", 12), ("桥西区", 7)]))
    assert lines[0] == "名称    核定数"
    assert lines[1] == "------  ------"
    assert lines[2] == "长安区      12"
    assert lines[3] == "桥西区       7"


def test_the_establishment_table_has_a_title_and_dashes_for_no_limit() -> None:
    row = {
        "level": 1,
        "division_code": "130100",
        "division_name": "石家庄市",
        "category": "admin",
        "approved": 12,
        "occupied": 1,
        "reserved": 2,
        "vacant": 9,
        "limit": None,
        "left": None,
    }
    text = render_establishment("130000", None, [row]).splitlines()
    assert text[0] == "河北省（130000）机构编制情况  当前"
    assert text[3].split() == ["130100", "石家庄市", "行政编制", "12", "1", "2", "9", "—", "—"]


def _notice(number: str, status: str, count: int, used: int) -> dict[str, Any]:
    return {
        "notice_no": number,
        "category": "admin",
        "count": count,
        "used": used,
        "remaining": count - used if status == "issued" else 0,
        "valid_until": "2027-06-30",
        "status": status,
    }


def test_the_notices_table_says_each_notices_state_as_an_office_does() -> None:
    org_id = "7d3f0a3e-8c1e-4a43-9d6b-1b8f2f0c1a02"
    notices = [
        _notice("冀编用〔2026〕1号", "issued", 3, 1),
        _notice("冀编用〔2026〕2号", "issued", 2, 2),
        _notice("冀编用〔2026〕3号", "cancelled", 2, 0),
        _notice("冀编用〔2026〕4号", "expired", 2, 1),
    ]
    text = render_notices(org_id, "长安区财政局", notices, usable=False).splitlines()
    assert text[0] == f"长安区财政局（{org_id}）的用编通知单：4 张，剩余名额 2 个"
    assert text[1].split() == [
        "用编通知单号",
        "编制类别",
        "名额",
        "已用",
        "剩余",
        "有效期至",
        "状态",
    ]
    assert [line.split() for line in text[3:]] == [
        ["冀编用〔2026〕1号", "行政编制", "3", "1", "2", "2027-06-30", "有效"],
        ["冀编用〔2026〕2号", "行政编制", "2", "2", "0", "2027-06-30", "已用完"],
        ["冀编用〔2026〕3号", "行政编制", "2", "0", "0", "2027-06-30", "已作废"],
        ["冀编用〔2026〕4号", "行政编制", "2", "1", "0", "2027-06-30", "已过期"],
    ]
    assert render_notices(org_id, None, [], usable=True) == f"单位（{org_id}）的可用用编通知单：无"


class _Pages:
    """A quota query API that answers ``GET /orgs/{id}/notices`` two notices a page."""

    def __init__(self, notices: list[dict[str, Any]]) -> None:
        self.notices = notices
        self.asked: list[dict[str, Any]] = []

    def get(self, path: str, *, missing_ok: bool = False, **params: Any) -> dict[str, Any]:
        assert not missing_ok
        self.asked.append({"path": path, **params})
        start = params["offset"]
        return {
            "name": "长安区财政局",
            "total": len(self.notices),
            "notices": self.notices[start : start + 2],
        }


def test_every_page_of_an_orgs_notices_is_read() -> None:
    notices = [_notice(f"冀编用〔2026〕{i}号", "issued", 2, 0) for i in range(5)]
    api = _Pages(notices)
    got = org_notices(api, "org-1", category="admin", usable=True)  # type: ignore[arg-type]
    assert got == ("长安区财政局", notices)
    assert [a["offset"] for a in api.asked] == [0, 2, 4]
    assert {(a["path"], a["category"], a["usable"]) for a in api.asked} == {
        ("/orgs/org-1/notices", "admin", "true")
    }


def test_statistics_sheets_list_orgs_units_and_leader_posts() -> None:
    unit = "7d3f0a3e-8c1e-4a43-9d6b-1b8f2f0c1a01"
    org = {
        "name": "长安区财政局",
        "kind": "organ",
        "division_code": "130102",
        "division_name": "长安区",
        "uscc": None,
        "grade": "正科级",
        "funding": None,
        "status": "active",
        "units": [{"unit_id": unit, "name": "预算科"}],
    }
    est = {
        "categories": [
            {"category": "admin", "approved": 12, "occupied": 3, "reserved": 1, "vacant": 8},
            {"category": "support", "approved": 2, "occupied": 2, "reserved": 0, "vacant": 0},
        ],
        "leader_posts": [
            {"unit_id": None, "principal": 1, "deputy": 2, "principal_held": 1, "deputy_held": 1},
            {"unit_id": unit, "principal": 1, "deputy": 1, "principal_held": 0, "deputy_held": 1},
        ],
    }
    headers, rows = table1([OrgStats(org, est), OrgStats({**org, "units": []}, None)])
    assert headers[:3] == ("序号", "机构名称", "机构类别")
    assert rows[0] == [1, "长安区财政局", "机关", "130102", "长安区", "", "正科级", "", 1, "存续"]
    assert rows[1][0] == 2 and rows[1][8] == 0
    _, rows2 = table2([OrgStats(org, est)])
    assert rows2 == [
        ["长安区财政局", "（本级）", "行政编制", 12, 3, 1, 8, 1, 1, 2, 1],
        ["长安区财政局", "（本级）", "工勤编制", 2, 2, 0, 0, "", "", "", ""],
        ["长安区财政局", "预算科", "", "", "", "", "", 1, 0, 1, 1],
    ]
    _, unseen = table2([OrgStats({**org, "units": []}, None)])
    assert unseen == [["长安区财政局", "（本级）", "", 0, 0, 0, 0, 0, 0, 0, 0]]
