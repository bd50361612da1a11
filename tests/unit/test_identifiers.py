"""contracts.identifiers: division codes, citizen ID numbers (GB 11643) and USCCs (GB 32100)."""

import json
import random
import subprocess
import sys
from datetime import date, timedelta
from importlib import resources
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import identifiers
from contracts.codes import OrgKind
from contracts.identifiers import (
    Division,
    IdentifierError,
    ancestors,
    citizen_birth_date,
    citizen_sex,
    division,
    is_within,
    mask_citizen_id,
    uscc_kind_warning,
    validate_citizen_id,
    validate_division_code,
    validate_uscc,
)

# Independent reference implementations of the check characters, written from the standards,
# so the tests do not just repeat the module's own arithmetic.


def gb11643_check(body17):
    weights = [2 ** (17 - i) % 11 for i in range(17)]  # 7, 9, 10, 5, 8, 4, 2, 1, 6, 3, ...
    return "10X98765432"[sum(int(c) * w for c, w in zip(body17, weights, strict=True)) % 11]


def citizen_id(address, birth, seq="123"):
    body = address + birth + seq
    return body + gb11643_check(body)


USCC_CHARS = "0123456789ABCDEFGHJKLMNPQRTUWXY"


def gb32100_check(body17):
    total = sum(USCC_CHARS.index(c) * pow(3, i, 31) for i, c in enumerate(body17))
    return USCC_CHARS[(31 - total % 31) % 31]


def gb11714_check(body8):
    values = [int(c, 36) for c in body8]  # 0-9 -> 0-9, A-Z -> 10-35
    check = 11 - sum(v * w for v, w in zip(values, [3, 7, 9, 10, 5, 8, 4, 2], strict=True)) % 11
    return {10: "X", 11: "0"}.get(check, str(check))


def assert_error(code, fn, *args, **kwargs):
    with pytest.raises(IdentifierError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code
    assert str(info.value)
    return info.value


# --- data file ---------------------------------------------------------------------------------


def load_rows():
    text = resources.files("contracts").joinpath("data/divisions.json").read_text("utf-8")
    return json.loads(text)


def test_data_file_is_compact_and_consistent():
    path = resources.files("contracts").joinpath("data/divisions.json")
    assert len(path.read_bytes()) < 1_000_000
    data = load_rows()
    assert "国家地名信息库" in data["meta"]["source"]
    rows = data["divisions"]
    assert len(rows) > 6000
    for code, row in rows.items():
        name, parent, level, current = row[:4]
        assert len(code) == 6 and code.isdigit() and name
        assert level == (1 if code.endswith("0000") else 2 if code.endswith("00") else 3)
        assert current in (0, 1)
        if level == 1:
            assert parent is None
        else:
            assert parent in rows and rows[parent][2] < level
            assert code.startswith(parent[: 2 if rows[parent][2] == 1 else 4])
        for successor in row[5] if len(row) > 5 else ():
            assert successor in rows
        if current:
            assert len(row) == 4


def test_data_not_loaded_at_import():
    script = (
        "import contracts, contracts.common, contracts.identifiers as i; "
        "assert i._divisions.cache_info().currsize == 0, 'loaded at import'"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


# --- divisions ---------------------------------------------------------------------------------


def test_division_lookup_current_county():
    d = division("130102")
    assert d == Division("130102", "长安区", "130100", 3, True)
    assert division("130100").name == "石家庄市"
    assert division("130000").parent is None
    assert division("130000").level == 1


def test_division_lookup_pseudo_prefectures():
    assert division("110100") == Division("110100", "市辖区", "110000", 2, True)
    assert division("500200").name == "县"
    assert division("429000").name == "省直辖县级行政区划"
    assert division("659000").name == "自治区直辖县级行政区划"
    assert division("110200").current is False  # Beijing's 县 went with 密云/延庆 in 2015


def test_division_lookup_historical():
    d = division("110228")
    assert d.name == "密云县"
    assert d.current is False
    assert d.parent == "110200"
    assert d.successors == ("110118",)
    assert d.abolished == 2015
    assert division("110118").name == "密云区"


@pytest.mark.parametrize("code", ["999999", "110120", "", "11010", "abcdef", None])
def test_division_unknown(code):
    assert division(code) is None


@pytest.mark.parametrize("code", ["110105", "130102", "429004", "110000", "110228", "139001"])
def test_validate_division_code_known(code):
    assert validate_division_code(code) == code


def test_validate_division_code_current_only():
    assert validate_division_code("110105", current_only=True) == "110105"
    err = assert_error("unknown_division", validate_division_code, "110228", current_only=True)
    assert "historical" in str(err)


@pytest.mark.parametrize("code", ["990000", "110120", "11010", "1101050", "11O105", "１１０１０５"])
def test_validate_division_code_rejected(code):
    assert_error("unknown_division", validate_division_code, code)


@pytest.mark.parametrize(
    ("code", "chain"),
    [
        ("130102", ["130100", "130000"]),  # county of a prefecture-level city
        ("110105", ["110100", "110000"]),  # Beijing district under the 市辖区 pseudo code
        ("500229", ["500200", "500000"]),  # Chongqing county under 县
        ("429004", ["429000", "420000"]),  # 仙桃市, 省直辖县级行政区划
        ("110228", ["110200", "110000"]),  # historical 密云县
        ("130100", ["130000"]),
        ("130000", []),
        ("130199", ["130100", "130000"]),  # unknown code: prefix fallback
        ("990101", ["990100", "990000"]),
    ],
)
def test_ancestors(code, chain):
    assert ancestors(code) == chain


def test_ancestors_rejects_malformed():
    assert_error("unknown_division", ancestors, "13010")


@pytest.mark.parametrize(
    ("code", "region", "inside"),
    [
        ("130102", "130102", True),
        ("130102", "130100", True),
        ("130102", "130000", True),
        ("130102", "130200", False),
        ("130102", "110000", False),
        ("110105", "110100", True),
        ("110105", "110000", True),
        ("110105", "120000", False),
        ("429004", "429000", True),
        ("429004", "420000", True),
        ("429004", "420100", False),
        ("110228", "110000", True),  # historical codes too
        ("110228", "110100", False),
        ("139001", "130000", True),
        ("130100", "130102", False),  # a region is not within its county
    ],
)
def test_is_within(code, region, inside):
    assert is_within(code, region) is inside


# --- citizen ID numbers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "normalised"),
    [
        ("11010519491231002X", "11010519491231002X"),  # the example of GB 11643-1999
        ("11010519491231002x", "11010519491231002X"),
        (" 11010519491231002X ", "11010519491231002X"),
        ("130102199003071233", "130102199003071233"),
        (citizen_id("429004", "20000229"), citizen_id("429004", "20000229")),  # leap day
        (citizen_id("130102", "19000101"), citizen_id("130102", "19000101")),
    ],
)
def test_citizen_id_valid(value, normalised):
    assert validate_citizen_id(value) == normalised


@pytest.mark.parametrize("last", list("0123456789"))
def test_citizen_id_wrong_check_digit(last):
    err = assert_error("invalid_citizen_id", validate_citizen_id, "11010519491231002" + last)
    assert "check" in str(err)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "11010519491231002",  # 17 characters
        "11010519491231002XX",
        "1101051949123100X2",  # X not last
        "11010519491231002Y",
        "1101051949123100２X",  # full-width digit
        "1101058912310",
    ],
)
def test_citizen_id_bad_form(value):
    assert_error("invalid_citizen_id", validate_citizen_id, value)


@pytest.mark.parametrize(
    ("birth", "reason"),
    [
        ("19900230", "not a real"),  # 30 February
        ("19000229", "not a real"),  # 1900 is not a leap year
        ("19901301", "not a real"),
        ("19900100", "not a real"),
        ("18991231", "before 1900"),
        (f"{date.today().year + 1}0101", "future"),
    ],
)
def test_citizen_id_bad_birth_date(birth, reason):
    err = assert_error("invalid_citizen_id", validate_citizen_id, citizen_id("130102", birth))
    assert reason in str(err)


def test_citizen_id_historical_address_code():
    # 110228 密云县 was abolished in 2015 (now 110118 密云区); IDs issued before keep it.
    assert division("110228").current is False
    value = citizen_id("110228", "19800101", "001")
    assert value == "110228198001010016"
    assert validate_citizen_id(value) == value
    # prefecture-level and pseudo codes present in the data are accepted too
    assert validate_citizen_id(citizen_id("139001", "19900101")) == citizen_id("139001", "19900101")


@pytest.mark.parametrize("address", ["990101", "110120", "000000", "130199"])
def test_citizen_id_unknown_address_code(address):
    err = assert_error("invalid_citizen_id", validate_citizen_id, citizen_id(address, "19900101"))
    assert address in str(err)


@pytest.mark.parametrize(
    ("legacy", "upgraded"),
    [
        ("130321860311519", "130321198603115194"),
        ("110105491231002", "11010519491231002X"),
        ("110228800101001", "110228198001010016"),
    ],
)
def test_citizen_id_15_digit_conversion(legacy, upgraded):
    assert validate_citizen_id(legacy) == upgraded
    born = date(1900 + int(legacy[6:8]), int(legacy[8:10]), int(legacy[10:12]))
    assert citizen_birth_date(legacy) == born


@pytest.mark.parametrize("legacy", ["110105490231002", "990101491231002"])
def test_citizen_id_15_digit_invalid(legacy):
    assert_error("invalid_citizen_id", validate_citizen_id, legacy)


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("130102199003071233", "130102********1233"),
        ("11010519491231002x", "110105********002X"),
        ("110105491231002", "110105********002X"),
        ("12345", "*****"),
    ],
)
def test_mask_citizen_id(value, masked):
    assert mask_citizen_id(value) == masked


def test_citizen_birth_date_and_sex():
    assert citizen_birth_date("11010519491231002X") == date(1949, 12, 31)
    assert citizen_sex("11010519491231002X") == "female"  # 17th digit 2
    assert citizen_sex("130102199003071233") == "male"  # 17th digit 3
    assert citizen_birth_date("130321860311519") == date(1986, 3, 11)
    assert_error("invalid_citizen_id", citizen_sex, "110105194912310021")
    assert_error("invalid_citizen_id", citizen_birth_date, citizen_id("130102", "19900230"))


@pytest.mark.parametrize(
    "value", ["11010519491231002X", "130102199003071233", "130321860311519", " 11010519491231002x "]
)
def test_birth_date_and_sex_of_a_number_validated_already_agree_with_the_checked_ones(value):
    number = validate_citizen_id(value)
    assert identifiers.birth_date_of_valid(number) == citizen_birth_date(value)
    assert identifiers.sex_of_valid(number) == citizen_sex(value)


# --- unified social credit codes ---------------------------------------------------------------

VALID_USCC = [
    "91350100M000100Y43",  # example of GB 32100-2015
    "91440300708461136T",  # enterprises
    "914403001922038216",
    "91330100799655058B",
    "91341000MA2N0ABGXX",
    "92510100MA61WJ3204",  # individual business
    "11610923MB2900168E",  # organs (机关)
    "1134082855783407XL",
    "11330283002982634F",
    "1142092201131905X1",
    "121526004609138637",  # public institutions (事业单位)
    "12100000400000624D",
    "51610700305332460K",  # social organisation (民政)
    "52610500MJU60350X1",
]


@pytest.mark.parametrize("code", VALID_USCC)
def test_uscc_valid(code):
    assert gb11714_check(code[8:16]) == code[16]  # the reference implementations agree
    assert gb32100_check(code[:17]) == code[17]
    assert validate_uscc(code) == code


def test_uscc_upper_cases():
    assert validate_uscc(" 91350100m000100y43 ") == "91350100M000100Y43"


@pytest.mark.parametrize("code", VALID_USCC)
def test_uscc_wrong_check_character(code):
    wrong = next(c for c in USCC_CHARS if c != code[17])
    err = assert_error("invalid_uscc", validate_uscc, code[:17] + wrong)
    assert "check character" in str(err)


def test_uscc_wrong_organization_code_check():
    body = "91350100M000100Y" + "5"  # organization code check should be 4
    assert gb11714_check("M000100Y") == "4"
    code = body + gb32100_check(body)  # the 18th character is consistent
    err = assert_error("invalid_uscc", validate_uscc, code)
    assert "GB 11714" in str(err)


@pytest.mark.parametrize("bad", ["I", "O", "Z", "S", "V", "i", "-", "*"])
def test_uscc_charset(bad):
    code = "91350100M000100Y4" + bad
    err = assert_error("invalid_uscc", validate_uscc, code)
    assert "characters" in str(err)


@pytest.mark.parametrize(
    "code",
    [
        "",
        "91350100M000100Y4",  # 17
        "91350100M000100Y433",  # 19
        "B1350100M000100Y43",  # undefined registration department
        "90350100M000100Y43",  # organization kind 0
        "9A350100M000100Y43",  # organization kind not a digit
        "913501A0M000100Y43",  # division part not digits
        "123456789012345678",
    ],
)
def test_uscc_invalid(code):
    assert_error("invalid_uscc", validate_uscc, code)


def test_uscc_structural_errors_even_with_matching_check_character():
    for head in ["B1350100M000100Y4", "90350100M000100Y4", "913501A0M000100Y4"]:
        assert_error("invalid_uscc", validate_uscc, head + gb32100_check(head))


@pytest.mark.parametrize(
    ("code", "kind", "warns"),
    [
        ("11610923MB2900168E", "organ", False),
        ("121526004609138637", "public_institution", False),
        ("121526004609138637", "organ", True),
        ("91350100M000100Y43", "organ", True),
        ("11610923MB2900168E", "public_institution", True),
        ("51610700305332460K", "public_institution", True),
        ("91350100M000100Y43", "enterprise", False),
        ("51610700305332460K", "mass_org", False),
        ("11610923MB2900168E", OrgKind.ORGAN, False),
        ("91350100M000100Y43", OrgKind.PUBLIC_INSTITUTION, True),
    ],
)
def test_uscc_kind_warning(code, kind, warns):
    warning = uscc_kind_warning(code, kind)
    if warns:
        assert isinstance(warning, str)
        assert code in warning
        assert "统一社会信用代码" in warning
        assert "unified social credit code" in warning
    else:
        assert warning is None


def test_error_is_value_error_with_code():
    err = IdentifierError("invalid_uscc", "bad")
    assert isinstance(err, ValueError)
    assert err.code == "invalid_uscc"
    assert str(err) == "bad"


def test_module_exports():
    for name in identifiers.__all__:
        assert hasattr(identifiers, name)


@pytest.mark.parametrize(
    ("code", "prefix"),
    [("130000", "13"), ("130100", "1301"), ("130102", "130102"), ("429000", "4290")],
)
def test_division_prefix_covers_the_subtree(code: str, prefix: str) -> None:
    assert identifiers.division_prefix(code) == prefix
    assert all(
        c.startswith(prefix)
        for c in ("130102", "130101", "429004")
        if identifiers.is_within(c, code)
    )


# --- citizen ID check characters ------------------------------------------------------------


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(st.text(alphabet="0123456789", min_size=17, max_size=17))
def test_check_char_of_any_17_digits(body: str) -> None:
    assert identifiers._citizen_check_char(body) == gb11643_check(body)


@pytest.mark.parametrize("body", ["1301021960010100", "130102196001010011", "١٣٠١٠٢١٩٦٠٠١٠١٠٠١"])
def test_check_char_of_other_bodies_as_before(body: str) -> None:
    def outcome(fn: Any) -> Any:
        try:
            return fn(body)
        except ValueError as exc:
            return type(exc), str(exc)

    assert outcome(identifiers._citizen_check_char) == outcome(gb11643_check)


def test_validate_citizen_id_over_generated_numbers() -> None:
    """Valid numbers pass normalised; each wrong last character is refused as before."""
    rng = random.Random(2260)
    counties = [c for c, d in identifiers._divisions().items() if d.level == 3][:400]
    for _ in range(5000):
        born = date(1900, 1, 1) + timedelta(days=rng.randrange(0, 45000))
        body = f"{rng.choice(counties)}{born:%Y%m%d}{rng.randrange(1000):03d}"
        good = body + gb11643_check(body)
        assert identifiers.validate_citizen_id(good.lower()) == good
        assert identifiers.compose_citizen_id(body[:6], born, int(body[14:])) == good
        wrong = body + rng.choice([c for c in "0123456789X" if c != good[17]])
        with pytest.raises(identifiers.IdentifierError, match="check digit"):
            identifiers.validate_citizen_id(wrong)
        legacy = body[:6] + body[8:]  # the 15-digit form of a 19xx birth
        if born.year < 2000:
            assert identifiers.validate_citizen_id(legacy) == good
