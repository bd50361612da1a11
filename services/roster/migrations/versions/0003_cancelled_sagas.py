"""a transfer or release whose overdue step was cancelled ends as ``cancelled``

Until now such a saga ended as ``timed_out``, the status an enrolment also has while its
compensation is on the way to quota; ``timed_out`` now means only the latter.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 02:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_sagas = sa.table("sagas", sa.column("kind", sa.String), sa.column("status", sa.String))


def _rename(old: str, new: str) -> None:
    op.execute(
        _sagas.update()
        .where(_sagas.c.kind.in_(("transfer", "release")), _sagas.c.status == old)
        .values(status=new)
    )


def upgrade() -> None:
    _rename("timed_out", "cancelled")


def downgrade() -> None:
    _rename("cancelled", "timed_out")
