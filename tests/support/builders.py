"""Valid commands for tests, with any field overridden."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any

from contracts.common import Document
from contracts.orgs import RegisterOrg

DOC = Document(title="关于设立机构的批复", number="冀编〔2026〕1号", date=date(2026, 1, 5))


def register_org(org_id: uuid.UUID | None = None, **kw: Any) -> RegisterOrg:
    """A valid RegisterOrg: an organ in 石家庄市长安区 (130102)."""
    fields: dict[str, Any] = {
        "org_id": org_id or uuid.uuid4(),
        "name": "石家庄市长安区财政局",
        "kind": "organ",
        "division_code": "130102",
        "document": DOC,
    }
    fields.update(kw)
    return RegisterOrg.model_validate(fields)
