"""Operator controls: a request's reason for a cancel or close, and which attempt of a request each job is.

- ``requests.state_reason``: the operator's reason when a request is CANCELLED or CLOSED (states beside
  PENDING and COMPLETED, no schema change needed for them: the column is a string).
- ``job_requests.attempt``: 1 for the jobs of the submission, N for those of the (N-1)th RetryRequest, so a
  retry is recorded as attempt N and a repeated retry call finds the attempt it already created.

Revision ID: 0005_operator_controls
Revises: 0004_request_privacy_and_alias
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_operator_controls"
down_revision = "0004_request_privacy_and_alias"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("requests", sa.Column("state_reason", sa.Text, nullable=True))
    op.add_column("job_requests", sa.Column("attempt", sa.Integer, nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("job_requests") as batch:
        batch.drop_column("attempt")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("state_reason")
