"""which personal-data key computed the stored blind indexes

The roster records it at its first start with this revision (from the stored data when people
are already on the roster) and checks it at every start, so that rotating the personal-data key
(a new key encrypts, the old one is kept as a retired key) never changes how a citizen ID is
looked up.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 21:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "personal_data_keys",
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("purpose"),
    )


def downgrade() -> None:
    op.drop_table("personal_data_keys")
