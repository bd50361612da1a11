"""`bianzhi import`: how offices load people (入编) from a spreadsheet.

* ``bianzhi import template`` writes the template: Chinese column headers, an instructions sheet
  (填写说明) and drop-down lists for the coded columns (xlsx), or a header row (csv).
* ``bianzhi import people FILE`` reads every row, checks every row against the contract
  first (the 导入校核 report: row, column, problem; a citizen ID twice in the file is a problem
  of every row that has it) and the quota-use notices the valid rows use against quota's
  books as they stand (unknown, another org or category, cancelled, lapsed, fewer places
  left than rows: warnings, since quota's answer is what counts; for the rows they name, the
  notices of their org and category with places left today, to correct the file with), then
  sends the valid rows as ``EnrolPerson`` commands, collects every result and writes
  ``FILE.result.xlsx`` (or ``.csv``) beside the input: each row with 结果, 原因代码, 说明 and
  person_id. Where a notice has fewer places left than the rows using it, the rows past its
  places are sent only once the others have their answers, so the places go to the rows in
  the order of the file, not in the order the roster happens to take the rows up (each is
  keyed by its citizen ID, so they spread over the partitions).

Each row's command id is derived from the row's content (`batch.command_id`): importing the same
file again re-sends the same ids, which get their stored results (with the same person_id) and
enrol nobody twice. A corrected row is new content, hence a new command. The person_id is left to
the roster service, which keeps the one a citizen ID already has (someone re-enrolled after a
release) and reports it as the result's subject.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from contracts import identifiers
from contracts.codes import Category, EntryMethod, LeaderPost, ReasonCode
from contracts.roster import EnrolPerson
from contracts.topics import ROSTER_COMMANDS
from services.cli.batch import (
    DEFAULT_IN_FLIGHT,
    DEFAULT_STALL_TIMEOUT_S,
    BatchReport,
    Outcome,
    Outgoing,
    Status,
    command_id,
    send_in_waves,
)
from services.cli.common import (
    CLI_SOURCE,
    CliError,
    add_broker_options,
    broker_settings,
    positive_float,
    positive_int,
    read_platform,
    say,
)
from services.cli.report import Api, org_notices, running_service_url
from services.cli.send import build_envelope

SOURCE = f"{CLI_SOURCE}/import"
DATA_SHEET = "人员名单"
HELP_SHEET = "填写说明"
RESULT_SHEET = "导入结果"
TEMPLATE_ROWS = 5000  # rows of the template that get the drop-down lists

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_INCOMPLETE = 3

# --- labels of the coded columns, both ways (WIRE-CONTRACT §4) --------------------------------

CATEGORY_LABELS: dict[str, str] = {
    Category.ADMIN: "行政编制",
    Category.POLITICAL_LEGAL: "政法专项编制",
    Category.INSTITUTIONAL: "事业编制",
    Category.INSTITUTIONAL_CSR: "参照公务员法管理事业编制",
    Category.SUPPORT: "工勤编制",
}
ENTRY_LABELS: dict[str, str] = {
    EntryMethod.EXAM: "考录",
    EntryMethod.TRANSFER_IN: "调入",
    EntryMethod.MILITARY_RESETTLEMENT: "军转安置",
    EntryMethod.APPOINTMENT: "选调",
    EntryMethod.OTHER: "其他",
}
LEADER_LABELS: dict[str, str] = {LeaderPost.PRINCIPAL: "正职", LeaderPost.DEPUTY: "副职"}
SEX_LABELS: dict[str, str] = {"male": "男", "female": "女"}

# What offices also write, mapped to the code (labels and the codes themselves are always read).
_ALIASES: dict[str, dict[str, str]] = {
    "category": {
        "行政": Category.ADMIN,
        "政法": Category.POLITICAL_LEGAL,
        "政法编制": Category.POLITICAL_LEGAL,
        "事业": Category.INSTITUTIONAL,
        "参公": Category.INSTITUTIONAL_CSR,
        "参公编制": Category.INSTITUTIONAL_CSR,
        "参照公务员法管理": Category.INSTITUTIONAL_CSR,
        "工勤": Category.SUPPORT,
    },
    "entry_method": {
        "招考": EntryMethod.EXAM,
        "考试录用": EntryMethod.EXAM,
        "公开招聘": EntryMethod.EXAM,
        "招聘": EntryMethod.EXAM,
        "军队转业": EntryMethod.MILITARY_RESETTLEMENT,
        "军转": EntryMethod.MILITARY_RESETTLEMENT,
        "任命": EntryMethod.APPOINTMENT,
        "选调/任命": EntryMethod.APPOINTMENT,
        "考录/招考": EntryMethod.EXAM,
    },
    "leader_post": {"正": LeaderPost.PRINCIPAL, "副": LeaderPost.DEPUTY},
    "sex": {"男性": "male", "女性": "female"},
}
_NONE_WORDS = frozenset({"无", "否", "-", "—", "／", "/"})


@dataclass(frozen=True)
class Column:
    """One column of the template: its Chinese header and what it fills of ``EnrolPerson``."""

    header: str
    field: str | None  # None: kept for the reader only, not sent
    required: bool = False
    kind: str = "text"  # text, date, choice
    labels: Mapping[str, str] | None = None
    note: str = ""
    width: int = 14


COLUMNS: tuple[Column, ...] = (
    Column("姓名", "name", True, note="与身份证一致"),
    Column(
        "公民身份号码", "citizen_id", True, note="18 位（末位可为 X）；15 位旧号自动升位", width=22
    ),
    Column("单位ID", "org_id", True, note="机构的标识（UUID），见机构查询结果", width=38),
    Column("单位名称", None, note="仅供核对，不导入", width=26),
    Column("编制类型", "category", True, "choice", CATEGORY_LABELS, width=24),
    Column("用编通知单号", "notice_no", True, note="该单位、该编制类型的用编通知单", width=22),
    Column("职务", "position", note="职务或岗位"),
    Column(
        "领导职数", "leader_post", False, "choice", LEADER_LABELS, "占用领导职数时填写；否则留空"
    ),
    Column("进入方式", "entry_method", True, "choice", ENTRY_LABELS),
    Column("入编日期", "effective_date", True, "date", note="如 2026-03-01"),
    Column("内设机构ID", "unit_id", note="可空；内设机构的标识（UUID）", width=38),
    Column("性别", "sex", False, "choice", SEX_LABELS, "可空；须与公民身份号码一致", width=8),
    Column("出生日期", "birth_date", False, "date", note="可空；须与公民身份号码一致"),
    Column("民族", "ethnicity", note="如 汉族", width=10),
    Column("学历", "education", note="如 大学本科"),
    Column("政治面貌", "political_status", note="如 中共党员、群众"),
    Column("联系电话", "phone", note="如 13812345678", width=16),
    Column("批准文件标题", "document.title", note="可空；三项须同时填写", width=26),
    Column("批准文件文号", "document.number", note="如 冀编〔2026〕12号", width=20),
    Column("批准文件日期", "document.date", False, "date", note="如 2026-02-20"),
)
BY_HEADER = {c.header: c for c in COLUMNS}
BY_FIELD = {c.field: c for c in COLUMNS if c.field}
TEXT_FORMAT_HEADERS = ("公民身份号码", "用编通知单号", "联系电话", "单位ID", "内设机构ID")
RESULT_HEADERS = ("结果", "原因代码", "说明", "person_id")


def label_of(field_name: str, code: str) -> str:
    """The Chinese label of a code of a coded column (the code itself when it has none)."""
    labels = BY_FIELD[field_name].labels or {}
    return labels.get(code, code)


def code_of(field_name: str, text: str) -> str | None:
    """The code of a label (or alias, or the code itself) of a coded column; None if unknown."""
    labels = BY_FIELD[field_name].labels or {}
    wanted = text.strip()
    for code, label in labels.items():
        if wanted in (label, str(code)) or wanted.lower() == str(code):
            return str(code)
    alias = _ALIASES.get(field_name, {}).get(wanted)
    return None if alias is None else str(alias)


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SheetRow:
    """One data row as read: its row number in the sheet (the header is row 1) and its cells."""

    number: int
    cells: dict[str, object]


@dataclass(frozen=True)
class Sheet:
    headers: list[str]
    rows: list[SheetRow]
    unknown_headers: list[str] = field(default_factory=list)


def _header(value: object) -> str:
    return str(value or "").strip().rstrip("*＊").strip()


def read_sheet(path: Path) -> Sheet:
    """The rows of an .xlsx (the 人员名单 sheet, else the first) or a .csv (UTF-8 or GB 18030)."""
    suffix = path.suffix.lower()
    if suffix == ".xlsx":
        table = _read_xlsx(path)
    elif suffix == ".csv":
        table = _read_csv(path)
    else:
        raise CliError(f"{path}: expected an .xlsx or .csv file")
    if not table:
        raise CliError(f"{path}: the file is empty; the first row must hold the column headers")
    headers = [_header(h) for h in table[0]]
    seen: set[str] = set()
    for header in headers:
        if header and header in seen:
            raise CliError(f"{path}: column {header} appears twice in the header row")
        seen.add(header)
    missing = [c.header for c in COLUMNS if c.required and c.header not in seen]
    if missing:
        raise CliError(
            f"{path}: the header row lacks the required column(s) {', '.join(missing)}; "
            "`bianzhi import template` writes a template with every column"
        )
    unknown = [h for h in headers if h and h not in BY_HEADER and h not in RESULT_HEADERS]
    rows = []
    for index, values in enumerate(table[1:], start=2):
        cells = {h: v for h, v in zip(headers, values, strict=False) if h}
        if any(_text(v) is not None for v in cells.values()):
            rows.append(SheetRow(index, cells))
    return Sheet(headers=[h for h in headers if h], rows=rows, unknown_headers=unknown)


def _read_xlsx(path: Path) -> list[list[object]]:
    from openpyxl import load_workbook
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except (OSError, InvalidFileException, KeyError, ValueError) as exc:
        raise CliError(f"{path}: cannot read the workbook ({exc})") from None
    try:
        sheet = book[DATA_SHEET] if DATA_SHEET in book.sheetnames else book.worksheets[0]
        return [list(row) for row in sheet.iter_rows(values_only=True)]
    finally:
        book.close()


def _read_csv(path: Path) -> list[list[object]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"{path}: cannot read the file ({exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = raw.decode("gb18030")  # what Excel on a Chinese Windows saves as "CSV"
        except UnicodeDecodeError:
            raise CliError(f"{path}: the file is neither UTF-8 nor GB 18030 text") from None
    return [list(row) for row in csv.reader(io.StringIO(text, newline=""))]


def _text(value: object) -> str | None:
    """A cell as text: None for an empty cell; dates as ISO; whole numbers without ``.0``."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.date().isoformat() if value.time() == datetime.min.time() else str(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


# --- checking (导入校核) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One problem of one row: the row number, the column (its Chinese header) and what is wrong."""

    row: int
    column: str
    message: str
    code: str = ReasonCode.INVALID_MESSAGE.value


@dataclass
class CheckedRow:
    row: SheetRow
    command: EnrolPerson | None
    problems: list[Problem]

    @property
    def command_id(self) -> str | None:
        return None if self.command is None else row_command_id(self.command)


def _parse_date(text: str) -> date | None:
    cleaned = text.strip().replace("年", "-").replace("月", "-").rstrip("日")
    cleaned = cleaned.replace("/", "-").replace(".", "-")
    cleaned = cleaned.split(" ")[0].split("T")[0]
    parts = cleaned.split("-")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and len(parts[0]) == 4:
        try:
            return date(int(parts[0]), int(parts[1]), int(parts[2]))
        except ValueError:
            return None
    if len(cleaned) == 8 and cleaned.isdigit():
        try:
            return date(int(cleaned[:4]), int(cleaned[4:6]), int(cleaned[6:]))
        except ValueError:
            return None
    return None


def _cell(column: Column, raw: object, row: int) -> tuple[object | None, Problem | None]:
    """One cell converted to what the contract expects, or the problem with it."""
    if column.field == "citizen_id" and isinstance(raw, float):
        return None, Problem(
            row,
            column.header,
            "公民身份号码被存成了数字，末几位已丢失；请把该列设为文本后重新填写",
            ReasonCode.INVALID_CITIZEN_ID.value,
        )
    text = _text(raw)
    if text is None:
        return None, None
    if column.kind == "date":
        if isinstance(raw, date):
            return (raw.date() if isinstance(raw, datetime) else raw), None
        parsed = _parse_date(text)
        if parsed is None:
            return None, Problem(row, column.header, f"「{text}」不是有效日期（应如 2026-03-01）")
        return parsed, None
    if column.kind == "choice" and column.field:
        if column.field == "leader_post" and text in _NONE_WORDS:
            return None, None
        code = code_of(column.field, text)
        if code is None:
            choices = "、".join((column.labels or {}).values())
            return None, Problem(
                row, column.header, f"「{text}」不是可选的{column.header}（可选：{choices}）"
            )
        return code, None
    return text, None


def _pydantic_problem(row: int, error: Mapping[str, Any], taken: set[str]) -> Problem | None:
    loc = [str(p) for p in error.get("loc", ())]
    kind = str(error.get("type", ""))
    message = str(error.get("msg", ""))
    field_name = ".".join(loc[:2]) if loc[:1] == ["document"] else (loc[0] if loc else "")
    if not field_name:  # a model rule: the fields that disagree with the citizen ID
        if "birth_date" in message:
            field_name, text = "birth_date", "出生日期与公民身份号码不符"
        elif "sex" in message:
            field_name, text = "sex", "性别与公民身份号码不符"
        else:
            return Problem(row, "（整行）", message)
        return Problem(row, BY_FIELD[field_name].header, text)
    column = BY_FIELD.get(field_name)
    if column is None:
        return Problem(row, "（整行）", f"{field_name}: {message}")
    if column.header in taken:
        return None
    context = error.get("ctx") or {}
    if kind == "missing":
        text = "必填"
    elif kind == ReasonCode.INVALID_CITIZEN_ID.value:
        return Problem(
            row,
            column.header,
            f"公民身份号码无效（{message}）",
            ReasonCode.INVALID_CITIZEN_ID.value,
        )
    elif kind == "string_too_long":
        text = f"太长（最多 {context.get('max_length')} 个字符）"
    elif kind == "string_too_short":
        text = f"太短（至少 {context.get('min_length')} 个字符）"
    elif kind == "string_pattern_mismatch":
        text = "格式不符" + (
            "（只能包含文字、数字和 -〔〕()（）/.）" if field_name == "notice_no" else ""
        )
    elif kind.startswith("uuid"):
        text = "不是有效的标识（应形如 3f6f5a3e-8c1e-4a43-9d6b-1b8f2f0c1a01）"
    elif kind.startswith("date"):
        text = "不是有效日期（应如 2026-03-01）"
    else:
        text = message
    return Problem(row, column.header, text)


def check_row(row: SheetRow) -> CheckedRow:
    """One row against the contract: every problem of it, or its ``EnrolPerson``."""
    problems: list[Problem] = []
    data: dict[str, Any] = {}
    document: dict[str, Any] = {}
    for column in COLUMNS:
        if column.field is None:
            continue
        value, problem = _cell(column, row.cells.get(column.header), row.number)
        if problem is not None:
            problems.append(problem)
        elif value is None and column.required:
            problems.append(Problem(row.number, column.header, "必填"))
        elif value is not None:
            if column.field.startswith("document."):
                document[column.field.split(".", 1)[1]] = value
            else:
                data[column.field] = value
    if document:
        if len(document) < 3:
            absent = [
                c.header
                for c in COLUMNS
                if c.field and c.field.startswith("document.") and c.field[9:] not in document
            ]
            problems.append(
                Problem(row.number, absent[0], "批准文件的标题、文号、日期须同时填写或同时留空")
            )
        else:
            data["document"] = document
    problems.extend(_disagreements_with_citizen_id(row.number, data))
    taken = {p.column for p in problems}
    try:
        command = EnrolPerson.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            problem = _pydantic_problem(row.number, error, taken)
            if problem is not None and problem not in problems:
                problems.append(problem)
                taken.add(problem.column)
        return CheckedRow(row, None, problems)
    if problems:
        return CheckedRow(row, None, problems)
    return CheckedRow(row, command, [])


def _disagreements_with_citizen_id(row: int, data: Mapping[str, Any]) -> list[Problem]:
    """Sex and birth date against a valid citizen ID (the contract checks them only once every
    field is valid; the report should name them with the other problems of the row)."""
    try:
        number = identifiers.validate_citizen_id(str(data.get("citizen_id", "")))
    except identifiers.IdentifierError:
        return []
    found = []
    if "sex" in data and data["sex"] != identifiers.citizen_sex(number):
        found.append(Problem(row, BY_FIELD["sex"].header, "性别与公民身份号码不符"))
    if "birth_date" in data and data["birth_date"] != identifiers.citizen_birth_date(number):
        found.append(Problem(row, BY_FIELD["birth_date"].header, "出生日期与公民身份号码不符"))
    return found


def check_rows(rows: Sequence[SheetRow]) -> list[CheckedRow]:
    """Every row checked; a citizen ID found in more than one row is a problem of each of them
    (which row is right is for the office to say), so none of them is sent."""
    checked = [check_row(row) for row in rows]
    by_id: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(checked):
        raw = _text(item.row.cells.get("公民身份号码"))
        if raw is None:
            continue
        try:
            key = identifiers.validate_citizen_id(raw)
        except identifiers.IdentifierError:
            key = raw.upper()
        by_id[key].append(index)
    for indexes in by_id.values():
        if len(indexes) < 2:
            continue
        numbers = [checked[i].row.number for i in indexes]
        for i in indexes:
            others = "、".join(str(n) for n in numbers if n != checked[i].row.number)
            checked[i].problems.append(
                Problem(
                    checked[i].row.number,
                    "公民身份号码",
                    f"与第 {others} 行的公民身份号码重复",
                    ReasonCode.CONFLICT.value,
                )
            )
            checked[i].command = None
    order = {c.header: i for i, c in enumerate(COLUMNS)}
    for item in checked:
        item.problems.sort(key=lambda p: order.get(p.column, len(order)))
    return checked


def row_command_id(command: EnrolPerson) -> str:
    """The command id of a row: from its content, the same on every import."""
    content = command.model_dump(mode="json", exclude_none=True)
    return command_id("import", EnrolPerson.TYPE, json.dumps(content, sort_keys=True))


def report_lines(path: Path, sheet: Sheet, checked: Sequence[CheckedRow]) -> list[str]:
    """The 导入校核 report: a summary line, then one line per problem (row, column, problem)."""
    bad = [c for c in checked if c.problems]
    lines = [
        f"导入校核 {path.name}: {len(checked)} 行，{len(checked) - len(bad)} 行通过，"
        f"{len(bad)} 行有问题"
    ]
    if sheet.unknown_headers:
        lines.append(f"（未识别的列，不导入：{'、'.join(sheet.unknown_headers)}）")
    if bad:
        lines.append("行\t列\t问题")
        for item in bad:
            for problem in item.problems:
                lines.append(f"{problem.row}\t{problem.column}\t{problem.message}")
    return lines


# --- the notices, against quota's books ---------------------------------------------------


@dataclass(frozen=True)
class NoticeFinding:
    """What the rows using one quota-use notice will meet in quota, as its books stand now."""

    notice_no: str
    rows: tuple[int, ...]
    message: str
    code: str


def check_notices(
    checked: Sequence[CheckedRow], notices: Mapping[str, Mapping[str, Any] | None]
) -> list[NoticeFinding]:
    """The 用编通知单 the valid rows use, checked as quota checks an enrolment's notice (see
    ``check_notice_usable``) against ``notices`` (``GET /notices``, ``None`` for one quota does
    not know): known, issued to the row's org and category, not cancelled, not lapsed on the
    row's 入编日期, and enough places left for the rows that pass all that.

    A finding is a warning, not a problem: the rows are still sent, and quota's answer is what
    counts (the books may change before the rows arrive; a row enrolled by an earlier import of
    the same file gets its stored result and takes no second place)."""
    return _notice_check(checked, notices)[0]


def waiting_rows(
    checked: Sequence[CheckedRow], notices: Mapping[str, Mapping[str, Any] | None]
) -> set[int]:
    """The rows (by number) to send only once every other row has its answer: on a notice with
    fewer places left than the rows that may use it, those past its places, in file order. The
    places then go to the rows in the order of the file (a later row gets one only when an
    earlier one was refused), not in whatever order the roster happens to handle the rows."""
    usable = _notice_check(checked, notices)[1]
    return {
        row
        for number, rows in usable.items()
        for row in rows[max((notices[number] or {}).get("remaining", 0), 0) :]
    }


def _notice_check(
    checked: Sequence[CheckedRow], notices: Mapping[str, Mapping[str, Any] | None]
) -> tuple[list[NoticeFinding], dict[str, list[int]]]:
    """The findings, and the rows (in file order) of each notice that may give them a place."""
    findings: list[NoticeFinding] = []
    usable: dict[str, list[int]] = defaultdict(list)
    for item in checked:
        command = item.command
        if command is None:
            continue
        number, at = command.notice_no, item.row.number
        if number not in notices:
            continue
        notice = notices[number]
        if notice is None:
            findings.append(
                NoticeFinding(number, (at,), "quota 中没有这张用编通知单", "notice_invalid")
            )
        elif notice["org_id"] != str(command.org_id) or notice["category"] != command.category:
            findings.append(
                NoticeFinding(
                    number,
                    (at,),
                    f"用编通知单发给单位 {notice['org_id']} 的"
                    f"{label_of('category', notice['category'])}，与本行的单位或编制类型不符",
                    "notice_invalid",
                )
            )
        elif notice["status"] == "cancelled":
            findings.append(NoticeFinding(number, (at,), "用编通知单已作废", "notice_invalid"))
        elif notice["status"] == "expired" or (
            date.fromisoformat(notice["valid_until"]) < command.effective_date
        ):
            findings.append(
                NoticeFinding(
                    number,
                    (at,),
                    f"用编通知单有效期至 {notice['valid_until']}，入编日期 "
                    f"{command.effective_date.isoformat()} 已过期",
                    "notice_expired",
                )
            )
        else:
            usable[number].append(at)
    for number, rows in usable.items():
        left = (notices[number] or {}).get("remaining", 0)
        if len(rows) > left:
            later = "、".join(str(r) for r in rows[left:])
            findings.append(
                NoticeFinding(
                    number,
                    tuple(rows),
                    f"用编通知单剩余 {left} 个名额，本文件有 {len(rows)} 行使用：名额按文件顺序"
                    f"分配，第 {later} 行等其余各行有了答复再发送，名额已用完则被拒绝"
                    "（重新导入同一文件时，已入编的行不再占名额）",
                    "notice_exhausted",
                )
            )
    findings.sort(key=lambda f: (f.rows[0], f.notice_no))
    return findings, usable


def fetch_notices(quota: Api, numbers: Sequence[str]) -> dict[str, Mapping[str, Any] | None]:
    """Each notice as quota's ``GET /notices`` shows it; ``None`` for one it does not know."""
    return {
        number: quota.get("/notices", missing_ok=True, notice_no=number)
        for number in dict.fromkeys(numbers)
    }


def notice_report(
    checked: Sequence[CheckedRow], quota: Api | None
) -> tuple[list[str], dict[str, Mapping[str, Any] | None]]:
    """The notice part of the 导入校核 report (what the valid rows' notices look like in quota
    now, or why they were not looked at), and the notices as quota showed them (none when not
    looked at)."""
    numbers = [c.command.notice_no for c in checked if c.command is not None]
    if not numbers:
        return [], {}
    if quota is None:
        return ["用编通知单未核对：没有找到运行中的平台（--quota-url 指定 quota 的查询接口）"], {}
    try:
        notices = fetch_notices(quota, numbers)
    except CliError as exc:
        return [f"用编通知单未核对：{exc}"], {}
    findings = check_notices(checked, notices)
    if not findings:
        return [f"用编通知单核对：{len(notices)} 张，名额够用"], notices
    lines = [
        f"用编通知单核对（quota 当前账目，仅为提示：这些行照常发送，以 quota 的答复为准）："
        f"{len(notices)} 张，{len(findings)} 处提示",
        "行\t用编通知单号\t提示",
    ]
    for finding in findings:
        rows = "、".join(str(r) for r in finding.rows)
        lines.append(f"{rows}\t{finding.notice_no}\t{finding.message}")
    try:
        available = usable_notices(quota, finding_pairs(checked, findings))
    except CliError as exc:
        lines.append(f"可用的用编通知单未能查询：{exc}")
    else:
        lines.extend(suggestion_lines(available))
    return lines, notices


def finding_pairs(
    checked: Sequence[CheckedRow], findings: Sequence[NoticeFinding]
) -> list[tuple[str, str]]:
    """The (org, category) of the rows the findings name, in file order, each once."""
    named = {row for finding in findings for row in finding.rows}
    return list(
        dict.fromkeys(
            (str(c.command.org_id), str(c.command.category))
            for c in checked
            if c.command is not None and c.row.number in named
        )
    )


def usable_notices(
    quota: Api, pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], tuple[str | None, list[dict[str, Any]]] | None]:
    """For each (org, category), the org's name and the notices of that category an enrolment
    could use today (quota's ``GET /orgs/{org_id}/notices?usable=true``); ``None`` for an org
    quota does not know."""
    return {
        (org, category): org_notices(quota, org, category=category, usable=True, missing_ok=True)
        for org, category in pairs
    }


def suggestion_lines(
    available: Mapping[tuple[str, str], tuple[str | None, Sequence[Mapping[str, Any]]] | None],
) -> list[str]:
    """What the rows that drew a finding could use instead: per org and category, the notices
    with places left today, so the clerk can correct the file before importing it."""
    if not available:
        return []
    lines = ["可用的用编通知单（quota 当前账目，供修改以上各行）："]
    for (org, category), found in available.items():
        label = label_of("category", category)
        if found is None:
            lines.append(f"单位 {org}：quota 中没有这个单位（尚未登记，或还没有同步到 quota）")
            continue
        name, usable = found
        who = f"{name}（{org}）" if name else f"单位 {org}"
        if not usable:
            lines.append(f"{who}的{label}：没有可用的用编通知单")
            continue
        listed = "、".join(
            f"{n['notice_no']}（剩余 {n['remaining']} 个名额，有效期至 {n['valid_until']}）"
            for n in usable
        )
        lines.append(f"{who}的{label}：{listed}")
    return lines


def quota_api(args: argparse.Namespace) -> Api | None:
    """The quota query API the notices are checked against: ``--quota-url``, else that of the
    platform running from the data directory (not when ``--broker`` names another one)."""
    if args.quota_url:
        return Api("quota", args.quota_url.rstrip("/"))
    url = None if args.broker else running_service_url(args, "quota")
    return None if url is None else Api("quota", url)


# --- the template ---------------------------------------------------------------------------

INSTRUCTIONS = (
    "人员入编导入模板（bianzhi import people）",
    "每行一人；第一行为列名，请勿修改。红色列名为必填列（见下表「必填」）。",
    "编制类型、领导职数、进入方式、性别请从下拉列表中选择；也可填写英文代码。",
    "公民身份号码、联系电话请以文本填写（模板已设为文本格式），否则 Excel 会丢失末几位。",
    "日期写作 2026-03-01（也可 2026/3/1、2026年3月1日）。",
    "导入前先校核：bianzhi import people 文件 --dry-run，按报告（行、列、问题）修改后再导入。",
    "导入结果写在同目录的「文件名.result.xlsx」中；重新导入同一文件不会重复入编。",
)


def write_template(path: Path) -> None:
    """The import template: .xlsx with instructions and drop-downs, or a .csv header row."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open("w", encoding="utf-8-sig", newline="") as out:
            csv.writer(out).writerow([c.header for c in COLUMNS])
        return
    if suffix != ".xlsx":
        raise CliError(f"--out {path}: expected a file name ending in .xlsx or .csv")
    from openpyxl import Workbook
    from openpyxl.styles import Alignment, Font, PatternFill
    from openpyxl.utils import get_column_letter
    from openpyxl.worksheet.datavalidation import DataValidation

    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = DATA_SHEET
    sheet.append([c.header for c in COLUMNS])
    required_fill = PatternFill("solid", fgColor="FDE9D9")
    for index, column in enumerate(COLUMNS, start=1):
        letter = get_column_letter(index)
        cell = sheet.cell(row=1, column=index)
        cell.font = Font(bold=True, color="C00000" if column.required else "000000")
        if column.required:
            cell.fill = required_fill
        cell.alignment = Alignment(horizontal="center")
        sheet.column_dimensions[letter].width = column.width
        cells = f"{letter}2:{letter}{TEMPLATE_ROWS + 1}"
        if column.labels:
            listed = ",".join(column.labels.values())
            validation = DataValidation(
                type="list",
                formula1=f'"{listed}"',
                allow_blank=True,
                showErrorMessage=True,
                errorTitle=column.header,
                error=f"请从下拉列表中选择：{listed.replace(',', '、')}",
            )
            validation.add(cells)
            sheet.add_data_validation(validation)
        if column.header in TEXT_FORMAT_HEADERS or column.kind == "date":
            # A column style: Excel formats what is typed there, and no empty rows are written.
            fmt = "yyyy-mm-dd" if column.kind == "date" else "@"
            sheet.column_dimensions[letter].number_format = fmt
    sheet.freeze_panes = "A2"

    notes = book.create_sheet(HELP_SHEET)
    for line in INSTRUCTIONS:
        notes.append([line])
    notes["A1"].font = Font(bold=True, size=14)
    notes.append([])
    notes.append(["列名", "必填", "说明", "可选值"])
    header_row = notes.max_row
    for cell in notes[header_row]:
        cell.font = Font(bold=True)
    for column in COLUMNS:
        choices = "、".join(column.labels.values()) if column.labels else ""
        notes.append([column.header, "必填" if column.required else "", column.note, choices])
    for letter, width in zip("ABCD", (16, 8, 40, 48), strict=True):
        notes.column_dimensions[letter].width = width
    try:
        book.save(path)
    except OSError as exc:
        raise CliError(f"--out {path}: cannot write the template ({exc})") from None


# --- results --------------------------------------------------------------------------------


def result_path(path: Path) -> Path:
    """``FILE.xlsx`` → ``FILE.result.xlsx`` beside it."""
    return path.with_name(f"{path.stem}.result{path.suffix.lower()}")


def result_cells(item: CheckedRow, outcome: Outcome | None) -> tuple[str, str, str, str]:
    """结果, 原因代码, 说明 and person_id of one row."""
    if item.problems:
        text = "；".join(f"{p.column}：{p.message}" for p in item.problems)
        return "失败", item.problems[0].code, text, ""
    if outcome is None or outcome.status is Status.NOT_SENT:
        return "未发送", Status.NOT_SENT.value, "导入中止，未发送；可重新导入同一文件", ""
    if outcome.status is Status.COMPLETED:
        return "成功", "", "", _uuid_or_blank(outcome.subject)
    if outcome.status is Status.REJECTED:
        return "失败", outcome.code or "", outcome.message or "", ""
    return (
        "未确认",
        Status.NO_RESULT.value,
        "未在时限内收到处理结果；可重新导入同一文件查询（不会重复入编）",
        "",
    )


def _uuid_or_blank(value: str | None) -> str:
    """The person_id of a completed enrolment (the result's subject); never anything else."""
    try:
        return str(uuid.UUID(value)) if value else ""
    except ValueError:
        return ""


def write_results(
    path: Path, sheet: Sheet, checked: Sequence[CheckedRow], report: BatchReport | None
) -> Path:
    """The input rows with their results, beside the input, in the input's format."""
    out = result_path(path)
    columns = [h for h in sheet.headers if h not in RESULT_HEADERS]
    headers = [*columns, *RESULT_HEADERS]
    rows: list[list[str]] = []
    for item in checked:
        outcome = None
        if report is not None and item.command_id is not None:
            outcome = report.outcomes.get(item.command_id)
        values = [_text(item.row.cells.get(h)) or "" for h in columns]
        rows.append([*values, *result_cells(item, outcome)])
    try:
        if out.suffix == ".csv":
            with out.open("w", encoding="utf-8-sig", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(headers)
                writer.writerows(rows)
        else:
            _write_results_xlsx(out, headers, rows)
    except OSError as exc:
        raise CliError(f"{out}: cannot write the result file ({exc})") from None
    return out


def _write_results_xlsx(out: Path, headers: list[str], rows: list[list[str]]) -> None:
    from openpyxl import Workbook
    from openpyxl.styles import Font, PatternFill

    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = RESULT_SHEET
    sheet.append(headers)
    for cell in sheet[1]:
        cell.font = Font(bold=True)
    failed = PatternFill("solid", fgColor="FDE9D9")
    status_column = headers.index("结果")
    for values in rows:
        sheet.append(values)
        if values[status_column] != "成功":
            for cell in sheet[sheet.max_row]:
                cell.fill = failed
    for cell in sheet[1]:
        cell.number_format = "@"
    sheet.freeze_panes = "A2"
    book.save(out)


# --- the command ----------------------------------------------------------------------------


def register(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "import",
        help="import people from a spreadsheet (template, check, enrol)",
        description="Bulk import of people (入编) from .xlsx or .csv files.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    template = actions.add_parser(
        "template",
        help="write the import template",
        description="Write the template: Chinese headers, instructions, drop-down lists.",
    )
    template.add_argument(
        "--out",
        type=Path,
        default=Path("人员导入模板.xlsx"),
        metavar="FILE",
        help="an .xlsx (with instructions and drop-downs) or .csv file (default 人员导入模板.xlsx)",
    )
    template.add_argument("--force", action="store_true", help="overwrite an existing file")
    template.set_defaults(run=run_template)

    people = actions.add_parser(
        "people",
        help="check a file's rows and enrol the people",
        description=(
            "Check every row (the 导入校核 report: row, column, problem) and the quota-use "
            "notices the rows use against quota's books (warnings only: the rows are still "
            "sent), then send the valid rows as roster.EnrolPerson and write "
            "FILE.result.xlsx/.csv beside the input. "
            "Importing the same file again enrols nobody twice. Exit status: 0 all rows "
            "passed (and, unless --dry-run, every person enrolled), 1 some row failed, "
            "2 error, 3 some rows without result in time."
        ),
    )
    people.add_argument("file", type=Path, metavar="FILE", help="an .xlsx or .csv file")
    people.add_argument(
        "--dry-run", action="store_true", help="check the rows and print the report only"
    )
    people.add_argument("--actor", metavar="ID", help="the acting user (actorid)")
    people.add_argument(
        "--region", metavar="CODE", help="the actor's office region, a GB/T 2260 code"
    )
    people.add_argument("--roles", metavar="ROLES", help="the actor's roles, e.g. clerk")
    add_broker_options(people)
    people.add_argument(
        "--in-flight",
        type=positive_int,
        default=DEFAULT_IN_FLIGHT,
        metavar="N",
        help=f"commands awaiting their result at once (default {DEFAULT_IN_FLIGHT})",
    )
    people.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_STALL_TIMEOUT_S,
        metavar="S",
        help="stop waiting when no result at all arrives for S seconds "
        f"(default {DEFAULT_STALL_TIMEOUT_S:g})",
    )
    people.add_argument(
        "--quota-url",
        metavar="URL",
        help="the quota query API the notices are checked against (default: that of the "
        "platform running from --data-dir)",
    )
    people.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    people.set_defaults(run=run_people)


def run_template(args: argparse.Namespace) -> int:
    path: Path = args.out
    if path.exists() and not args.force:
        raise CliError(f"--out {path}: the file exists; --force overwrites it")
    write_template(path)
    say(f"template written to {path}")
    return EXIT_OK


def run_people(args: argparse.Namespace) -> int:
    path: Path = args.file
    if not path.is_file():
        raise CliError(f"FILE {path}: no such file")
    sheet = read_sheet(path)
    if not sheet.rows:
        raise CliError(f"{path}: no data rows below the header row")
    checked = check_rows(sheet.rows)
    notice_lines, notices = notice_report(checked, quota_api(args))
    print("\n".join(report_lines(path, sheet, checked) + notice_lines), flush=True)
    valid = [c for c in checked if c.command is not None]
    if args.dry_run:
        return EXIT_PROBLEMS if len(valid) < len(checked) else EXIT_OK
    later = waiting_rows(checked, notices)
    waves: tuple[list[Outgoing], list[Outgoing]] = ([], [])
    for item in valid:
        if item.command is None:
            continue
        envelope = build_envelope(
            EnrolPerson,
            item.command.model_dump(mode="json", exclude_none=True),
            command_id=row_command_id(item.command),
            source=SOURCE,
            actor=args.actor,
            region=args.region,
            roles=args.roles,
        )
        waves[1 if item.row.number in later else 0].append(Outgoing(envelope, ROSTER_COMMANDS))
    report = None
    if valid:
        settings = broker_settings(args)
        platform = None if args.broker else read_platform(settings.data_dir)
        if platform is not None and "roster" not in platform.services:
            raise CliError(
                "the roster service is not running in this platform (running: "
                f"{', '.join(platform.services) or 'none'}); nothing was sent"
            )
        report = asyncio.run(
            send_in_waves(
                waves,
                settings,
                label="import",
                max_in_flight=args.in_flight,
                stall_timeout_s=args.timeout,
                progress=not args.no_progress,
            )
        )
        say(report.summary())
    out = write_results(path, sheet, checked, report)
    say(f"results written to {out}")
    if report is not None and not report.complete:
        return EXIT_INCOMPLETE
    if len(valid) < len(checked) or (report is not None and report.count(Status.REJECTED)):
        return EXIT_PROBLEMS
    return EXIT_OK
