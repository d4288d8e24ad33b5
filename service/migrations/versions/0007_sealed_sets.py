"""Sealed verification sets of erasures (issue 13, "erased stays erased").

``sealed_sets``: one row per (erasure job, request): where its encrypted forget records lie (a file under
``<state_dir>/sealed`` and an MLflow copy), the per-request AES-GCM key (wrapped), its fingerprint, the
retention window and, once the window ends, when and why the key was destroyed (:mod:`service.sealed`).

Revision ID: 0007_sealed_sets
Revises: 0006_staged_updates
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_sealed_sets"
down_revision = "0006_staged_updates"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sealed_sets",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(256), primary_key=True),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("classes", sa.JSON, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("path", sa.Text),
        sa.Column("artifact_uri", sa.Text),
        sa.Column("wrapped_key", sa.Text),
        sa.Column("key_fingerprint", sa.String(64)),
        sa.Column("retention_days", sa.Float, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("destroyed_reason", sa.Text),
    )
    op.create_index("ix_sealed_sets_model_name", "sealed_sets", ["model_name"])


def downgrade() -> None:
    op.drop_index("ix_sealed_sets_model_name", table_name="sealed_sets")
    op.drop_table("sealed_sets")
