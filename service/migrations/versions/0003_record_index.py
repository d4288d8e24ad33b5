"""Record index: keyed subject and record hashes (and labels) of every live dataset version, so that intake
resolves a request with an indexed query instead of loading a dataset.

``dataset_versions.indexed_at`` is set once a version's rows are all in; rows of a removed version are
deleted with it (no keyed hash of an erased subject outlives its data here).

Revision ID: 0003_record_index
Revises: 0002_job_leases
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_record_index"
down_revision = "0002_job_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dataset_versions", sa.Column("indexed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "record_index",
        sa.Column("dataset_id", sa.Integer, primary_key=True),
        sa.Column("record_hash", sa.String(64), primary_key=True),
        sa.Column("subject_hash", sa.String(64), nullable=False),
        sa.Column("label", sa.Integer, nullable=True),
    )
    op.create_index("ix_record_index_subject", "record_index", ["subject_hash", "dataset_id"])
    op.create_index("ix_record_index_label", "record_index", ["dataset_id", "label"])
