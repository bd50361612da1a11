"""One valid ``data`` example per message type, in wire form (JSON values), for any test to reuse.

``EXAMPLES`` holds every command type, ``EVENT_EXAMPLES`` every event type, keyed by ``type``.
The identifiers are real-valid: citizen ID ``11010519491231002X`` (born 1949-12-31, female),
division ``130102`` (石家庄市长安区).
"""

from __future__ import annotations

from typing import Any

CITIZEN_ID = "11010519491231002X"
CITIZEN_ID_MASKED = "110105********002X"
DIVISION = "130102"
ORG_A = "3f6c1a52-0b1e-4e8a-9d3a-6c5b2f7e1a01"
ORG_B = "3f6c1a52-0b1e-4e8a-9d3a-6c5b2f7e1a02"
ORG_C = "3f6c1a52-0b1e-4e8a-9d3a-6c5b2f7e1a03"
UNIT = "7a1d9e40-5c2b-4f17-8e6d-2b9c4a1f3e01"
PERSON = "c2e4b7a9-1f3d-4a6b-8c0e-5d7f9a1b3c01"
REQUEST = "e9b1c3d5-7f2a-4b6c-8d0e-1f3a5b7c9d01"
SUBSCRIPTION = "5b8d2f4a-6c1e-4a3b-9d7f-0e2c4a6b8d01"
EVENT_ID = "8f0c6a52-4c59-4b8e-9a0e-3f1f7b1f2d11"
NOTICE = "冀编用〔2026〕001号"
DOCUMENT: dict[str, str] = {
    "title": "关于核定长安区发展和改革局机构编制的批复",
    "number": "冀编办〔2026〕12号",
    "date": "2026-03-01",
}

EXAMPLES: dict[str, dict[str, Any]] = {
    # orgs
    "bianzhi.orgs.RegisterOrg.v1": {
        "org_id": ORG_A,
        "name": "石家庄市长安区发展和改革局",
        "kind": "organ",
        "division_code": DIVISION,
        "functions": ["拟订并组织实施国民经济和社会发展规划"],
        "document": DOCUMENT,
        "effective_date": "2026-03-01",
    },
    "bianzhi.orgs.RenameOrg.v1": {
        "org_id": ORG_A,
        "name": "石家庄市长安区发展改革局",
        "alt_names": ["长安区物价局"],
        "document": DOCUMENT,
    },
    "bianzhi.orgs.UpdateFunctions.v1": {
        "org_id": ORG_A,
        "functions": ["负责全区价格监督管理"],
        "document": DOCUMENT,
    },
    "bianzhi.orgs.AddInternalUnit.v1": {"org_id": ORG_A, "unit_id": UNIT, "name": "办公室"},
    "bianzhi.orgs.RemoveInternalUnit.v1": {"org_id": ORG_A, "unit_id": UNIT},
    "bianzhi.orgs.MoveOrg.v1": {"org_id": ORG_A, "parent_org_id": ORG_C, "document": DOCUMENT},
    "bianzhi.orgs.MergeOrgs.v1": {
        "source_org_ids": [ORG_B],
        "target_org_id": ORG_A,
        "document": DOCUMENT,
    },
    "bianzhi.orgs.AbolishOrg.v1": {"org_id": ORG_B, "document": DOCUMENT},
    # quota
    "bianzhi.quota.SetRegionLimit.v1": {
        "division_code": DIVISION,
        "category": "admin",
        "limit": 1200,
        "document": DOCUMENT,
        "effective_date": "2026-03-01",
    },
    "bianzhi.quota.ApproveQuota.v1": {
        "org_id": ORG_A,
        "category": "admin",
        "approved": 30,
        "document": DOCUMENT,
        "effective_date": "2026-03-01",
    },
    "bianzhi.quota.TransferQuota.v1": {
        "from_org_id": ORG_A,
        "to_org_id": ORG_B,
        "category": "admin",
        "amount": 2,
        "document": DOCUMENT,
    },
    "bianzhi.quota.SetLeaderPosts.v1": {
        "org_id": ORG_A,
        "principal": 1,
        "deputy": 3,
        "document": DOCUMENT,
    },
    "bianzhi.quota.IssueQuotaUseNotice.v1": {
        "notice_no": NOTICE,
        "org_id": ORG_A,
        "category": "admin",
        "count": 3,
        "valid_until": "2026-12-31",
        "document": DOCUMENT,
    },
    "bianzhi.quota.CancelQuotaUseNotice.v1": {
        "notice_no": NOTICE,
        "org_id": ORG_A,
        "reason": "招考计划取消",
    },
    "bianzhi.quota.OccupySlot.v1": {
        "request_id": REQUEST,
        "person_id": PERSON,
        "org_id": ORG_A,
        "category": "admin",
        "notice_no": NOTICE,
        "leader_post": "deputy",
        "unit_id": UNIT,
    },
    "bianzhi.quota.ReleaseSlot.v1": {
        "request_id": REQUEST,
        "person_id": PERSON,
        "org_id": ORG_A,
        "category": "admin",
    },
    "bianzhi.quota.MoveSlot.v1": {
        "request_id": REQUEST,
        "person_id": PERSON,
        "from_org_id": ORG_A,
        "to_org_id": ORG_B,
        "category": "admin",
        "notice_no": NOTICE,
    },
    "bianzhi.quota.CancelSlotRequest.v1": {
        "request_id": "c1a8b7e2-5d3f-4a61-9e0b-2f7c6d5e4a31",
        "cancels_request_id": REQUEST,
        "person_id": PERSON,
        "org_id": ORG_B,
    },
    "bianzhi.quota.MergeEstablishments.v1": {
        "request_id": REQUEST,
        "source_org_ids": [ORG_B],
        "target_org_id": ORG_A,
        "document": DOCUMENT,
        "effective_date": "2026-04-01",
    },
    "bianzhi.quota.CloseEstablishment.v1": {
        "request_id": REQUEST,
        "org_id": ORG_B,
        "document": DOCUMENT,
    },
    # roster
    "bianzhi.roster.EnrolPerson.v1": {
        "citizen_id": CITIZEN_ID,
        "person_id": PERSON,
        "name": "王秀兰",
        "org_id": ORG_A,
        "category": "admin",
        "notice_no": NOTICE,
        "position": "科员",
        "unit_id": UNIT,
        "entry_method": "exam",
        "effective_date": "2026-04-01",
        "sex": "female",
        "birth_date": "1949-12-31",
        "ethnicity": "汉族",
        "education": "大学本科",
        "political_status": "中共党员",
        "phone": "13800138000",
    },
    "bianzhi.roster.TransferPerson.v1": {
        "citizen_id": CITIZEN_ID,
        "to_org_id": ORG_B,
        "category": "admin",
        "notice_no": NOTICE,
        "effective_date": "2026-06-01",
        "document": DOCUMENT,
        "position": "副局长",
        "leader_post": "deputy",
    },
    "bianzhi.roster.ReleasePerson.v1": {
        "citizen_id": CITIZEN_ID,
        "reason": "retired",
        "effective_date": "2026-12-31",
        "document": DOCUMENT,
    },
    "bianzhi.roster.UpdatePerson.v1": {
        "citizen_id": CITIZEN_ID,
        "education": "硕士研究生",
        "phone": "0311-8866 1234",
    },
    # notify
    "bianzhi.notify.Subscribe.v1": {
        "subscription_id": SUBSCRIPTION,
        "subscriber": "石家庄市人力资源和社会保障局",
        "event_types": ["bianzhi.roster.*", "bianzhi.quota.QuotaApproved.v1"],
        "division_code": DIVISION,
        "channel": {
            "kind": "webhook",
            "url": "https://hr.example.gov.cn/hooks/bianzhi",
            "secret": "s3cr3t-0123456789abcdef",
        },
    },
    "bianzhi.notify.Unsubscribe.v1": {"subscription_id": SUBSCRIPTION},
    "bianzhi.notify.ResendDelivery.v1": {"delivery_id": "d3b1c6f0-2a4e-4f8b-9c1d-7e5a3b2c1d09"},
}

EVENT_EXAMPLES: dict[str, dict[str, Any]] = {
    # results
    "bianzhi.CommandCompleted.v1": {
        "command_id": EVENT_ID,
        "command_type": "bianzhi.quota.ApproveQuota.v1",
        "subject": ORG_A,
        "events": [REQUEST],
    },
    "bianzhi.CommandRejected.v1": {
        "command_id": EVENT_ID,
        "command_type": "bianzhi.roster.EnrolPerson.v1",
        "code": "no_vacancy",
        "message": "编制已满 / no vacancy",
        "details": {"approved": 30, "occupied": 30},
    },
    # orgs
    "bianzhi.orgs.OrgRegistered.v1": {
        "org_id": ORG_A,
        "name": "石家庄市长安区发展和改革局",
        "kind": "organ",
        "division_code": DIVISION,
        "document": DOCUMENT,
        "effective_date": "2026-03-01",
    },
    "bianzhi.orgs.OrgRenamed.v1": {
        "org_id": ORG_A,
        "name": "石家庄市长安区发展改革局",
        "previous_name": "石家庄市长安区发展和改革局",
        "document": DOCUMENT,
        "effective_date": "2026-03-01",
    },
    "bianzhi.orgs.OrgFunctionsUpdated.v1": {
        "org_id": ORG_A,
        "functions": ["负责全区价格监督管理"],
        "document": DOCUMENT,
        "effective_date": "2026-03-01",
    },
    "bianzhi.orgs.InternalUnitAdded.v1": {
        "org_id": ORG_A,
        "unit_id": UNIT,
        "name": "办公室",
        "effective_date": "2026-03-01",
    },
    "bianzhi.orgs.InternalUnitRemoved.v1": {
        "org_id": ORG_A,
        "unit_id": UNIT,
        "name": "办公室",
        "effective_date": "2026-03-01",
    },
    "bianzhi.orgs.OrgMoved.v1": {
        "org_id": ORG_A,
        "parent_org_id": ORG_C,
        "division_code": DIVISION,
        "document": DOCUMENT,
        "effective_date": "2026-03-01",
    },
    "bianzhi.orgs.OrgsMerged.v1": {
        "source_org_ids": [ORG_B],
        "target_org_id": ORG_A,
        "document": DOCUMENT,
        "effective_date": "2026-03-01",
    },
    "bianzhi.orgs.OrgAbolished.v1": {
        "org_id": ORG_B,
        "document": DOCUMENT,
        "effective_date": "2026-03-01",
    },
    # quota
    "bianzhi.quota.RegionLimitSet.v1": {
        "division_code": DIVISION,
        "category": "admin",
        "limit": 1200,
        "previous_limit": 1100,
        "document": DOCUMENT,
        "effective_date": "2026-03-01",
    },
    "bianzhi.quota.QuotaApproved.v1": {
        "org_id": ORG_A,
        "category": "admin",
        "approved": 30,
        "previous_approved": 28,
        "document": DOCUMENT,
        "effective_date": "2026-03-01",
    },
    "bianzhi.quota.QuotaTransferred.v1": {
        "from_org_id": ORG_A,
        "to_org_id": ORG_B,
        "category": "admin",
        "amount": 2,
        "from_approved": 28,
        "to_approved": 12,
        "document": DOCUMENT,
        "effective_date": "2026-03-01",
    },
    "bianzhi.quota.LeaderPostsSet.v1": {
        "org_id": ORG_A,
        "principal": 1,
        "deputy": 3,
        "document": DOCUMENT,
        "effective_date": "2026-03-01",
    },
    "bianzhi.quota.QuotaUseNoticeIssued.v1": {
        "notice_no": NOTICE,
        "org_id": ORG_A,
        "category": "admin",
        "count": 3,
        "valid_until": "2026-12-31",
        "document": DOCUMENT,
    },
    "bianzhi.quota.QuotaUseNoticeCancelled.v1": {
        "notice_no": NOTICE,
        "org_id": ORG_A,
        "category": "admin",
        "remaining": 2,
        "reason": "招考计划取消",
    },
    "bianzhi.quota.QuotaUseNoticeExpired.v1": {
        "notice_no": NOTICE,
        "org_id": ORG_A,
        "category": "admin",
        "valid_until": "2026-12-31",
        "remaining": 1,
    },
    "bianzhi.quota.SlotOccupied.v1": {
        "request_id": REQUEST,
        "person_id": PERSON,
        "org_id": ORG_A,
        "category": "admin",
        "notice_no": NOTICE,
        "occupied": 29,
    },
    "bianzhi.quota.SlotReleased.v1": {
        "request_id": REQUEST,
        "person_id": PERSON,
        "org_id": ORG_A,
        "category": "admin",
        "occupied": 28,
    },
    "bianzhi.quota.SlotMoved.v1": {
        "request_id": REQUEST,
        "person_id": PERSON,
        "from_org_id": ORG_A,
        "to_org_id": ORG_B,
        "from_category": "admin",
        "category": "admin",
        "notice_no": NOTICE,
    },
    "bianzhi.quota.SlotRequestRejected.v1": {
        "request_id": REQUEST,
        "request_type": "bianzhi.quota.OccupySlot.v1",
        "person_id": PERSON,
        "org_id": ORG_A,
        "code": "no_vacancy",
        "message": "编制已满 / no vacancy",
        "details": {"approved": 30, "occupied": 30},
    },
    "bianzhi.quota.EstablishmentsMerged.v1": {
        "request_id": REQUEST,
        "source_org_ids": [ORG_B],
        "target_org_id": ORG_A,
        "categories": [
            {
                "category": "admin",
                "approved": 5,
                "occupied": 2,
                "reserved": 2,
                "target_approved": 8,
                "target_occupied": 3,
                "target_reserved": 2,
            }
        ],
        "slots_moved": 2,
        "notices_moved": [NOTICE],
        "document": DOCUMENT,
        "effective_date": "2026-04-01",
    },
    "bianzhi.quota.EstablishmentClosed.v1": {
        "request_id": REQUEST,
        "org_id": ORG_B,
        "document": DOCUMENT,
        "effective_date": "2026-04-01",
    },
    "bianzhi.quota.OverQuotaDetected.v1": {
        "org_id": ORG_A,
        "category": "admin",
        "approved": 28,
        "occupied": 30,
    },
    "bianzhi.quota.RegionLimitReached.v1": {
        "division_code": DIVISION,
        "category": "admin",
        "limit": 1200,
        "used": 1080,
        "threshold_percent": 90,
    },
    # roster
    "bianzhi.roster.PersonEnrolled.v1": {
        "person_id": PERSON,
        "citizen_id_masked": CITIZEN_ID_MASKED,
        "name": "王秀兰",
        "org_id": ORG_A,
        "category": "admin",
        "notice_no": NOTICE,
        "entry_method": "exam",
        "effective_date": "2026-04-01",
        "sex": "female",
    },
    "bianzhi.roster.PersonTransferred.v1": {
        "person_id": PERSON,
        "citizen_id_masked": CITIZEN_ID_MASKED,
        "from_org_id": ORG_A,
        "to_org_id": ORG_B,
        "category": "admin",
        "notice_no": NOTICE,
        "effective_date": "2026-06-01",
        "document": DOCUMENT,
    },
    "bianzhi.roster.PersonReleased.v1": {
        "person_id": PERSON,
        "citizen_id_masked": CITIZEN_ID_MASKED,
        "org_id": ORG_B,
        "category": "admin",
        "reason": "retired",
        "effective_date": "2026-12-31",
    },
    "bianzhi.roster.PersonUpdated.v1": {
        "person_id": PERSON,
        "citizen_id_masked": CITIZEN_ID_MASKED,
        "org_id": ORG_A,
        "changed": ["education", "phone"],
        "education": "硕士研究生",
        "effective_date": "2026-05-01",
    },
    # notify
    "bianzhi.notify.SubscriptionCreated.v1": {
        "subscription_id": SUBSCRIPTION,
        "subscriber": "石家庄市人力资源和社会保障局",
        "event_types": ["bianzhi.roster.*"],
        "division_code": DIVISION,
        "channel": {"kind": "webhook", "url": "https://hr.example.gov.cn/hooks/bianzhi"},
    },
    "bianzhi.notify.SubscriptionRemoved.v1": {"subscription_id": SUBSCRIPTION},
    "bianzhi.notify.NotificationDelivered.v1": {
        "subscription_id": SUBSCRIPTION,
        "event_id": EVENT_ID,
        "event_type": "bianzhi.roster.PersonEnrolled.v1",
        "attempts": 1,
    },
    "bianzhi.notify.NotificationFailed.v1": {
        "subscription_id": SUBSCRIPTION,
        "event_id": EVENT_ID,
        "event_type": "bianzhi.roster.PersonEnrolled.v1",
        "attempts": 8,
        "error": "HTTP 503 from https://hr.example.gov.cn/hooks/bianzhi",
    },
    "bianzhi.notify.DeliveryResent.v1": {
        "subscription_id": SUBSCRIPTION,
        "delivery_id": "d3b1c6f0-2a4e-4f8b-9c1d-7e5a3b2c1d09",
        "event_id": EVENT_ID,
        "event_type": "bianzhi.roster.PersonEnrolled.v1",
        "previous_status": "failed",
        "previous_attempts": 8,
        "resends": 1,
    },
}

# audit (contracts/audit.py): each service's signed checkpoint of its audit chain head
AUDIT_HEAD = "9c56cc51b374c3ba189210d5b6d4bf57790d351c96c47c02190ecf1e430635ab"
EVENT_EXAMPLES.update(
    {
        f"bianzhi.{service}.AuditCheckpoint.v1": {
            "service": service,
            "head_seq": 1000,
            "head_hash": AUDIT_HEAD,
            "at": "2026-11-25T09:30:00+00:00",
            "kid": f"{service}-audit-2026",
            "signature": "c2lnbmF0dXJlIG9mIHRoZSBjaGVja3BvaW50",
        }
        for service in ("orgs", "quota", "roster", "notify")
    }
)

# roster, restricted topic (contracts/roster.py): each public Person* event with the full
# citizen ID and the id of the public event it accompanies
EVENT_EXAMPLES.update(
    {
        f"bianzhi.roster.{name}Restricted.v1": {
            **EVENT_EXAMPLES[f"bianzhi.roster.{name}.v1"],
            "citizen_id": CITIZEN_ID,
            "event_id": EVENT_ID,
        }
        for name in ("PersonEnrolled", "PersonTransferred", "PersonReleased", "PersonUpdated")
    }
)
