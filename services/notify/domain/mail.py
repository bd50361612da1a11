"""The e-mail of one event: a plain message in Chinese saying what changed, in which org and
division, and on which document. Pure: builds the message, sends nothing."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from contracts import identifiers
from services.notify.domain.model import is_alert

# What each event means, by its name (the type without prefix and version).
EVENT_TITLES: dict[str, str] = {
    "OrgRegistered": "机构设立",
    "OrgRenamed": "机构更名",
    "OrgFunctionsUpdated": "机构职能调整",
    "InternalUnitAdded": "增设内设机构",
    "InternalUnitRemoved": "撤销内设机构",
    "OrgMoved": "机构隶属关系调整",
    "OrgsMerged": "机构合并",
    "OrgAbolished": "机构撤销",
    "RegionLimitSet": "设定编制总量控制数",
    "QuotaApproved": "核定编制",
    "QuotaTransferred": "划转编制",
    "LeaderPostsSet": "核定领导职数",
    "QuotaUseNoticeIssued": "下达用编通知单",
    "QuotaUseNoticeCancelled": "撤销用编通知单",
    "QuotaUseNoticeExpired": "用编通知单已过期",
    "SlotOccupied": "占用编制",
    "SlotReleased": "释放编制",
    "SlotMoved": "调整占编",
    "SlotRequestRejected": "用编申请未通过",
    "OverQuotaDetected": "超编",
    "RegionLimitReached": "编制总量接近或达到控制数",
    "PersonEnrolled": "人员入编",
    "PersonTransferred": "人员调动",
    "PersonReleased": "人员出编",
    "PersonUpdated": "人员信息变更",
}

CATEGORIES = {
    "admin": "行政编制",
    "political_legal": "政法专项编制",
    "institutional": "事业编制",
    "institutional_csr": "参照公务员法管理事业编制",
    "support": "工勤编制",
}
LEADER_POSTS = {"principal": "正职", "deputy": "副职"}
RELEASE_REASONS = {
    "retired": "退休",
    "resigned": "辞职",
    "dismissed": "辞退",
    "deceased": "死亡",
    "transferred_out": "调出",
    "other": "其他",
}

# The fields worth a line of their own, in this order, with their labels.
_FIELDS: tuple[tuple[str, str], ...] = (
    ("name", "名称"),
    ("previous_name", "原名称"),
    ("citizen_id_masked", "公民身份号码"),
    ("category", "编制类别"),
    ("from_category", "原编制类别"),
    ("approved", "核定数"),
    ("previous_approved", "原核定数"),
    ("occupied", "实有人数"),
    ("amount", "划转数"),
    ("limit", "控制数"),
    ("previous_limit", "原控制数"),
    ("used", "已核定"),
    ("threshold_percent", "达到比例（%）"),
    ("principal", "正职职数"),
    ("deputy", "副职职数"),
    ("leader_post", "领导职务"),
    ("notice_no", "用编通知单号"),
    ("count", "用编数"),
    ("remaining", "剩余名额"),
    ("valid_until", "有效期至"),
    ("position", "职务"),
    ("reason", "原因"),
    ("changed", "变更项目"),
    ("code", "原因代码"),
    ("message", "说明"),
    ("effective_date", "生效日期"),
)
_ORG_FIELDS: tuple[tuple[str, str], ...] = (
    ("org_id", "单位"),
    ("from_org_id", "调出单位"),
    ("to_org_id", "调入单位"),
    ("target_org_id", "合并后单位"),
)
_VALUE_NAMES = {
    "category": CATEGORIES,
    "from_category": CATEGORIES,
    "leader_post": LEADER_POSTS,
    "reason": RELEASE_REASONS,
}


def event_name(event_type: str) -> str:
    """``bianzhi.quota.OverQuotaDetected.v1`` → ``OverQuotaDetected``."""
    parts = event_type.split(".")
    return parts[-2] if len(parts) >= 3 else event_type


def event_title(event_type: str) -> str:
    return EVENT_TITLES.get(event_name(event_type), event_name(event_type))


def division_label(code: str) -> str:
    """``130102`` → ``长安区（130102）``, with the names of its parents."""
    found = identifiers.division(code)
    if found is None:
        return code
    names = [found.name]
    parent = found.parent
    while parent:
        upper = identifiers.division(parent)
        if upper is None:
            break
        names.insert(0, upper.name)
        parent = upper.parent
    return f"{''.join(names)}（{code}）"


def _org_label(org_id: str, org_names: Mapping[str, str]) -> str:
    name = org_names.get(org_id)
    return f"{name}（{org_id}）" if name else f"{org_id}（名称未知）"


def _value(key: str, value: Any) -> str:
    if isinstance(value, list):
        return "、".join(str(v) for v in value)
    names = _VALUE_NAMES.get(key)
    if names is not None and isinstance(value, str):
        return names.get(value, value)
    return str(value)


def _time(value: Any) -> str:
    try:
        return datetime.fromisoformat(str(value)).strftime("%Y-%m-%d %H:%M:%S %z")
    except ValueError:
        return str(value)


def compose(
    envelope: Mapping[str, Any],
    *,
    subscription_id: str,
    subscriber: str,
    to: str,
    sender: str,
    org_names: Mapping[str, str],
    division_code: str | None,
    sent_at: datetime,
) -> EmailMessage:
    """The message for one event (a CloudEvent as a dict) to one subscription.

    ``org_names``: what notify knows of the orgs the event names; ``division_code``: where
    the event lies, when known. The ``Message-ID`` depends on the event and the subscription
    only, so a retried message can be recognised as the same one.
    """
    event_type = str(envelope.get("type", ""))
    data: Mapping[str, Any] = envelope.get("data") or {}
    title = event_title(event_type)
    alert = is_alert(event_type)

    orgs = [(label, str(data[f])) for f, label in _ORG_FIELDS if data.get(f)]
    orgs += [("被合并单位", str(v)) for v in data.get("source_org_ids") or ()]
    code = data.get("division_code") or division_code
    where = _org_label(orgs[0][1], org_names) if orgs else ""
    if not where and isinstance(code, str):
        where = division_label(code)

    lines = [f"{subscriber}：", ""]
    lines.append(f"编制管理系统{'预警' if alert else '变动通知'}：{title}。")
    lines.append("")
    lines += [f"{label}：{_org_label(org_id, org_names)}" for label, org_id in orgs]
    if isinstance(code, str) and code:
        lines.append(f"所在区划：{division_label(code)}")
    for key, label in _FIELDS:
        if key in data and data[key] not in (None, "", []):
            if key == "name" and event_name(event_type) == "InternalUnitAdded":
                label = "内设机构"
            elif key == "name" and event_name(event_type).startswith("Person"):
                label = "姓名"
            lines.append(f"{label}：{_value(key, data[key])}")
    document = data.get("document")
    if isinstance(document, Mapping) and document.get("title"):
        lines.append(
            f"依据文件：《{document.get('title')}》{document.get('number') or ''}"
            f"（{document.get('date') or '日期未载明'}）"
        )
    else:
        lines.append("依据文件：未载明")
    lines += [
        "",
        f"发生时间：{_time(envelope.get('time', ''))}",
        f"事件类型：{event_type}",
        f"事件编号：{envelope.get('id', '')}",
        f"订阅编号：{subscription_id}",
        "",
        "本邮件由编制管理系统自动发送，请勿直接回复；同一事件编号的邮件可能重复送达，以事件编号为准。",
    ]

    message = EmailMessage()
    prefix = "【编制预警】" if alert else "【编制变动】"
    message["Subject"] = f"{prefix}{title}" + (f" — {where}" if where else "")
    message["From"] = sender
    message["To"] = to
    message["Date"] = format_datetime(sent_at)
    message["Message-ID"] = f"<{envelope.get('id', '')}.{subscription_id}@bianzhi.notify>"
    message["X-Bianzhi-Event-Id"] = str(envelope.get("id", ""))
    message["X-Bianzhi-Event-Type"] = event_type
    message["X-Bianzhi-Subscription-Id"] = subscription_id
    message.set_content("\n".join(lines) + "\n", charset="utf-8")
    return message
