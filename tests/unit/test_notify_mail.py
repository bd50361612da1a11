"""The e-mail of an event (pure composition) and the sealing of secrets."""

from __future__ import annotations

import base64
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.notify.adapters.secrets import KEY_FILE, SecretBox, SecretKeyError, load_key
from services.notify.domain.mail import compose, division_label
from services.notify.settings import NotifySettings

ORG = "3f6f5a3e-8c1e-4a43-9d6b-1b8f2f0c1a01"
TO_ORG = "7a1c9a2e-2b7d-4c0e-9f51-0d1f7c3b9e22"


def envelope(type_: str, data: dict[str, object]) -> dict[str, object]:
    return {
        "id": "8f0c6a52-4c59-4b8e-9a0e-3f1f7b1f2d11",
        "type": type_,
        "time": "2026-11-25T09:30:00+08:00",
        "data": data,
    }


def text_of(type_: str, data: dict[str, object], names: dict[str, str] | None = None) -> str:
    message = compose(
        envelope(type_, data),
        subscription_id="sub-1",
        subscriber="石家庄市财政局",
        to="caizheng@example.gov.cn",
        sender="notify@example.gov.cn",
        org_names=names or {},
        division_code=None,
        sent_at=datetime(2026, 11, 25, 1, 30, tzinfo=UTC),
    )
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return f"{message['Subject']}\n{part.get_content()}"


def test_a_transfer_names_both_orgs_the_person_and_the_document() -> None:
    text = text_of(
        "bianzhi.roster.PersonTransferred.v1",
        {
            "person_id": str(uuid.uuid4()),
            "citizen_id_masked": "130102********1233",
            "from_org_id": ORG,
            "to_org_id": TO_ORG,
            "category": "institutional",
            "from_category": "admin",
            "notice_no": "石编用〔2026〕7号",
            "effective_date": "2026-06-01",
            "document": {
                "title": "关于人员调动的通知",
                "number": "石人〔2026〕3号",
                "date": "2026-05-20",
            },
        },
        {ORG: "石家庄市长安区财政局"},
    )
    assert text.startswith("【编制变动】人员调动 — 石家庄市长安区财政局")
    assert f"调出单位：石家庄市长安区财政局（{ORG}）" in text
    assert f"调入单位：{TO_ORG}（名称未知）" in text
    assert "公民身份号码：130102********1233" in text
    assert "编制类别：事业编制" in text and "原编制类别：行政编制" in text
    assert "依据文件：《关于人员调动的通知》石人〔2026〕3号（2026-05-20）" in text


def test_a_region_alert_names_the_division_in_full() -> None:
    text = text_of(
        "bianzhi.quota.RegionLimitReached.v1",
        {
            "division_code": "130102",
            "category": "admin",
            "limit": 100,
            "used": 100,
            "threshold_percent": 100,
        },
    )
    assert text.startswith("【编制预警】编制总量接近或达到控制数 — 河北省石家庄市长安区（130102）")
    assert "所在区划：河北省石家庄市长安区（130102）" in text
    assert "控制数：100" in text and "达到比例（%）：100" in text


def test_an_unknown_event_type_still_makes_a_readable_message() -> None:
    text = text_of("bianzhi.orgs.SomethingNew.v3", {"org_id": ORG})
    assert text.startswith("【编制变动】SomethingNew")
    assert "事件类型：bianzhi.orgs.SomethingNew.v3" in text
    assert division_label("999999") == "999999"


# --- secrets ------------------------------------------------------------------------------------


def test_a_sealed_secret_opens_only_with_its_key_and_subscription() -> None:
    box = SecretBox(os.urandom(32))
    sealed = box.seal("whsec-0123456789", subscription_id="a")
    assert sealed.startswith("aesgcm1:") and "whsec" not in sealed
    assert sealed != box.seal("whsec-0123456789", subscription_id="a")  # a fresh nonce each time
    assert box.open(sealed, subscription_id="a") == "whsec-0123456789"
    with pytest.raises(SecretKeyError):
        box.open(sealed, subscription_id="b")
    with pytest.raises(SecretKeyError):
        SecretBox(os.urandom(32)).open(sealed, subscription_id="a")
    assert box.open("plain-from-before", subscription_id="a") == "plain-from-before"


def test_the_key_comes_from_settings_a_file_or_the_embedded_data_dir(tmp_path: Path) -> None:
    key = os.urandom(32)
    text = base64.b64encode(key).decode()
    assert load_key(NotifySettings(secrets_key=text), data_dir=tmp_path, embedded=False) == key
    path = tmp_path / "mounted.key"
    path.write_text(text + "\n")
    assert load_key(NotifySettings(secrets_key_file=path), data_dir=tmp_path, embedded=False) == key
    with pytest.raises(SecretKeyError, match="32 bytes"):
        load_key(NotifySettings(secrets_key="c2hvcnQ="), data_dir=tmp_path, embedded=False)
    with pytest.raises(SecretKeyError, match="SECRETS_KEY_FILE"):
        load_key(NotifySettings(), data_dir=tmp_path, embedded=False)

    data = tmp_path / "data"
    made = load_key(NotifySettings(), data_dir=data, embedded=True)
    assert len(made) == 32
    assert (data / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert load_key(NotifySettings(), data_dir=data, embedded=True) == made  # kept, not remade
