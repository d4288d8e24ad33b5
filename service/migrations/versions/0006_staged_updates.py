"""Updates and rectifications: where a request's records are staged until a job learns them.

``requests.payload`` (JSON, NULL for erasures): per model, the staged Parquet file of the request's new or
corrected records (local path, digest, row count, MLflow artifact URI for workers on other hosts). The
records themselves (with their clear subject ids) live only in that staged training-data copy, never in the
job store.

Revision ID: 0006_staged_updates
Revises: 0005_operator_controls
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_staged_updates"
down_revision = "0005_operator_controls"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("requests", sa.Column("payload", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("payload")
