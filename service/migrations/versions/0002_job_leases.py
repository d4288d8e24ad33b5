"""Job leases (owner, expiry) and one RUNNING job per model lineage, enforced by the database.

A claimed job carries its holder (``lease_owner``) and ``lease_expires_at``, renewed by heartbeats; a job
whose lease expired is reclaimed by any worker (crash recovery without a start-up sweep). The partial
unique index makes a second RUNNING job of one model impossible whatever the number of processes: it is the
per-lineage serialisation, not a lock in some process's memory.

Revision ID: 0002_job_leases
Revises: 0001_initial_schema
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_job_leases"
down_revision = "0001_initial_schema"
branch_labels = None
depends_on = None

RUNNING = sa.text("state = 'RUNNING'")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("lease_owner", sa.String(160), nullable=True))
    op.add_column("jobs", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("uq_jobs_one_running_per_model", "jobs", ["model_name"], unique=True,
                    sqlite_where=RUNNING, postgresql_where=RUNNING)
