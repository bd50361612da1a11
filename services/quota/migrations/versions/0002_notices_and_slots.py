"""quota-use notices, the slots people hold, and slot requests by request_id

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 15:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notices",
        sa.Column("notice_no", sa.String(length=64), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("category", sa.String(length=32), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("used", sa.Integer(), nullable=False),
        sa.Column("valid_until", sa.Date(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.CheckConstraint("count >= 1", name="ck_notices_count"),
        sa.CheckConstraint("used >= 0 AND used <= count", name="ck_notices_used"),
        sa.PrimaryKeyConstraint("notice_no"),
    )
    with op.batch_alter_table("notices", schema=None) as batch_op:
        batch_op.create_index("ix_notices_org", ["org_id", "category"], unique=False)
        batch_op.create_index("ix_notices_open", ["status", "valid_until"], unique=False)

    op.create_table(
        "slots",
        sa.Column("person_id", sa.String(length=36), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("category", sa.String(length=32), nullable=False),
        sa.Column("unit_id", sa.String(length=36), nullable=False),
        sa.Column("leader_post", sa.String(length=16), nullable=True),
        sa.Column("notice_no", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("occupied_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("person_id"),
    )
    with op.batch_alter_table("slots", schema=None) as batch_op:
        batch_op.create_index("ix_slots_org", ["org_id", "category"], unique=False)

    op.create_table(
        "slot_requests",
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("request_type", sa.String(length=200), nullable=False),
        sa.Column("command_id", sa.String(length=200), nullable=False),
        sa.Column("person_id", sa.String(length=36), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=True),
        sa.Column("event_type", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("request_id"),
    )


def downgrade() -> None:
    op.drop_table("slot_requests")
    with op.batch_alter_table("slots", schema=None) as batch_op:
        batch_op.drop_index("ix_slots_org")
    op.drop_table("slots")
    with op.batch_alter_table("notices", schema=None) as batch_op:
        batch_op.drop_index("ix_notices_open")
        batch_op.drop_index("ix_notices_org")
    op.drop_table("notices")
