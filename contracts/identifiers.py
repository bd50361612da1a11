"""Chinese identifiers: administrative division codes, citizen ID numbers and USCCs.

* GB/T 2260 administrative division codes (行政区划代码): six digits, province ``XX0000``,
  prefecture ``XXXX00``, county level otherwise. The code list (current and historical, with
  parents) lives in ``contracts/data/divisions.json`` and is read lazily on first use, once.
* GB 11643 citizen ID numbers (公民身份号码): 18 characters with an ISO 7064 MOD 11-2 check
  character; 15-digit legacy numbers are converted.
* GB 32100 unified social credit codes (统一社会信用代码, USCC), whose characters 9-17 are a
  GB 11714 organization code (组织机构代码) with its own check character.

Standard library only: the wire contract must stay importable on its own. Other modules call
these functions by name; keep the signatures stable.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date
from functools import cache
from importlib import resources
from operator import mul
from typing import Any, Final

__all__ = [
    "Division",
    "IdentifierError",
    "ancestors",
    "birth_date_of_valid",
    "citizen_birth_date",
    "citizen_sex",
    "division",
    "is_within",
    "mask_citizen_id",
    "sex_of_valid",
    "uscc_kind_warning",
    "validate_citizen_id",
    "validate_division_code",
    "validate_uscc",
]

INVALID_CITIZEN_ID: Final = "invalid_citizen_id"
INVALID_USCC: Final = "invalid_uscc"
UNKNOWN_DIVISION: Final = "unknown_division"


class IdentifierError(ValueError):
    """An identifier failed validation; ``code`` is a wire reason code (``ReasonCode`` value)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------
# Administrative divisions (GB/T 2260)
# ---------------------------------------------------------------------------------------------

_DIVISION_CODE = re.compile(r"[0-9]{6}")


@dataclass(frozen=True)
class Division:
    """One GB/T 2260 code at province (1), prefecture (2) or county (3) level.

    Historical codes (``current`` false) carry the name they last had and, where the source
    records it, the codes that replaced them (``successors``) and the year they went
    (``abolished``, the year of the GB/T 2260 edition that first lacked them).
    """

    code: str
    name: str
    parent: str | None
    level: int
    current: bool
    successors: tuple[str, ...] = ()
    abolished: int | None = None


@cache
def _divisions() -> dict[str, Division]:
    """The division table, read from the package data on first use and kept."""
    text = resources.files("contracts").joinpath("data/divisions.json").read_text(encoding="utf-8")
    rows: dict[str, list[Any]] = json.loads(text)["divisions"]
    table: dict[str, Division] = {}
    for code, row in rows.items():
        # [name, parent, level, current, abolished_year?, [successors]?]
        table[code] = Division(
            code=code,
            name=row[0],
            parent=row[1],
            level=row[2],
            current=bool(row[3]),
            successors=tuple(row[5]) if len(row) > 5 else (),
            abolished=row[4] if len(row) > 4 else None,
        )
    return table


def _check_division_format(code: object) -> str:
    if not isinstance(code, str) or not _DIVISION_CODE.fullmatch(code):
        raise IdentifierError(
            UNKNOWN_DIVISION, f"division code must be exactly 6 digits, got {code!r}"
        )
    return code


def division(code: str) -> Division | None:
    """The division with this six-digit code (current or historical), or None if unknown."""
    if not isinstance(code, str):
        return None
    return _divisions().get(code)


def validate_division_code(value: str, *, current_only: bool = False) -> str:
    """Return ``value`` if it is a known six-digit division code, else raise IdentifierError.

    Historical (abolished) codes are accepted unless ``current_only`` is set.
    """
    code = _check_division_format(value.strip() if isinstance(value, str) else value)
    found = _divisions().get(code)
    if found is None:
        raise IdentifierError(UNKNOWN_DIVISION, f"{code} is not a known administrative division")
    if current_only and not found.current:
        when = f" since {found.abolished}" if found.abolished else ""
        raise IdentifierError(
            UNKNOWN_DIVISION,
            f"{code} ({found.name}) is a historical division code, not current{when}",
        )
    return code


def _parent_code(code: str) -> str | None:
    found = _divisions().get(code)
    if found is not None:
        return found.parent
    if code.endswith("0000"):
        return None
    if code.endswith("00"):
        return code[:2] + "0000"
    return code[:4] + "00"


def ancestors(code: str) -> list[str]:
    """Codes of the enclosing divisions up to the province, nearest first.

    Uses the parents in the data; for a code not in the data falls back to the code prefixes
    (``XXXX00``, then ``XX0000``). A province has no ancestors.
    """
    chain: list[str] = []
    parent = _parent_code(_check_division_format(code))
    while parent is not None and parent not in chain:  # parents are strictly shorter prefixes
        chain.append(parent)
        parent = _parent_code(parent)
    return chain


def is_within(code: str, region: str) -> bool:
    """True if ``code`` is ``region`` or lies inside it (also for historical codes)."""
    _check_division_format(region)
    return code == region or region in ancestors(code)


# ---------------------------------------------------------------------------------------------
# Citizen ID numbers (GB 11643-1999)
# ---------------------------------------------------------------------------------------------

_CITIZEN_ID_18 = re.compile(r"[0-9]{17}[0-9X]")
_CITIZEN_ID_15 = re.compile(r"[0-9]{15}")
_CITIZEN_WEIGHTS: Final = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CITIZEN_CHECK: Final = "10X98765432"
_EARLIEST_BIRTH: Final = date(1900, 1, 1)
# An ASCII digit's byte is the digit plus ord("0"): what that adds to the weighted sum.
_CITIZEN_DIGITS_OFFSET: Final = ord("0") * sum(_CITIZEN_WEIGHTS)


def _citizen_check_char(body: str) -> str:
    """ISO 7064 MOD 11-2 check character of the first 17 digits."""
    if len(body) == 17 and body.isascii() and body.isdigit():
        total = sum(map(mul, body.encode(), _CITIZEN_WEIGHTS)) - _CITIZEN_DIGITS_OFFSET
    else:  # other digits or another length (only ``compose_citizen_id`` passes such): as ever
        total = sum(int(ch) * weight for ch, weight in zip(body, _CITIZEN_WEIGHTS, strict=True))
    return _CITIZEN_CHECK[total % 11]


def _citizen_error(message: str) -> IdentifierError:
    return IdentifierError(INVALID_CITIZEN_ID, message)


def _upgrade_15(value: str) -> str:
    """Convert a 15-digit legacy number: century '19' before the yymmdd, then a check char."""
    body = value[:6] + "19" + value[6:]
    return body + _citizen_check_char(body)


def _birth_date(number: str) -> date:
    try:
        born = date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        raise _citizen_error(
            f"birth date {number[6:14]} in the citizen ID is not a real calendar date"
        ) from None
    if born < _EARLIEST_BIRTH:
        raise _citizen_error(f"birth date {born.isoformat()} in the citizen ID is before 1900")
    if born > date.today():
        raise _citizen_error(f"birth date {born.isoformat()} in the citizen ID is in the future")
    return born


def validate_citizen_id(value: str) -> str:
    """Validate a citizen ID number; return it normalised (18 characters, upper-case X).

    Checks the form, the check character, the birth date (a real date, 1900-01-01 to today) and
    that the address code (first 6 digits) is a known division code, current or historical.
    """
    if not isinstance(value, str):
        raise _citizen_error("citizen ID must be a string")
    number = value.strip().upper()
    if _CITIZEN_ID_15.fullmatch(number):
        number = _upgrade_15(number)
    elif not _CITIZEN_ID_18.fullmatch(number):
        raise _citizen_error(
            "citizen ID must be 18 characters (17 digits and a check digit 0-9 or X) "
            "or a 15-digit legacy number"
        )
    elif _citizen_check_char(number[:17]) != number[17]:
        raise _citizen_error("citizen ID check digit (18th character) does not match")
    _birth_date(number)
    address = number[:6]
    if address not in _divisions():
        raise _citizen_error(
            f"citizen ID address code {address} is not a known administrative division"
        )
    return number


def compose_citizen_id(address_code: str, birth_date: date, sequence: int) -> str:
    """The 18-character citizen ID of an address code, a birth date and a three-digit sequence
    (odd for men, even for women), with its check character. For test and demo data."""
    if not (len(address_code) == 6 and address_code.isdigit()) or not 0 <= sequence <= 999:
        raise ValueError("address_code must be 6 digits and sequence 0-999")
    body = f"{address_code}{birth_date:%Y%m%d}{sequence:03d}"
    return body + _citizen_check_char(body)


def mask_citizen_id(value: str) -> str:
    """Mask a citizen ID for display: first 6 and last 4 characters, 8 stars between.

    A 15-digit legacy number is first converted to 18 characters. Does not validate.
    """
    number = value.strip().upper()
    if _CITIZEN_ID_15.fullmatch(number):
        number = _upgrade_15(number)
    if len(number) <= 10:
        return "*" * len(number)
    return number[:6] + "*" * 8 + number[-4:]


def citizen_birth_date(value: str) -> date:
    """Birth date encoded in a (valid) citizen ID number; raises IdentifierError if invalid."""
    return _birth_date(validate_citizen_id(value))


def citizen_sex(value: str) -> str:
    """'male' or 'female' from the 17th digit (odd = male) of a valid citizen ID number."""
    return sex_of_valid(validate_citizen_id(value))


def birth_date_of_valid(number: str) -> date:
    """``citizen_birth_date`` of a number ``validate_citizen_id`` returned already (a model's
    ``CitizenId`` field holds one), without checking it all again."""
    return _birth_date(number)


def sex_of_valid(number: str) -> str:
    """``citizen_sex`` of a number ``validate_citizen_id`` returned already."""
    return "male" if int(number[16]) % 2 else "female"


# ---------------------------------------------------------------------------------------------
# Unified social credit codes (GB 32100-2015) and organization codes (GB 11714-1997)
# ---------------------------------------------------------------------------------------------

_USCC_CHARSET: Final = "0123456789ABCDEFGHJKLMNPQRTUWXY"  # no I, O, S, V, Z
_USCC_VALUE: Final = {ch: i for i, ch in enumerate(_USCC_CHARSET)}
_USCC_WEIGHTS: Final = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_ORG_WEIGHTS: Final = (3, 7, 9, 10, 5, 8, 4, 2)
# Registration department (登记管理部门, 1st character): 1 机构编制 2 外交 3 司法行政 4 文化
# 5 民政 6 旅游 7 宗教 8 工会 9 工商/市场监管 A 中央军委改革和编制办公室 N 农业 Y 其他.
_USCC_DEPARTMENTS: Final = frozenset("123456789ANY")
_USCC_KIND_PREFIX: Final = {"organ": "11", "public_institution": "12"}
_USCC_KIND_LABEL: Final = {
    "organ": ("机关", "a government organ"),
    "public_institution": ("事业单位", "a public institution"),
}


def _uscc_error(message: str) -> IdentifierError:
    return IdentifierError(INVALID_USCC, message)


def _org_code_check_char(body: str) -> str:
    """GB 11714 check character of an 8-character organization code body."""
    total = 0
    for ch, weight in zip(body, _ORG_WEIGHTS, strict=True):
        total += (int(ch) if ch.isdigit() else ord(ch) - ord("A") + 10) * weight
    check = 11 - total % 11
    return "X" if check == 10 else "0" if check == 11 else str(check)


def _uscc_check_char(body: str) -> str:
    """GB 32100 check character of the first 17 characters."""
    total = sum(_USCC_VALUE[ch] * weight for ch, weight in zip(body, _USCC_WEIGHTS, strict=True))
    return _USCC_CHARSET[(31 - total % 31) % 31]


def validate_uscc(value: str) -> str:
    """Validate a unified social credit code; return it upper-cased.

    Checks: 18 characters from ``0-9A-HJ-NPQRTUWXY``; a known registration department (1st
    character) and an organization kind digit (2nd); six digits of division code (3rd-8th, not
    looked up); the GB 11714 organization code (9th-17th) with its check character; and the
    GB 32100 check character (18th).
    """
    if not isinstance(value, str):
        raise _uscc_error("unified social credit code must be a string")
    code = value.strip().upper()
    if len(code) != 18:
        raise _uscc_error(f"unified social credit code must be 18 characters, got {len(code)}")
    bad = sorted({ch for ch in code if ch not in _USCC_VALUE})
    if bad:
        raise _uscc_error(
            "unified social credit code has characters outside 0-9 and A-Z without I, O, S, V, "
            f"Z: {''.join(bad)}"
        )
    if code[0] not in _USCC_DEPARTMENTS:
        raise _uscc_error(
            f"unified social credit code registration department {code[0]!r} is not defined "
            "(1-9, A, N or Y)"
        )
    if not code[1].isdigit() or code[1] == "0":
        raise _uscc_error(
            f"unified social credit code organization kind {code[1]!r} must be a digit 1-9"
        )
    if not code[2:8].isdigit():
        raise _uscc_error(
            "unified social credit code characters 3-8 must be a 6-digit division code"
        )
    org = code[8:17]
    if _org_code_check_char(org[:8]) != org[8]:
        raise _uscc_error(
            f"organization code {org[:8]}-{org[8]} in the unified social credit code has a wrong "
            "check character (GB 11714)"
        )
    if _uscc_check_char(code[:17]) != code[17]:
        raise _uscc_error("unified social credit code check character (18th) does not match")
    return code


def uscc_kind_warning(uscc: str, org_kind: str) -> str | None:
    """A warning (Chinese and English) when the USCC prefix does not fit the kind, else None.

    Organs (``organ``) are registered by the staffing office as ``11``, public institutions
    (``public_institution``) as ``12``; other kinds are not checked.
    """
    kind = str(org_kind)  # a plain string or an OrgKind (StrEnum)
    expected = _USCC_KIND_PREFIX.get(kind)
    if expected is None:
        return None
    code = uscc.strip().upper()
    if code.startswith(expected):
        return None
    zh, en = _USCC_KIND_LABEL[kind]
    return (
        f"统一社会信用代码 {code} 不以 {expected} 开头，与机构类别「{zh}」不符；"
        f"the unified social credit code {code} does not start with {expected} as expected "
        f"for {en}"
    )


def division_prefix(code: str) -> str:
    """The code prefix shared by a division and everything below it (GB/T 2260 structure):
    ``130000`` → ``13``, ``130100`` → ``1301``, ``130102`` → ``130102``. For SQL ``LIKE``."""
    if code.endswith("0000"):
        return code[:2]
    if code.endswith("00"):
        return code[:4]
    return code
