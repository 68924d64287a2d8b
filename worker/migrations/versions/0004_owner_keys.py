"""jobs.owner, datasets.owner: the API key (its name) that created them, for per-key quotas,
fair publishing and per-key dataset deduplication (issue 11). Rows from before are owned by
``anonymous``, the key name of an open API.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("jobs", "datasets"):
        op.add_column(
            table,
            sa.Column("owner", sa.String(64), nullable=False, server_default="anonymous"),
        )
    op.create_index("ix_jobs_owner_status", "jobs", ["owner", "status"])
    op.create_index("ix_datasets_owner_sha256", "datasets", ["owner", "sha256"])


def downgrade() -> None:
    op.drop_index("ix_datasets_owner_sha256", table_name="datasets")
    op.drop_index("ix_jobs_owner_status", table_name="jobs")
    for table in ("datasets", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("owner")
