"""The demo data of `bianzhi demo`: a realistic province as commands, generated without I/O.

`build_plan` lays out, for a division (Hebei, 130000, by default) and everything below it from
the bundled GB/T 2260 data: organs and public institutions at each level (with valid USCCs),
region limits (编制总量控制数), approved quota (核定编制), leader posts (领导职数),
quota-use notices (用编通知单) and synthetic people: valid citizen IDs (an address code inside
the org's division, a real birth date, the GB 11643 check character) and common Chinese names.
Everything adds up: quota covers the people of each org and category, notices cover exactly
the people enrolled on them, limits cover the quota approved inside each division, leader
posts cover the leaders.

The same seed, scope and day give the same plan, and `stages` gives every command a
deterministic id, so running the demo twice has no second effect.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import cache
from importlib import resources

from contracts import identifiers
from contracts.base import Command
from contracts.codes import (
    INSTITUTIONAL_CATEGORIES,
    Category,
    EntryMethod,
    Funding,
    LeaderPost,
    OrgKind,
)
from contracts.common import Document
from contracts.envelope import Envelope
from contracts.orgs import RegisterOrg
from contracts.quota import ApproveQuota, IssueQuotaUseNotice, SetLeaderPosts, SetRegionLimit
from contracts.roster import EnrolPerson
from services.cli.batch import command_id

HEBEI = "130000"
DEFAULT_PEOPLE = 20_000
NOTICE_MAX = 30  # places per quota-use notice: a recruitment batch
ENTRY_AGE = 22
RETIREMENT_AGE = 59

# --- the org catalogue ------------------------------------------------------------------------


@dataclass(frozen=True)
class OrgSpec:
    """One kind of org found at every level: names per level (province, city, county), what it
    may hold and how many people it has relative to the others (``weights`` per category)."""

    key: str
    names: tuple[str, str, str]
    kind: OrgKind
    weights: tuple[tuple[Category, int], ...]
    titles: tuple[str, str]  # principal, deputy leader titles
    positions: tuple[str, ...]
    functions: tuple[str, ...] = ()
    parent: str | None = None
    funding: Funding | None = None


_STAFF = ("科员", "四级主任科员", "三级主任科员", "二级主任科员", "一级主任科员")

CATALOGUE: tuple[OrgSpec, ...] = (
    OrgSpec(
        "office",
        ("人民政府办公厅", "人民政府办公室", "人民政府办公室"),
        OrgKind.ORGAN,
        ((Category.ADMIN, 30), (Category.SUPPORT, 6)),
        ("主任", "副主任"),
        (*_STAFF, "司机"),
        ("负责政府日常运转和政务协调", "督促检查政府决定事项的落实"),
    ),
    OrgSpec(
        "development",
        ("发展和改革委员会", "发展和改革委员会", "发展和改革局"),
        OrgKind.ORGAN,
        ((Category.ADMIN, 28),),
        ("主任", "副主任"),
        _STAFF,
        ("拟订国民经济和社会发展规划", "推进经济体制改革"),
    ),
    OrgSpec(
        "education",
        ("教育厅", "教育局", "教育局"),
        OrgKind.ORGAN,
        ((Category.ADMIN, 24),),
        ("局长", "副局长"),
        _STAFF,
        ("统筹管理本行政区域教育事业",),
    ),
    OrgSpec(
        "finance",
        ("财政厅", "财政局", "财政局"),
        OrgKind.ORGAN,
        ((Category.ADMIN, 30),),
        ("局长", "副局长"),
        _STAFF,
        ("编制年度预算草案并组织执行", "管理财政收支"),
    ),
    OrgSpec(
        "hrss",
        ("人力资源和社会保障厅", "人力资源和社会保障局", "人力资源和社会保障局"),
        OrgKind.ORGAN,
        ((Category.ADMIN, 26),),
        ("局长", "副局长"),
        _STAFF,
        ("统筹建立覆盖城乡的社会保障体系", "促进就业创业"),
    ),
    OrgSpec(
        "police",
        ("公安厅", "公安局", "公安局"),
        OrgKind.ORGAN,
        ((Category.POLITICAL_LEGAL, 120), (Category.SUPPORT, 8)),
        ("局长", "副局长"),
        ("一级警员", "二级警员", "三级警长", "四级警长", "一级警长"),
        ("维护社会治安秩序", "预防、制止和侦查违法犯罪活动"),
    ),
    OrgSpec(
        "justice",
        ("司法厅", "司法局", "司法局"),
        OrgKind.ORGAN,
        ((Category.POLITICAL_LEGAL, 20),),
        ("局长", "副局长"),
        _STAFF,
        ("推进法治政府建设", "指导人民调解和法律援助工作"),
    ),
    OrgSpec(
        "civil",
        ("民政厅", "民政局", "民政局"),
        OrgKind.ORGAN,
        ((Category.ADMIN, 18),),
        ("局长", "副局长"),
        _STAFF,
        ("负责社会救助和养老服务管理",),
    ),
    OrgSpec(
        "health",
        ("卫生健康委员会", "卫生健康委员会", "卫生健康局"),
        OrgKind.ORGAN,
        ((Category.ADMIN, 22),),
        ("主任", "副主任"),
        _STAFF,
        ("组织拟订卫生健康政策", "统筹医疗卫生资源配置"),
    ),
    OrgSpec(
        "market",
        ("市场监督管理局", "市场监督管理局", "市场监督管理局"),
        OrgKind.ORGAN,
        ((Category.ADMIN, 40),),
        ("局长", "副局长"),
        _STAFF,
        ("负责市场综合监督管理", "负责食品安全监督管理"),
    ),
    OrgSpec(
        "school",
        ("实验中学", "第一中学", "第一中学"),
        OrgKind.PUBLIC_INSTITUTION,
        ((Category.INSTITUTIONAL, 110), (Category.SUPPORT, 4)),
        ("校长", "副校长"),
        ("语文教师", "数学教师", "英语教师", "物理教师", "化学教师", "历史教师", "体育教师"),
        parent="education",
        funding=Funding.FULL,
    ),
    OrgSpec(
        "hospital",
        ("人民医院", "人民医院", "人民医院"),
        OrgKind.PUBLIC_INSTITUTION,
        ((Category.INSTITUTIONAL, 160),),
        ("院长", "副院长"),
        ("住院医师", "主治医师", "副主任医师", "护师", "主管护师", "药师", "检验技师"),
        parent="health",
        funding=Funding.PARTIAL,
    ),
    OrgSpec(
        "cdc",
        ("疾病预防控制中心", "疾病预防控制中心", "疾病预防控制中心"),
        OrgKind.PUBLIC_INSTITUTION,
        ((Category.INSTITUTIONAL, 30),),
        ("主任", "副主任"),
        ("医师", "主管医师", "检验技师", "公共卫生医师"),
        parent="health",
        funding=Funding.FULL,
    ),
    OrgSpec(
        "social_insurance",
        ("社会保险事业服务中心", "社会保险事业服务中心", "社会保险事业服务中心"),
        OrgKind.PUBLIC_INSTITUTION,
        ((Category.INSTITUTIONAL_CSR, 20),),
        ("主任", "副主任"),
        ("科员", "四级主任科员", "三级主任科员"),
        parent="hrss",
        funding=Funding.FULL,
    ),
    OrgSpec(
        "library",
        ("图书馆", "图书馆", "图书馆"),
        OrgKind.PUBLIC_INSTITUTION,
        ((Category.INSTITUTIONAL, 10),),
        ("馆长", "副馆长"),
        ("馆员", "助理馆员", "副研究馆员"),
        funding=Funding.FULL,
    ),
)

LEVEL_FACTOR = {1: 4, 2: 2, 3: 1}  # a province's bureau is bigger than a county's
GRADES = {1: "正厅级", 2: "正处级", 3: "正科级"}
DEPUTIES = {1: 4, 2: 3, 3: 2}

# --- people -------------------------------------------------------------------------------------

SURNAMES: tuple[tuple[str, int], ...] = (
    ("王", 75), ("李", 74), ("张", 70), ("刘", 55), ("陈", 45), ("杨", 31), ("赵", 28),
    ("黄", 24), ("周", 22), ("吴", 21), ("徐", 17), ("孙", 16), ("胡", 13), ("朱", 13),
    ("高", 13), ("林", 12), ("何", 12), ("郭", 12), ("马", 12), ("罗", 9), ("梁", 9),
    ("宋", 8), ("郑", 8), ("谢", 7), ("韩", 7), ("唐", 7), ("冯", 7), ("于", 7), ("董", 7),
    ("萧", 5), ("程", 6), ("曹", 6), ("袁", 5), ("邓", 5), ("许", 5), ("傅", 5), ("沈", 5),
    ("曾", 5), ("彭", 5), ("吕", 5), ("苏", 5), ("卢", 5), ("蒋", 5), ("蔡", 5), ("贾", 4),
    ("丁", 4), ("魏", 4), ("薛", 4), ("叶", 4), ("阎", 4), ("余", 3), ("潘", 3), ("杜", 3),
    ("戴", 3), ("夏", 3), ("钟", 3), ("汪", 3), ("田", 3), ("任", 3), ("姜", 3), ("范", 3),
    ("方", 3), ("石", 3), ("姚", 3), ("谭", 2), ("廖", 2), ("邹", 2), ("熊", 2), ("金", 2),
    ("陆", 2), ("郝", 2), ("孔", 2), ("白", 2), ("崔", 2), ("康", 2), ("毛", 2), ("邱", 2),
    ("秦", 2), ("江", 2), ("史", 2), ("顾", 2), ("侯", 2), ("邵", 2), ("孟", 2), ("龙", 2),
    ("万", 2), ("段", 2), ("司马", 1), ("欧阳", 1), ("上官", 1),
)  # fmt: skip
GIVEN_MALE = "伟强磊军勇杰涛明超刚平辉鹏华飞鑫波斌宇浩凯健俊帆帅旭宁龙林峰建国志文博昊晨轩然睿"
GIVEN_FEMALE = "芳娜敏静丽艳娟霞燕玲桂秀英华慧巧美娅婷雪琳晶颖洁佳欣怡悦萱涵雨梦琪璐瑶倩蕾"
GIVEN_EITHER = "子思一嘉晓海春秋云新建红立永德瑞安泽嘉雅宏振家"
ETHNICITIES: tuple[tuple[str, int], ...] = (
    ("汉族", 950),
    ("满族", 25),
    ("回族", 15),
    ("蒙古族", 10),
)
EDUCATION: tuple[tuple[str, int], ...] = (
    ("大学本科", 60), ("硕士研究生", 18), ("大学专科", 14), ("博士研究生", 3), ("高中", 5),
)  # fmt: skip
POLITICAL: tuple[tuple[str, int], ...] = (
    ("中共党员", 55), ("群众", 30), ("共青团员", 10), ("民主党派", 3), ("无党派人士", 2),
)  # fmt: skip
ENTRY: tuple[tuple[EntryMethod, int], ...] = (
    (EntryMethod.EXAM, 72),
    (EntryMethod.TRANSFER_IN, 14),
    (EntryMethod.MILITARY_RESETTLEMENT, 5),
    (EntryMethod.APPOINTMENT, 5),
    (EntryMethod.OTHER, 4),
)
MOBILE_PREFIXES = (
    "130", "131", "132", "135", "136", "138", "139", "150", "152", "155", "158",
    "159", "176", "177", "180", "183", "185", "186", "187", "189", "199",
)  # fmt: skip

# --- divisions ------------------------------------------------------------------------------


@cache
def _current_children() -> dict[str, tuple[str, ...]]:
    """Current division codes by parent code (from the bundled GB/T 2260 data)."""
    text = resources.files("contracts").joinpath("data/divisions.json").read_text(encoding="utf-8")
    children: dict[str, list[str]] = defaultdict(list)
    for code in sorted(json.loads(text)["divisions"]):
        found = identifiers.division(code)
        if found is not None and found.current and found.parent is not None:
            children[found.parent].append(code)
    return {parent: tuple(codes) for parent, codes in children.items()}


def divisions_within(code: str) -> list[identifiers.Division]:
    """The current division ``code`` and every current division below it, parents first."""
    top = identifiers.division(code)
    if top is None or not top.current:
        raise ValueError(f"{code} is not a current administrative division code")
    out: list[identifiers.Division] = []
    stack = [code]
    while stack:
        current = stack.pop(0)
        found = identifiers.division(current)
        assert found is not None
        out.append(found)
        stack.extend(_current_children().get(current, ()))
    return out


def counties_within(code: str) -> list[str]:
    """The current county-level codes inside ``code`` (itself, when it is county level)."""
    return [d.code for d in divisions_within(code) if d.level == 3] or [code]


def _org_prefix(div: identifiers.Division) -> str:
    """How an org of the division is named: 河北省…, 石家庄市…, 石家庄市长安区…, 正定县…."""
    if div.level == 3 and div.name.endswith("区") and div.parent:
        parent = identifiers.division(div.parent)
        if parent is not None:
            return parent.name + div.name
    return div.name


def _abbreviation(div: identifiers.Division) -> str:
    """The one-character prefix of a document number: the province's or the city's."""
    if div.code.startswith("13") and div.level == 1:
        return "冀"
    city = div if div.level <= 2 else identifiers.division(div.parent or "")
    return (city or div).name[0]


# --- identifiers ----------------------------------------------------------------------------

_USCC_CHARSET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_ORG_WEIGHTS = (3, 7, 9, 10, 5, 8, 4, 2)


def uscc(kind: OrgKind, division_code: str, org_code_body: str) -> str:
    """A GB 32100 code registered by the staffing office (1), kind 1 organ / 2 institution, with
    the GB 11714 organization code check and the GB 32100 check character."""
    org_sum = sum(int(ch) * w for ch, w in zip(org_code_body, _ORG_WEIGHTS, strict=True))
    org_check = {10: "X", 11: "0"}.get(11 - org_sum % 11, str(11 - org_sum % 11))
    body = "1" + ("1" if kind is OrgKind.ORGAN else "2") + division_code + org_code_body + org_check
    total = sum(_USCC_CHARSET.index(ch) * w for ch, w in zip(body, _USCC_WEIGHTS, strict=True))
    return body + _USCC_CHARSET[(31 - total % 31) % 31]


# --- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Org:
    command: RegisterOrg
    spec: OrgSpec
    division: identifiers.Division


@dataclass
class DemoPlan:
    """Every command of the demo, by stage, with what the tests check against."""

    seed: int
    within: str
    as_of: date
    orgs: list[Org] = field(default_factory=list)
    limits: list[SetRegionLimit] = field(default_factory=list)
    quotas: list[ApproveQuota] = field(default_factory=list)
    leader_posts: list[SetLeaderPosts] = field(default_factory=list)
    notices: list[IssueQuotaUseNotice] = field(default_factory=list)
    people: list[EnrolPerson] = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    """Commands that may go out together; each stage waits for the one before."""

    name: str
    commands: list[tuple[str, Command]]  # (key of the command, command)


def _weighted(rng: random.Random, table: Sequence[tuple[object, int]]) -> object:
    return rng.choices([v for v, _ in table], weights=[w for _, w in table])[0]


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders; sums exactly)."""
    whole = sum(weights)
    if total <= 0 or whole <= 0:
        return [0] * len(weights)
    exact = [total * w / whole for w in weights]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (shares[i] - exact[i], i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def build_plan(
    people: int = DEFAULT_PEOPLE, *, seed: int = 1, within: str = HEBEI, as_of: date
) -> DemoPlan:
    """The demo for ``within`` and below, with ``people`` people, as of the day ``as_of``."""
    if people < 0:
        raise ValueError("people must not be negative")
    rng = random.Random(seed)
    plan = DemoPlan(seed=seed, within=within, as_of=as_of)
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"bianzhi-demo:{seed}:{within}")
    year = as_of.year
    org_doc_date = as_of - timedelta(days=180)
    counters: dict[str, int] = defaultdict(int)

    def number(prefix: str, kind: str) -> str:
        counters[prefix + kind] += 1
        return f"{prefix}{kind}〔{year}〕{counters[prefix + kind]}号"

    # Orgs: every spec in every division, parents (organs) before the institutions under them.
    used_org_codes: set[str] = set()
    for div in divisions_within(within):
        level = min(div.level, 3)
        ids: dict[str, uuid.UUID] = {}
        abbr = _abbreviation(div)
        for spec in CATALOGUE:
            org_id = uuid.uuid5(namespace, f"org:{div.code}:{spec.key}")
            ids[spec.key] = org_id
            while True:
                lead = "0" if spec.kind is OrgKind.ORGAN else "4"
                body = lead + "".join(rng.choice("0123456789") for _ in range(7))
                if body not in used_org_codes:
                    used_org_codes.add(body)
                    break
            name = _org_prefix(div) + spec.names[level - 1]
            command = RegisterOrg(
                org_id=org_id,
                name=name,
                kind=spec.kind,
                division_code=div.code,
                parent_org_id=ids[spec.parent] if spec.parent else None,
                uscc=uscc(spec.kind, div.code, body),
                grade=GRADES[level] if spec.kind is OrgKind.ORGAN else None,
                functions=list(spec.functions),
                funding=spec.funding,
                document=Document(
                    title=f"关于{name}机构设置的批复",
                    number=number(abbr, "编"),
                    date=org_doc_date,
                ),
            )
            plan.orgs.append(Org(command, spec, div))

    # People per (org, category), in proportion to the catalogue weights and the level.
    slots = [
        (org, category, weight * LEVEL_FACTOR[min(org.division.level, 3)])
        for org in plan.orgs
        for category, weight in org.spec.weights
    ]
    counts = _apportion(people, [w for _, _, w in slots])

    quota_doc = Document(
        title=f"关于核定{year}年度机构编制的通知",
        number=number(_abbreviation(divisions_within(within)[0]), "编"),
        date=as_of - timedelta(days=120),
    )
    approved_in: dict[tuple[str, Category], int] = defaultdict(int)
    for (org, category, _), count in zip(slots, counts, strict=True):
        slack = max(1, math.ceil(count * 0.12)) + rng.randint(0, 2)
        approved = count + slack
        plan.quotas.append(
            ApproveQuota(
                org_id=org.command.org_id,
                category=category,
                approved=approved,
                document=quota_doc,
                effective_date=quota_doc.date,
                funding=org.spec.funding if category in INSTITUTIONAL_CATEGORIES else None,
            )
        )
        for code in [org.division.code, *identifiers.ancestors(org.division.code)]:
            approved_in[(code, category)] += approved

    # Region limits: a margin above what is approved inside; never above the enclosing limit,
    # since the enclosing division's approved total includes this one's.
    limit_doc = Document(
        title=f"关于下达{year}年度机构编制总量控制数的通知",
        number=number(_abbreviation(divisions_within(within)[0]), "编"),
        date=as_of - timedelta(days=150),
    )
    for div in divisions_within(within):
        for category in Category:
            used = approved_in.get((div.code, category), 0)
            if used:
                plan.limits.append(
                    SetRegionLimit(
                        division_code=div.code,
                        category=category,
                        limit=used + math.ceil(used * 0.08) + 2,
                        document=limit_doc,
                    )
                )

    # Leader posts, notices and people, org by org.
    posts_doc = Document(
        title=f"关于核定{year}年度领导职数的通知",
        number=number(_abbreviation(divisions_within(within)[0]), "编"),
        date=as_of - timedelta(days=120),
    )
    notice_date = as_of - timedelta(days=60)
    used_ids: set[str] = set()
    by_org: dict[uuid.UUID, list[tuple[Category, int]]] = defaultdict(list)
    for (org, category, _), count in zip(slots, counts, strict=True):
        by_org[org.command.org_id].append((category, count))
    for org in plan.orgs:
        level = min(org.division.level, 3)
        deputies = DEPUTIES[level]
        plan.leader_posts.append(
            SetLeaderPosts(
                org_id=org.command.org_id, principal=1, deputy=deputies, document=posts_doc
            )
        )
        addresses = counties_within(org.division.code)
        main_category = org.spec.weights[0][0]
        for category, count in by_org[org.command.org_id]:
            # Few leaders: the first people of the main category of a big enough org.
            leaders: list[LeaderPost] = []
            if category is main_category and count >= 3:
                leaders = [LeaderPost.PRINCIPAL] + [LeaderPost.DEPUTY] * min(deputies, count // 5)
            for start in range(0, count, NOTICE_MAX):
                size = min(NOTICE_MAX, count - start)
                notice = IssueQuotaUseNotice(
                    notice_no=number(_abbreviation(org.division), "编用"),
                    org_id=org.command.org_id,
                    category=category,
                    count=size,
                    valid_until=as_of + timedelta(days=365),
                    document=Document(
                        title=f"{org.command.name}用编通知单",
                        number=number(_abbreviation(org.division), "编用字"),
                        date=notice_date,
                    ),
                )
                plan.notices.append(notice)
                for i in range(start, start + size):
                    post = leaders[i] if i < len(leaders) else None
                    plan.people.append(
                        _person(rng, org, category, notice, post, addresses, used_ids, as_of)
                    )
    return plan


def _person(
    rng: random.Random,
    org: Org,
    category: Category,
    notice: IssueQuotaUseNotice,
    post: LeaderPost | None,
    addresses: Sequence[str],
    used_ids: set[str],
    as_of: date,
) -> EnrolPerson:
    male = rng.random() < 0.52
    # Ages count from new year's day, so that the people (and their command ids) stay the same
    # whichever day of the year the demo runs.
    reference = date(as_of.year, 1, 1)
    while True:
        oldest = reference.replace(year=reference.year - RETIREMENT_AGE - 1) + timedelta(days=1)
        youngest = reference.replace(year=reference.year - ENTRY_AGE)
        born = oldest + timedelta(days=rng.randint(0, (youngest - oldest).days))
        sequence = rng.randint(0, 99) * 10 + rng.choice(
            (1, 3, 5, 7, 9) if male else (0, 2, 4, 6, 8)
        )
        number = identifiers.compose_citizen_id(rng.choice(addresses), born, sequence)
        if number not in used_ids:
            used_ids.add(number)
            break
    surname = str(_weighted(rng, SURNAMES))
    pool = (GIVEN_MALE if male else GIVEN_FEMALE) + GIVEN_EITHER
    given = rng.choice(pool) + (rng.choice(pool) if rng.random() < 0.7 else "")
    if post is not None:
        title = org.spec.titles[0 if post is LeaderPost.PRINCIPAL else 1]
        entry = EntryMethod.APPOINTMENT
    else:
        title = rng.choice(org.spec.positions)
        entry = EntryMethod(str(_weighted(rng, ENTRY)))
        if category is Category.SUPPORT:
            title = rng.choice(("驾驶员", "技术工人", "后勤服务"))
    return EnrolPerson(
        citizen_id=number,
        person_id=uuid.uuid5(uuid.NAMESPACE_URL, f"bianzhi-demo-person:{number}"),
        name=surname + given,
        org_id=org.command.org_id,
        category=category,
        notice_no=notice.notice_no,
        position=title,
        leader_post=post,
        entry_method=entry,
        effective_date=notice.document.date + timedelta(days=rng.randint(1, 59)),
        sex="male" if male else "female",
        birth_date=born,
        ethnicity=str(_weighted(rng, ETHNICITIES)),
        education=str(_weighted(rng, EDUCATION)),
        political_status=str(_weighted(rng, POLITICAL)),
        phone=rng.choice(MOBILE_PREFIXES) + f"{rng.randint(0, 99_999_999):08d}",
    )


# --- stages and envelopes -------------------------------------------------------------------


def stages(plan: DemoPlan) -> list[Stage]:
    """The plan in sending order: each stage depends on the ones before it."""
    organs = [o.command for o in plan.orgs if o.spec.parent is None]
    institutions = [o.command for o in plan.orgs if o.spec.parent is not None]
    return [
        Stage("limits", [(f"{c.division_code}:{c.category}", c) for c in plan.limits]),
        Stage("organs", [(str(c.org_id), c) for c in organs]),
        Stage("institutions", [(str(c.org_id), c) for c in institutions]),
        Stage(
            "quota",
            [(f"{c.org_id}:{c.category}", c) for c in plan.quotas]
            + [(str(c.org_id), c) for c in plan.leader_posts],
        ),
        Stage("notices", [(c.notice_no, c) for c in plan.notices]),
        Stage("people", [(c.citizen_id, c) for c in plan.people]),
    ]


@dataclass(frozen=True)
class Actor:
    actorid: str
    actorregion: str
    actorroles: str


def envelopes(plan: DemoPlan, stage: Stage, actor: Actor, source: str) -> Iterator[Envelope]:
    """The stage's commands as envelopes, each with an id that depends on seed, scope and key."""
    for key, command in stage.commands:
        cid = command_id("demo", str(plan.seed), plan.within, command.TYPE, key)
        yield command.envelope(
            source=source,
            id=cid,
            actorid=actor.actorid,
            actorregion=actor.actorregion,
            actorroles=actor.actorroles,
        )
