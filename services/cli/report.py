"""`bianzhi report`: the establishment statistics an office reads (编制统计), from the query APIs.

``report establishment`` prints the establishment of a division and the divisions below it
(核定数、实有数、预留数、空编数、控制数、余量) per category; ``report export`` writes the annual
statistics tables (机构编制统计 表1–3) to an ``.xlsx`` workbook; ``report notices`` lists an
org's quota-use notices (用编通知单) with the places left on each. All only read: orgs and quota
over HTTP (WIRE-CONTRACT §6), at the URLs of the platform running from ``--data-dir`` or the
defaults of `bianzhi up` (orgs on 8080, quota on 8081).
"""

from __future__ import annotations

import argparse
import json
import unicodedata
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from contracts import identifiers
from contracts.codes import Category, OrgKind, OrgStatus
from services.cli.common import CliError, add_data_dir_option, load_settings, read_platform

DEFAULT_ORGS_URL = "http://127.0.0.1:8080"
DEFAULT_QUOTA_URL = "http://127.0.0.1:8081"
PAGE = 500
TIMEOUT_S = 30.0

CATEGORY_NAMES: dict[str, str] = {
    Category.ADMIN.value: "行政编制",
    Category.POLITICAL_LEGAL.value: "政法专项编制",
    Category.INSTITUTIONAL.value: "事业编制",
    Category.INSTITUTIONAL_CSR.value: "参公事业编制",
    Category.SUPPORT.value: "工勤编制",
}
KIND_NAMES: dict[str, str] = {
    OrgKind.ORGAN.value: "机关",
    OrgKind.PUBLIC_INSTITUTION.value: "事业单位",
    OrgKind.MASS_ORG.value: "群团",
    OrgKind.ENTERPRISE.value: "企业",
}
STATUS_NAMES: dict[str, str] = {
    OrgStatus.ACTIVE.value: "存续",
    OrgStatus.MERGED.value: "已合并",
    OrgStatus.ABOLISHED.value: "已撤销",
}
ESTABLISHMENT_HEADERS = (
    "区划代码",
    "区划名称",
    "编制类别",
    "核定数",
    "实有数",
    "预留数",
    "空编数",
    "控制数",
    "余量",
)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "report",
        help="establishment statistics of a division (table, JSON or .xlsx)",
        description="Read the establishment statistics of a division from the query APIs.",
    )
    reports = parser.add_subparsers(dest="report", metavar="REPORT", required=True)

    table = reports.add_parser(
        "establishment",
        help="approved, occupied, reserved and vacant places of a division and those below it",
        description=(
            "Print, per division and category, the approved (核定), occupied (实有), reserved "
            "(预留) and vacant (空编) places, the region limit (控制数) and what is left under it "
            "(余量): the division itself, then the divisions below it down to --depth levels."
        ),
    )
    _division_options(table)
    table.add_argument(
        "--as-of",
        type=_iso_date,
        metavar="DATE",
        help="the counts in effect on this day (YYYY-MM-DD), from the ledger history",
    )
    table.add_argument(
        "--depth",
        type=int,
        default=1,
        choices=(0, 1, 2),
        help="levels of divisions below --division to list (default 1)",
    )
    table.add_argument("--format", choices=("table", "json"), default="table")
    table.set_defaults(run=run_establishment)

    export = reports.add_parser(
        "export",
        help="the annual statistics tables (机构编制统计 表1–3) as .xlsx",
        description=(
            "Write 表1 (org information), 表2 (internal units, approved quota and leader posts "
            "against those held) and 表3 (summary per division and category) of every org in "
            "the division and below it to an .xlsx workbook."
        ),
    )
    _division_options(export)
    export.add_argument(
        "--orgs-url",
        metavar="URL",
        help=f"the orgs query API (default: the running platform's, else {DEFAULT_ORGS_URL})",
    )
    export.add_argument("--out", type=Path, required=True, metavar="FILE.xlsx")
    export.set_defaults(run=run_export)

    listing = reports.add_parser(
        "notices",
        help="the quota-use notices (用编通知单) of an org, with the places left on each",
        description=(
            "List an org's quota-use notices (用编通知单): number, category, places, used, "
            "left, valid until and status, those that lapse first first. What a clerk needs "
            "to fill in the 用编通知单号 of an enrolment or an import file."
        ),
    )
    listing.add_argument("--org", required=True, type=_org_id, metavar="ORG_ID")
    listing.add_argument(
        "--category", choices=tuple(CATEGORY_NAMES), help="only notices of this category"
    )
    listing.add_argument(
        "--usable",
        action="store_true",
        help="only the notices an enrolment could use today (issued, not lapsed, places left)",
    )
    listing.add_argument(
        "--quota-url",
        metavar="URL",
        help=f"the quota query API (default: the running platform's, else {DEFAULT_QUOTA_URL})",
    )
    listing.add_argument("--format", choices=("table", "json"), default="table")
    add_data_dir_option(listing)
    listing.set_defaults(run=run_notices)


def _division_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--division",
        required=True,
        metavar="CODE",
        type=_division_code,
        help="a GB/T 2260 division code: 130000 for the province, 130100 for a city",
    )
    parser.add_argument(
        "--quota-url",
        metavar="URL",
        help=f"the quota query API (default: the running platform's, else {DEFAULT_QUOTA_URL})",
    )
    add_data_dir_option(parser)


def _division_code(text: str) -> str:
    if identifiers.division(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a known GB/T 2260 division code")
    return text


def _org_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an org id (a UUID), got {text!r}") from None


def _iso_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def service_url(args: argparse.Namespace, service: str, given: str | None, default: str) -> str:
    """``given``, else the URL of the platform running from ``--data-dir``, else ``default``."""
    if given:
        return given.rstrip("/")
    return running_service_url(args, service) or default


def running_service_url(args: argparse.Namespace, service: str) -> str | None:
    """The query API URL of ``service`` in the platform running from ``--data-dir``, if any."""
    platform = read_platform(load_settings(data_dir=args.data_dir).data_dir)
    if platform is not None and service in platform.services:
        return platform.services[service].rstrip("/")
    return None


# --- reading the query APIs ---------------------------------------------------------------


class Api:
    """A query API over HTTP; every failure is a one-line `CliError`."""

    def __init__(self, name: str, base_url: str, client: httpx.Client | None = None) -> None:
        self.name = name
        self.base_url = base_url
        self.client = client or httpx.Client(base_url=base_url, timeout=TIMEOUT_S)

    def get(self, path: str, *, missing_ok: bool = False, **params: Any) -> Any:
        """The JSON answer of ``GET path``; ``None`` for a 404 when ``missing_ok``."""
        query = {k: v for k, v in params.items() if v is not None}
        try:
            response = self.client.get(path, params=query)
        except httpx.HTTPError as exc:
            raise CliError(
                f"cannot reach the {self.name} query API at {self.base_url} ({exc}); is the "
                f"platform running? (see --{self.name}-url)"
            ) from None
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code != 200:
            try:
                body = response.json()
                reason = f"{body.get('error')}: {body.get('message')}"
            except ValueError:
                reason = response.text[:200]
            raise CliError(f"{self.name} {path} answered {response.status_code} ({reason})")
        return response.json()


def subtree(code: str, depth: int) -> list[tuple[int, str]]:
    """``code`` and the current divisions below it down to ``depth`` levels, each with its
    level below ``code``, in code order (a parent before its children)."""
    rows = [(0, code)]
    if depth == 0:
        return rows
    for child in _children(code):
        rows.append((1, child))
        if depth > 1:
            rows.extend((2, grandchild) for grandchild in _children(child))
    return rows


def _children(code: str) -> list[str]:
    """Current divisions whose parent is ``code`` (GB/T 2260 data of ``contracts``)."""
    prefix = identifiers.division_prefix(code)
    if len(prefix) == 6:
        return []
    width = 6 - len(prefix)
    found = []
    for n in range(10**width):
        candidate = f"{prefix}{n:0{width}d}"
        division = identifiers.division(candidate)
        if division is not None and division.current and division.parent == code:
            found.append(candidate)
    return found


def establishment_rows(
    quota: Api, code: str, depth: int, as_of: date | None
) -> list[dict[str, Any]]:
    """One row per division and category with counts (divisions without any are left out,
    except ``code`` itself)."""
    rows: list[dict[str, Any]] = []
    for level, division_code in subtree(code, depth):
        body = quota.get(
            f"/divisions/{division_code}/establishment",
            as_of=as_of.isoformat() if as_of else None,
        )
        categories = body["categories"]
        if not categories and level > 0:
            continue
        for cat in categories or [_empty_category()]:
            rows.append(
                {
                    "level": level,
                    "division_code": division_code,
                    "division_name": body.get("division_name") or "",
                    "category": cat["category"],
                    "approved": cat["approved"],
                    "occupied": cat["occupied"],
                    "reserved": cat["reserved"],
                    "vacant": cat["vacant"],
                    "limit": cat["limit"],
                    "left": cat["headroom"],
                }
            )
    return rows


def _empty_category() -> dict[str, Any]:
    return {
        "category": None,
        "approved": 0,
        "occupied": 0,
        "reserved": 0,
        "vacant": 0,
        "limit": None,
        "headroom": None,
    }


# --- report establishment -------------------------------------------------------------------


def run_establishment(args: argparse.Namespace) -> int:
    url = service_url(args, "quota", args.quota_url, DEFAULT_QUOTA_URL)
    quota = Api("quota", url)
    rows = establishment_rows(quota, args.division, args.depth, args.as_of)
    if args.format == "json":
        print(
            json.dumps(
                {
                    "division_code": args.division,
                    "as_of": args.as_of.isoformat() if args.as_of else None,
                    "rows": rows,
                },
                ensure_ascii=False,
                indent=2,
            )
        )
    else:
        print(render_establishment(args.division, args.as_of, rows))
    return 0


def render_establishment(code: str, as_of: date | None, rows: Sequence[dict[str, Any]]) -> str:
    """The table as an office prints it: a title line, Chinese headers, aligned columns."""
    division = identifiers.division(code)
    title = f"{division.name if division else code}（{code}）机构编制情况"
    title += f"  截至 {as_of.isoformat()}" if as_of else "  当前"
    body = [
        (
            r["division_code"],
            "  " * r["level"] + r["division_name"],
            CATEGORY_NAMES.get(r["category"], "—") if r["category"] else "—",
            r["approved"],
            r["occupied"],
            r["reserved"],
            r["vacant"],
            "—" if r["limit"] is None else r["limit"],
            "—" if r["left"] is None else r["left"],
        )
        for r in rows
    ]
    return "\n".join([title, *format_table(ESTABLISHMENT_HEADERS, body)])


def display_width(text: str) -> int:
    """Columns ``text`` takes in a terminal: East Asian wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Iterator[str]:
    """Aligned lines: text to the left, numbers to the right."""
    cells = [[str(h) for h in headers], *[[str(v) for v in row] for row in rows]]
    numeric = [
        all(isinstance(row[i], int) or row[i] == "—" for row in rows) and bool(rows)
        for i in range(len(headers))
    ]
    widths = [max(display_width(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        parts = []
        for i, text in enumerate(row):
            pad = " " * (widths[i] - display_width(text))
            parts.append(pad + text if numeric[i] and n > 0 else text + pad)
        yield "  ".join(parts).rstrip()
        if n == 0:
            yield "  ".join("-" * w for w in widths)


# --- report notices (用编通知单) --------------------------------------------------------------

NOTICE_HEADERS = ("用编通知单号", "编制类别", "名额", "已用", "剩余", "有效期至", "状态")
NOTICE_STATUS_NAMES = {"issued": "有效", "cancelled": "已作废", "expired": "已过期"}


def org_notices(
    quota: Api,
    org_id: str,
    *,
    category: str | None = None,
    usable: bool = False,
    missing_ok: bool = False,
) -> tuple[str | None, list[dict[str, Any]]] | None:
    """The org's name (as quota knows it) and its notices, every page of
    ``GET /orgs/{org_id}/notices``; ``None`` for an org quota does not know when
    ``missing_ok``."""
    found: list[dict[str, Any]] = []
    name: str | None = None
    while True:
        page = quota.get(
            f"/orgs/{org_id}/notices",
            missing_ok=missing_ok,
            category=category,
            usable="true" if usable else None,
            limit=1000,
            offset=len(found),
        )
        if page is None:
            return None
        name = page.get("name")
        found.extend(page["notices"])
        if not page["notices"] or len(found) >= page["total"]:
            return name, found


def notice_status_name(notice: dict[str, Any]) -> str:
    """The status as an office says it; an issued notice with no place left is 已用完."""
    if notice["status"] == "issued" and notice["remaining"] == 0:
        return "已用完"
    return NOTICE_STATUS_NAMES.get(notice["status"], notice["status"])


def run_notices(args: argparse.Namespace) -> int:
    quota = Api("quota", service_url(args, "quota", args.quota_url, DEFAULT_QUOTA_URL))
    listed = org_notices(quota, args.org, category=args.category, usable=args.usable)
    assert listed is not None  # not missing_ok: an unknown org is a CliError
    name, notices = listed
    if args.format == "json":
        body = {"org_id": args.org, "name": name, "notices": notices}
        print(json.dumps(body, ensure_ascii=False, indent=2))
        return 0
    print(render_notices(args.org, name, notices, usable=args.usable))
    return 0


def render_notices(
    org_id: str, name: str | None, notices: Sequence[dict[str, Any]], *, usable: bool
) -> str:
    title = f"{name or '单位'}（{org_id}）的{'可用' if usable else ''}用编通知单"
    if not notices:
        return f"{title}：无"
    body = [
        (
            n["notice_no"],
            CATEGORY_NAMES.get(n["category"], n["category"]),
            n["count"],
            n["used"],
            n["remaining"],
            n["valid_until"],
            notice_status_name(n),
        )
        for n in notices
    ]
    left = sum(n["remaining"] for n in notices)
    return "\n".join(
        [f"{title}：{len(notices)} 张，剩余名额 {left} 个", *format_table(NOTICE_HEADERS, body)]
    )


# --- report export (机构编制统计 表1–3) --------------------------------------------------------


@dataclass(frozen=True)
class OrgStats:
    """One org as the statistics tables need it: from orgs (name, kind, units) and quota."""

    org: dict[str, Any]
    establishment: dict[str, Any] | None


def collect_orgs(orgs_api: Api, quota: Api, code: str) -> list[OrgStats]:
    """Every org in the division and below it, with its units and its establishment."""
    found: list[OrgStats] = []
    offset = 0
    while True:
        page = orgs_api.get(
            "/orgs", division_code=code, include_sub="true", limit=PAGE, offset=offset
        )
        for summary in page["items"]:
            org = orgs_api.get(f"/orgs/{quote(summary['org_id'])}")
            # None: quota has not seen the org yet (nothing approved to report)
            est = quota.get(f"/orgs/{quote(summary['org_id'])}/establishment", missing_ok=True)
            found.append(OrgStats(org, est))
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return found


def table1(orgs: Sequence[OrgStats]) -> tuple[tuple[str, ...], list[list[Any]]]:
    """表1 机构基本情况."""
    headers = (
        "序号",
        "机构名称",
        "机构类别",
        "区划代码",
        "区划名称",
        "统一社会信用代码",
        "机构规格",
        "经费形式",
        "内设机构数",
        "状态",
    )
    rows = []
    for n, stats in enumerate(orgs, 1):
        org = stats.org
        rows.append(
            [
                n,
                org["name"],
                KIND_NAMES.get(org["kind"], org["kind"]),
                org["division_code"],
                org.get("division_name") or "",
                org.get("uscc") or "",
                org.get("grade") or "",
                org.get("funding") or "",
                len(org.get("units") or []),
                STATUS_NAMES.get(org["status"], org["status"]),
            ]
        )
    return headers, rows


def table2(orgs: Sequence[OrgStats]) -> tuple[tuple[str, ...], list[list[Any]]]:
    """表2 内设机构、编制和领导职数: per org one row per category (编制 核定/实有), and one row
    per internal unit with leader posts (领导职数 核定/实配)."""
    headers = (
        "机构名称",
        "内设机构",
        "编制类别",
        "核定编制",
        "实有人数",
        "预留数",
        "空编数",
        "正职职数",
        "正职实配",
        "副职职数",
        "副职实配",
    )
    rows: list[list[Any]] = []
    for stats in orgs:
        org = stats.org
        units = {u["unit_id"]: u["name"] for u in org.get("units") or []}
        est = stats.establishment or {"categories": [], "leader_posts": []}
        posts = {p["unit_id"]: p for p in est["leader_posts"]}
        own = posts.pop(None, None)
        own_posts = _posts(own)
        for i, cat in enumerate(est["categories"] or [None]):
            counts = (
                [
                    CATEGORY_NAMES.get(cat["category"], cat["category"]),
                    cat["approved"],
                    cat["occupied"],
                    cat["reserved"],
                    cat["vacant"],
                ]
                if cat
                else ["", 0, 0, 0, 0]
            )
            rows.append([org["name"], "（本级）", *counts, *(own_posts if i == 0 else [""] * 4)])
        for unit_id, name in units.items():
            rows.append([org["name"], name, "", "", "", "", "", *_posts(posts.pop(unit_id, None))])
        for unit_id, post in posts.items():  # posts of a unit orgs no longer lists
            rows.append([org["name"], unit_id, "", "", "", "", "", *_posts(post)])
    return headers, rows


def _posts(post: dict[str, Any] | None) -> list[int]:
    if post is None:
        return [0, 0, 0, 0]
    return [post["principal"], post["principal_held"], post["deputy"], post["deputy_held"]]


def table3(quota: Api, code: str) -> tuple[tuple[str, ...], list[list[Any]]]:
    """表3 机构编制汇总: per division (itself and those below it) and category."""
    headers = ("区划代码", "区划名称", "编制类别", "机构数", *ESTABLISHMENT_HEADERS[3:])
    rows: list[list[Any]] = []
    for level, division_code in subtree(code, 1):
        body = quota.get(f"/divisions/{division_code}/establishment")
        if not body["categories"] and level > 0:
            continue
        for cat in body["categories"]:
            rows.append(
                [
                    division_code,
                    body.get("division_name") or "",
                    CATEGORY_NAMES.get(cat["category"], cat["category"]),
                    cat["orgs"],
                    cat["approved"],
                    cat["occupied"],
                    cat["reserved"],
                    cat["vacant"],
                    cat["limit"] if cat["limit"] is not None else "",
                    cat["headroom"] if cat["headroom"] is not None else "",
                ]
            )
    return headers, rows


def write_workbook(path: Path, code: str, orgs_api: Api, quota: Api) -> dict[str, int]:
    """Write 表1–3 to ``path``; the number of data rows of each sheet."""
    from openpyxl import Workbook
    from openpyxl.styles import Font

    orgs = collect_orgs(orgs_api, quota, code)
    division = identifiers.division(code)
    place = division.name if division else code
    sheets = {
        "表1 机构基本情况": table1(orgs),
        "表2 内设机构编制和领导职数": table2(orgs),
        "表3 机构编制汇总": table3(quota, code),
    }
    book = Workbook()
    book.remove(book.active)  # type: ignore[arg-type]
    written = {}
    for title, (headers, rows) in sheets.items():
        sheet = book.create_sheet(title)
        sheet.append([f"{place}（{code}）{title}"])
        sheet["A1"].font = Font(bold=True)
        sheet.append(list(headers))
        for cell in sheet[2]:
            cell.font = Font(bold=True)
        for row in rows:
            sheet.append([None if value == "" else value for value in row])
        for i, header in enumerate(headers):
            width = max([display_width(str(header)), *(display_width(str(r[i])) for r in rows)])
            sheet.column_dimensions[sheet.cell(row=2, column=i + 1).column_letter].width = width + 2
        sheet.freeze_panes = "A3"
        written[title] = len(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        book.save(path)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    return written


def run_export(args: argparse.Namespace) -> int:
    if args.out.suffix.lower() != ".xlsx":
        raise CliError(f"--out {args.out}: the workbook must be a .xlsx file")
    orgs_api = Api("orgs", service_url(args, "orgs", args.orgs_url, DEFAULT_ORGS_URL))
    quota = Api("quota", service_url(args, "quota", args.quota_url, DEFAULT_QUOTA_URL))
    written = write_workbook(args.out, args.division, orgs_api, quota)
    counts = ", ".join(f"{title}: {n} rows" for title, n in written.items())
    print(f"wrote {args.out} ({counts})")
    return 0
