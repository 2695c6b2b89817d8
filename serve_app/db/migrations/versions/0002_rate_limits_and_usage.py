"""Per-key rate limits on api_keys, and the api_key_usage totals.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable (NULL: no limit), so existing keys keep working unlimited and the previous release,
    # which doesn't know the columns, can still insert rows.
    op.add_column("api_keys", sa.Column("rate_limit_rpm", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("rate_limit_tpm", sa.Integer(), nullable=True))
    op.create_table(
        "api_key_usage",
        sa.Column("key_id", sa.String(36), sa.ForeignKey("api_keys.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("requests", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("api_key_usage")
    # Batch mode: SQLite rebuilds the table to drop columns; PostgreSQL drops them in place.
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("rate_limit_tpm")
        batch.drop_column("rate_limit_rpm")
