"""The job store as it stood before migrations: requests, jobs, events, audit log, certificates, tombstones,
dataset versions, models.

Revision ID: 0001_initial_schema
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_initial_schema"
down_revision = None
branch_labels = None
depends_on = None

_ID = 256


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("model_name", sa.String(_ID), primary_key=True),
        sa.Column("registered_version", sa.String(32), nullable=False),
        sa.Column("task_type", sa.String(32), nullable=False),
        sa.Column("num_classes", sa.Integer),
        sa.Column("policy", sa.JSON, nullable=False),
        sa.Column("training", sa.JSON, nullable=False),
        sa.Column("serving_version", sa.String(32), nullable=False),
        _ts("registered_at"),
    )
    op.create_table(
        "dataset_versions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model_name", sa.String(_ID), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("records", sa.Integer, nullable=False),
        sa.Column("model_version", sa.String(32)),
        sa.Column("job_id", sa.String(64)),
        sa.Column("mlflow_artifact_uri", sa.Text),
        _ts("created_at"),
        _ts("removed_at", nullable=True),
        sa.UniqueConstraint("model_name", "version"),
    )
    op.create_index("ix_dataset_versions_model_name", "dataset_versions", ["model_name"])
    op.create_table(
        "requests",
        sa.Column("request_id", sa.String(_ID), primary_key=True),
        sa.Column("payload_digest", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("subject_hashes", sa.JSON, nullable=False),
        sa.Column("record_ids", sa.JSON, nullable=False),
        sa.Column("classes", sa.JSON, nullable=False),
        sa.Column("model_names", sa.JSON, nullable=False),
        sa.Column("method", sa.String(64)),
        sa.Column("method_params", sa.JSON, nullable=False),
        sa.Column("policy_overrides", sa.JSON, nullable=False),
        _ts("deadline", nullable=True),
        _ts("received_at"),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("first_event_seq", sa.Integer, nullable=False),
        sa.Column("outcome_job_ids", sa.JSON, nullable=False),
        _ts("completed_at", nullable=True),
    )
    op.create_index("ix_requests_state", "requests", ["state"])
    op.create_table(
        "jobs",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("model_name", sa.String(_ID), nullable=False),
        sa.Column("coalesce_key", sa.String(64), nullable=False),
        sa.Column("selector", sa.String(16), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("method_params", sa.JSON, nullable=False),
        sa.Column("policy_overrides", sa.JSON, nullable=False),
        sa.Column("base_version", sa.String(32)),
        sa.Column("result_version", sa.String(32)),
        sa.Column("records", sa.Integer, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("evidence", sa.JSON, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        _ts("window_closes_at"),
        _ts("created_at"),
        _ts("updated_at"),
    )
    op.create_index("ix_jobs_model_name", "jobs", ["model_name"])
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_table(
        "job_requests",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(_ID), primary_key=True),
    )
    op.create_index("ix_job_requests_request_id", "job_requests", ["request_id"])
    op.create_table(
        "events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("request_ids", sa.JSON, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("fraction", sa.Float, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("certificate_id", sa.String(64)),
        _ts("time"),
    )
    op.create_index("ix_events_job_id", "events", ["job_id"])
    op.create_table(
        "event_requests",
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("request_id", sa.String(_ID), primary_key=True),
    )
    op.create_index("ix_event_requests_request_id", "event_requests", ["request_id"])
    op.create_table(
        "certificates",
        sa.Column("certificate_id", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(_ID), nullable=False),
        sa.Column("model_name", sa.String(_ID), nullable=False),
        sa.Column("job_id", sa.String(64)),
        sa.Column("body_json", sa.Text, nullable=False),
        sa.Column("signature", sa.String(64), nullable=False),
        _ts("issued_at"),
        sa.UniqueConstraint("request_id", "model_name"),
    )
    op.create_index("ix_certificates_request_id", "certificates", ["request_id"])
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("body_json", sa.Text, nullable=False),
        sa.Column("entry_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("signature", sa.String(64), nullable=False),
    )
    op.create_table(
        "tombstones",
        sa.Column("record_hash", sa.String(64), primary_key=True),
        sa.Column("model_name", sa.String(_ID), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        _ts("created_at"),
    )
