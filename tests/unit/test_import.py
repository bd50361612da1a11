"""`bianzhi import`: the template, reading it back, the 导入校核 report, ids and result files."""

from __future__ import annotations

import csv
import uuid
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest
from openpyxl import Workbook, load_workbook

from contracts.codes import Category, EntryMethod, LeaderPost
from services.cli import importer
from services.cli.batch import BatchReport, Outcome, Status
from services.cli.common import CliError
from services.cli.importer import (
    COLUMNS,
    SheetRow,
    check_row,
    check_rows,
    code_of,
    label_of,
    read_sheet,
    result_path,
    row_command_id,
    write_results,
    write_template,
)

ORG = "3f6f5a3e-8c1e-4a43-9d6b-1b8f2f0c1a01"
HEADERS = [c.header for c in COLUMNS]
# Valid numbers (GB 11643 check digit): a woman born 1949-12-31, a man born 1990-01-01.
WOMAN = "11010519491231002X"
MAN = "130102199001011237"
BAD_CHECK = "130102199001011238"


def good_row(**changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "姓名": "张伟",
        "公民身份号码": MAN,
        "单位ID": ORG,
        "单位名称": "石家庄市长安区财政局",
        "编制类型": "行政编制",
        "用编通知单号": "石编用〔2026〕12号",
        "职务": "科员",
        "领导职数": "",
        "进入方式": "考录",
        "入编日期": "2026-03-01",
        "性别": "男",
        "出生日期": "1990-01-01",
        "民族": "汉族",
        "学历": "大学本科",
        "政治面貌": "中共党员",
        "联系电话": "13812345678",
    }
    row.update(changes)
    return row


def sheet_rows(*rows: dict[str, object]) -> list[SheetRow]:
    return [SheetRow(number, dict(row)) for number, row in enumerate(rows, start=2)]


def problems_of(rows: list[dict[str, object]]) -> set[tuple[int, str]]:
    return {(p.row, p.column) for c in check_rows(sheet_rows(*rows)) for p in c.problems}


# --- labels -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "codes"),
    [
        ("category", list(Category)),
        ("entry_method", list(EntryMethod)),
        ("leader_post", list(LeaderPost)),
        ("sex", ["male", "female"]),
    ],
)
def test_every_code_has_a_chinese_label_that_maps_back(field: str, codes: list[str]) -> None:
    for code in codes:
        label = label_of(field, code)
        assert label != code, f"{field} {code} has no Chinese label"
        assert code_of(field, label) == code
        assert code_of(field, str(code)) == code  # the code itself is read too


def test_common_aliases_are_read_and_unknown_labels_are_not() -> None:
    assert label_of("category", Category.INSTITUTIONAL_CSR) == "参照公务员法管理事业编制"
    assert code_of("category", "参公") == Category.INSTITUTIONAL_CSR
    assert code_of("category", " 工勤 ") == Category.SUPPORT
    assert code_of("entry_method", "招考") == EntryMethod.EXAM
    assert code_of("entry_method", "军队转业") == EntryMethod.MILITARY_RESETTLEMENT
    assert code_of("category", "行政编织") is None
    assert code_of("leader_post", "主任") is None


# --- the template, written and read back ---------------------------------------------------


def test_the_xlsx_template_has_headers_instructions_and_drop_downs(tmp_path: Path) -> None:
    path = tmp_path / "模板.xlsx"
    write_template(path)
    book = load_workbook(path)
    assert book.sheetnames == [importer.DATA_SHEET, importer.HELP_SHEET]
    data = book[importer.DATA_SHEET]
    assert [cell.value for cell in data[1]] == HEADERS
    lists = {
        str(v.sqref).split(":")[0][:-1]: v.formula1 for v in data.data_validations.dataValidation
    }
    column = {h: data.cell(row=1, column=i + 1).column_letter for i, h in enumerate(HEADERS)}
    assert (
        lists[column["编制类型"]]
        == '"行政编制,政法专项编制,事业编制,参照公务员法管理事业编制,工勤编制"'
    )
    assert lists[column["进入方式"]] == '"考录,调入,军转安置,选调,其他"'
    assert lists[column["领导职数"]] == '"正职,副职"'
    assert lists[column["性别"]] == '"男,女"'
    # Typed numbers stay text (an 18-digit ID as a number loses its last digits in Excel).
    assert data.column_dimensions[column["公民身份号码"]].number_format == "@"
    assert data.column_dimensions[column["入编日期"]].number_format == "yyyy-mm-dd"
    help_rows = [row[0] for row in book[importer.HELP_SHEET].iter_rows(values_only=True)]
    assert all(h in help_rows for h in HEADERS)


def test_a_filled_xlsx_template_reads_back_as_enrol_commands(tmp_path: Path) -> None:
    path = tmp_path / "people.xlsx"
    write_template(path)
    book = load_workbook(path)
    sheet = book[importer.DATA_SHEET]
    first = good_row(领导职数="正职", 入编日期=datetime(2026, 3, 1), 出生日期=datetime(1990, 1, 1))
    second = good_row(
        姓名="李娜",
        公民身份号码=WOMAN,
        编制类型="政法专项编制",
        进入方式="军转安置",
        性别="女",
        出生日期=None,
        批准文件标题="关于录用的通知",
        批准文件文号="冀人社〔2026〕3号",
        批准文件日期="2026年2月20日",
    )
    for row in (first, second):
        sheet.append([row.get(h) for h in HEADERS])
    book.save(path)

    read = read_sheet(path)
    assert [r.number for r in read.rows] == [2, 3]
    checked = check_rows(read.rows)
    assert [c.problems for c in checked] == [[], []]
    one, two = (c.command for c in checked)
    assert one is not None and two is not None
    assert one.category is Category.ADMIN
    assert one.leader_post is LeaderPost.PRINCIPAL
    assert one.entry_method is EntryMethod.EXAM
    assert one.effective_date == date(2026, 3, 1)
    assert one.birth_date == date(1990, 1, 1)
    assert str(one.org_id) == ORG
    assert two.category is Category.POLITICAL_LEGAL
    assert two.entry_method is EntryMethod.MILITARY_RESETTLEMENT
    assert two.leader_post is None
    assert two.document is not None and two.document.date == date(2026, 2, 20)
    assert two.sex == "female"


@pytest.mark.parametrize("encoding", ["utf-8-sig", "gb18030"])
def test_a_csv_file_reads_back_in_either_encoding(tmp_path: Path, encoding: str) -> None:
    template = tmp_path / "template.csv"
    write_template(template)
    header = template.read_text(encoding="utf-8-sig").splitlines()[0].split(",")
    assert header == HEADERS
    path = tmp_path / "people.csv"
    with path.open("w", encoding=encoding, newline="") as out:
        writer = csv.writer(out)
        writer.writerow(HEADERS)
        writer.writerow([good_row().get(h, "") for h in HEADERS])
    (checked,) = check_rows(read_sheet(path).rows)
    assert checked.problems == []
    assert checked.command is not None and checked.command.name == "张伟"


def test_a_file_without_a_required_column_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text("姓名,公民身份号码\n张伟,130102199001011237\n", encoding="utf-8")
    with pytest.raises(CliError, match="单位ID, 编制类型, 用编通知单号, 进入方式, 入编日期"):
        read_sheet(path)


# --- the 导入校核 report ------------------------------------------------------------------


def test_the_report_names_row_and_column_of_every_problem() -> None:
    rows = [
        good_row(),  # row 2: fine
        good_row(公民身份号码=BAD_CHECK, 出生日期=None, 性别=None),  # row 3
        good_row(公民身份号码=WOMAN, 入编日期="2026-02-30", 性别="女", 出生日期=None),  # row 4
        good_row(公民身份号码="130102198001011259", 编制类型="行政编织", 性别=None, 出生日期=None),
        good_row(公民身份号码="130102198001011259", 姓名="", 性别=None, 出生日期=None),  # row 6
        good_row(公民身份号码="11010519491231002X", 性别="男", 出生日期=None, 单位ID="x"),  # 7
    ]
    checked = check_rows(sheet_rows(*rows))
    found = {(p.row, p.column): p for c in checked for p in c.problems}
    assert set(found) == {
        (3, "公民身份号码"),
        (4, "入编日期"),
        (4, "公民身份号码"),  # the same person as row 7
        (5, "编制类型"),
        (5, "公民身份号码"),  # duplicate of row 6
        (6, "姓名"),
        (6, "公民身份号码"),
        (7, "公民身份号码"),
        (7, "单位ID"),
        (7, "性别"),
    }
    assert "check digit" in found[(3, "公民身份号码")].message
    assert found[(3, "公民身份号码")].code == "invalid_citizen_id"
    assert "不是有效日期" in found[(4, "入编日期")].message
    assert "行政编织" in found[(5, "编制类型")].message
    assert found[(5, "公民身份号码")].message == "与第 6 行的公民身份号码重复"
    assert found[(5, "公民身份号码")].code == "conflict"
    assert found[(6, "姓名")].message == "必填"
    assert found[(7, "性别")].message == "性别与公民身份号码不符"
    assert [c.command is not None for c in checked] == [True, False, False, False, False, False]

    lines = importer.report_lines(Path("p.xlsx"), importer.Sheet(HEADERS, []), checked)
    assert lines[0] == "导入校核 p.xlsx: 6 行，1 行通过，5 行有问题"
    assert "3\t公民身份号码\t公民身份号码无效" in "\n".join(lines)


def test_a_citizen_id_stored_as_a_number_by_excel_is_a_problem() -> None:
    (checked,) = check_rows(sheet_rows(good_row(公民身份号码=1.30102199001011e17)))
    (problem,) = checked.problems
    assert problem.column == "公民身份号码"
    assert "数字" in problem.message


def test_documents_need_all_three_parts_and_leader_post_accepts_blank_words() -> None:
    (partial,) = check_rows(sheet_rows(good_row(批准文件标题="关于录用的通知")))
    assert [(p.column, p.message) for p in partial.problems] == [
        ("批准文件文号", "批准文件的标题、文号、日期须同时填写或同时留空")
    ]
    (none,) = check_rows(sheet_rows(good_row(领导职数="无")))
    assert none.command is not None and none.command.leader_post is None


# --- deterministic ids ----------------------------------------------------------------------


def test_command_ids_depend_on_the_row_content_only() -> None:
    first = check_row(SheetRow(2, good_row()))
    again = check_row(SheetRow(9, good_row(单位名称="另一个名称")))  # other row, note column
    changed = check_row(SheetRow(2, good_row(联系电话="13900000000")))
    assert first.command is not None and again.command is not None and changed.command is not None
    assert first.command_id == again.command_id == row_command_id(first.command)
    assert changed.command_id != first.command_id
    assert first.command.person_id is None  # the roster service keeps or assigns it
    uuid.UUID(str(first.command_id))


# --- result files ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".xlsx", ".csv"])
def test_the_result_file_gives_every_row_its_outcome(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"people{suffix}"
    rows = [
        good_row(),
        good_row(公民身份号码=WOMAN, 性别="女", 出生日期=None),
        good_row(公民身份号码="130102198001011259", 性别=None, 出生日期=None),
        good_row(公民身份号码=BAD_CHECK, 性别=None, 出生日期=None),
    ]
    sheet = importer.Sheet(HEADERS, sheet_rows(*rows))
    checked = check_rows(sheet.rows)
    ids = [c.command_id for c in checked]
    assert ids[3] is None
    assert ids[0] is not None and ids[1] is not None and ids[2] is not None
    person = uuid.uuid4()
    report = BatchReport(
        "import",
        {
            ids[0]: Outcome(ids[0], Status.COMPLETED, subject=str(person)),
            ids[1]: Outcome(ids[1], Status.REJECTED, code="notice_exhausted", message="用完了"),
            ids[2]: Outcome(ids[2], Status.NO_RESULT, code="no_result"),
        },
        1.0,
    )
    out = write_results(path, sheet, checked, report)
    assert out == result_path(path) == tmp_path / f"people.result{suffix}"
    if suffix == ".csv":
        with out.open(encoding="utf-8-sig", newline="") as handle:
            table = list(csv.reader(handle))
    else:
        sheet_out = load_workbook(out).active
        assert sheet_out is not None
        table = [[v or "" for v in row] for row in sheet_out.iter_rows(values_only=True)]
    assert table[0] == [*HEADERS, "结果", "原因代码", "说明", "person_id"]
    body = [dict(zip(table[0], row, strict=True)) for row in table[1:]]
    assert [r["公民身份号码"] for r in body] == [MAN, WOMAN, "130102198001011259", BAD_CHECK]
    assert [(r["结果"], r["原因代码"]) for r in body] == [
        ("成功", ""),
        ("失败", "notice_exhausted"),
        ("未确认", "no_result"),
        ("失败", "invalid_citizen_id"),
    ]
    assert body[0]["person_id"] == str(person)
    assert body[1]["说明"] == "用完了"
    assert body[3]["说明"].startswith("公民身份号码：公民身份号码无效")


def test_an_xlsx_without_the_data_sheet_name_reads_its_first_sheet(tmp_path: Path) -> None:
    path = tmp_path / "other.xlsx"
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(HEADERS)
    sheet.append([good_row().get(h) for h in HEADERS])
    book.save(path)
    (checked,) = check_rows(read_sheet(path).rows)
    assert checked.problems == []


# --- the notices, against quota's books --------------------------------------------------------

NOTICE = "石编用〔2026〕12号"


def notice(**changes: object) -> dict[str, object]:
    """A notice as quota's ``GET /notices`` shows it: issued to ``ORG`` for admin places."""
    shown: dict[str, object] = {
        "notice_no": NOTICE,
        "org_id": ORG,
        "category": "admin",
        "count": 3,
        "used": 1,
        "remaining": 2,
        "valid_until": "2026-06-30",
        "status": "issued",
    }
    shown.update(changes)
    return shown


# Three more valid people (GB 11643 check digits), born 1985-05-05, 1992-02-02 and 1988-08-08.
OTHERS = ("130102198505050016", "130102199202020017", "13010219880808001X")


def notice_rows(count: int, **changes: object) -> list[importer.CheckedRow]:
    ids = (MAN, *OTHERS)
    rows = [
        good_row(公民身份号码=ids[i], 性别=None, 出生日期=None, **changes) for i in range(count)
    ]
    checked = check_rows(sheet_rows(*rows))
    assert all(c.command is not None for c in checked), [c.problems for c in checked]
    return checked


def test_rows_within_the_places_left_of_a_usable_notice_meet_no_warning() -> None:
    assert importer.check_notices(notice_rows(2), {NOTICE: notice()}) == []


def test_rows_beyond_the_places_left_are_one_warning_naming_every_row_of_the_notice() -> None:
    checked = notice_rows(4)
    (finding,) = importer.check_notices(checked, {NOTICE: notice()})
    assert (finding.notice_no, finding.rows, finding.code) == (
        NOTICE,
        (2, 3, 4, 5),
        "notice_exhausted",
    )
    assert "剩余 2 个名额，本文件有 4 行使用：名额按文件顺序分配，第 4、5 行等" in finding.message
    # Those two are sent only once the others have their answers.
    assert importer.waiting_rows(checked, {NOTICE: notice()}) == {4, 5}


def test_only_rows_past_the_places_left_of_a_usable_notice_wait() -> None:
    checked = notice_rows(3)
    assert importer.waiting_rows(checked, {NOTICE: notice(remaining=3)}) == set()
    assert importer.waiting_rows(checked, {NOTICE: notice()}) == {4}
    assert importer.waiting_rows(checked, {NOTICE: notice(remaining=0)}) == {2, 3, 4}
    # A notice quota would refuse anyway, or one not looked at: nothing to wait for.
    assert importer.waiting_rows(checked, {NOTICE: None}) == set()
    assert importer.waiting_rows(checked, {NOTICE: notice(status="cancelled")}) == set()
    assert importer.waiting_rows(checked, {}) == set()


@pytest.mark.parametrize(
    ("shown", "changes", "code", "words"),
    [
        (None, {}, "notice_invalid", "没有这张用编通知单"),
        (notice(org_id=str(uuid.uuid4())), {}, "notice_invalid", "与本行的单位或编制类型不符"),
        (notice(category="institutional"), {}, "notice_invalid", "事业编制"),
        (notice(status="cancelled", remaining=0), {}, "notice_invalid", "已作废"),
        (notice(status="expired", remaining=0), {}, "notice_expired", "有效期至 2026-06-30"),
        # Issued, but lapsed by the day the rows take effect.
        (notice(), {"入编日期": "2026-07-01"}, "notice_expired", "入编日期 2026-07-01 已过期"),
    ],
)
def test_each_row_on_a_notice_quota_would_refuse_gets_quotas_reason(
    shown: dict[str, object] | None, changes: dict[str, object], code: str, words: str
) -> None:
    findings = importer.check_notices(notice_rows(2, **changes), {NOTICE: shown})
    assert [(f.rows, f.code) for f in findings] == [((2,), code), ((3,), code)]
    assert all(words in f.message for f in findings)


def test_rows_with_problems_and_notices_not_looked_up_are_left_out() -> None:
    checked = notice_rows(3)
    checked[0].command = None  # a row the 导入校核 refused is not sent: its notice is no matter
    assert importer.check_notices(checked, {NOTICE: notice(remaining=2)}) == []
    assert importer.check_notices(checked, {}) == []


class Quota:
    """Quota's query API as ``notice_report`` reads it: the notices it knows by number
    (``GET /notices``), and the usable ones of each org it knows (``GET /orgs/{id}/notices``)."""

    def __init__(
        self,
        known: dict[str, dict[str, object]],
        fail: bool = False,
        usable: dict[str, list[dict[str, object]]] | None = None,
        fail_lists: bool = False,
    ) -> None:
        self.known, self.fail, self.fail_lists = known, fail, fail_lists
        self.usable = {ORG: []} if usable is None else usable
        self.asked: list[str] = []
        self.listed: list[tuple[str, str | None]] = []

    def get(self, path: str, *, missing_ok: bool = False, **params: Any) -> object:
        assert missing_ok
        if self.fail:
            raise CliError("cannot reach the quota query API at http://127.0.0.1:1")
        if path == "/notices":
            self.asked.append(params["notice_no"])
            return self.known.get(params["notice_no"])
        org = path.removeprefix("/orgs/").removesuffix("/notices")
        assert path == f"/orgs/{org}/notices" and params["usable"] == "true"
        if self.fail_lists:
            raise CliError("quota /orgs/x/notices answered 500 (internal: boom)")
        self.listed.append((org, params["category"]))
        if org not in self.usable:
            return None
        found = [n for n in self.usable[org] if n["category"] == params["category"]]
        return {"name": "长安区财政局", "total": len(found), "notices": found}


def test_the_report_asks_for_each_notice_once_and_says_what_it_found() -> None:
    quota = Quota({NOTICE: notice(remaining=1)})
    lines, notices = importer.notice_report(notice_rows(3), quota)  # type: ignore[arg-type]
    assert quota.asked == [NOTICE]
    assert notices == {NOTICE: notice(remaining=1)}
    assert lines[0].startswith("用编通知单核对（quota 当前账目，仅为提示")
    assert lines[0].endswith("1 张，1 处提示")
    assert lines[2].startswith(f"2、3、4\t{NOTICE}\t用编通知单剩余 1 个名额")
    # What the rows could use instead: asked once for their org and category.
    assert quota.listed == [(ORG, "admin")]
    assert lines[3:] == [
        "可用的用编通知单（quota 当前账目，供修改以上各行）：",
        f"长安区财政局（{ORG}）的行政编制：没有可用的用编通知单",
    ]


def test_rows_on_a_notice_quota_would_refuse_are_shown_the_notices_they_could_use() -> None:
    other_org = str(uuid.uuid4())
    usable = {
        ORG: [
            notice(notice_no="石编用〔2026〕20号", remaining=4, valid_until="2027-03-31"),
            notice(notice_no="石编用〔2026〕21号", remaining=1, valid_until="2027-12-31"),
            notice(notice_no="石编用〔2026〕22号", category="support", remaining=2),
        ]
    }
    checked = notice_rows(3)
    assert checked[2].command is not None
    checked[2].command.org_id = uuid.UUID(other_org)  # a row of an org quota does not know
    quota = Quota({NOTICE: notice(status="cancelled", remaining=0)}, usable=usable)
    lines, _ = importer.notice_report(checked, quota)  # type: ignore[arg-type]
    assert quota.listed == [(ORG, "admin"), (other_org, "admin")]
    assert lines[-3:] == [
        "可用的用编通知单（quota 当前账目，供修改以上各行）：",
        f"长安区财政局（{ORG}）的行政编制：石编用〔2026〕20号（剩余 4 个名额，有效期至 "
        "2027-03-31）、石编用〔2026〕21号（剩余 1 个名额，有效期至 2027-12-31）",
        f"单位 {other_org}：quota 中没有这个单位（尚未登记，或还没有同步到 quota）",
    ]
    # When that look-up fails, the report says so and keeps its findings.
    failing = Quota({NOTICE: notice(status="cancelled", remaining=0)}, fail_lists=True)
    lines, _ = importer.notice_report(notice_rows(1), failing)  # type: ignore[arg-type]
    assert lines[2].startswith(f"2\t{NOTICE}\t用编通知单已作废")
    assert lines[3] == (
        "可用的用编通知单未能查询：quota /orgs/x/notices answered 500 (internal: boom)"
    )
    # No finding, no look-up.
    fine = Quota({NOTICE: notice()}, usable=usable)
    importer.notice_report(notice_rows(2), fine)  # type: ignore[arg-type]
    assert fine.listed == []

    quota = Quota({NOTICE: notice()})
    fine, _ = importer.notice_report(notice_rows(1), quota)  # type: ignore[arg-type]
    assert fine == ["用编通知单核对：1 张，名额够用"]


def test_without_quota_the_report_says_the_notices_were_not_checked() -> None:
    lines, notices = importer.notice_report(notice_rows(1), None)
    assert lines[0].startswith("用编通知单未核对：没有找到") and notices == {}
    down = importer.notice_report(notice_rows(1), Quota({}, fail=True))  # type: ignore[arg-type]
    assert down == (
        ["用编通知单未核对：cannot reach the quota query API at http://127.0.0.1:1"],
        {},
    )
    # Nothing to look at: every row has a problem.
    (refused,) = check_rows(sheet_rows(good_row(公民身份号码=BAD_CHECK)))
    assert importer.notice_report([refused], None) == ([], {})
