"""when an unanswered merge or abolish step is sent again (org_sagas.step_due_at)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 14:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Sagas already waiting keep it empty: their step is sent again at the first sweep.
    with op.batch_alter_table("org_sagas", schema=None) as batch_op:
        batch_op.add_column(sa.Column("step_due_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("org_sagas", schema=None) as batch_op:
        batch_op.drop_column("step_due_at")
