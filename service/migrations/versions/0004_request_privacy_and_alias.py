"""Record ids of requests stored as keyed hashes, the submitting identity, and the alias Lethe moves.

- ``requests.record_ids`` (clear record ids) becomes ``requests.record_hashes`` (keyed hashes, as subject ids
  always were): a stored request no longer names records in clear. A migration cannot re-key existing rows
  (the key lives outside the database), so their clear ids are dropped and the column starts empty: their
  jobs already resolved them, and certificates hold only hashes of the matched ids.
- ``requests.submitter_hash``: the keyed hash of the identity that submitted the request (a submitter may
  read only its own requests).
- ``models.serving_alias``: the MLflow alias given at registration, the one Lethe moves (NULL: the
  settings' ``serving_alias``).

Revision ID: 0004_request_privacy_and_alias
Revises: 0003_record_index
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_request_privacy_and_alias"
down_revision = "0003_record_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:  # SQLite: batch mode rebuilds the table
        batch.drop_column("record_ids")
        batch.add_column(sa.Column("record_hashes", sa.JSON, nullable=False, server_default="[]"))
        batch.add_column(sa.Column("submitter_hash", sa.String(64), nullable=True))
        batch.create_index("ix_requests_submitter_hash", ["submitter_hash"])
    op.add_column("models", sa.Column("serving_alias", sa.String(256), nullable=True))


def downgrade() -> None:
    op.drop_column("models", "serving_alias")
    with op.batch_alter_table("requests") as batch:
        batch.drop_index("ix_requests_submitter_hash")
        batch.drop_column("submitter_hash")
        batch.drop_column("record_hashes")
        batch.add_column(sa.Column("record_ids", sa.JSON, nullable=False, server_default="[]"))
