"""Housekeeping that no single job can promise: copies of erased data that outlived a crash or live on
another host.

- :func:`purge_superseded`: a dataset version that is neither its lineage's serving version's nor the base
  of a job in flight still holds records a later version erased. A job deletes its base version right after
  its audit commit; a worker killed in that instant leaves it live, and this deletes it (MLflow's copy,
  this host's copy, the index rows).
- :func:`delete_removed_copies`: with several hosts, the purging worker deletes its own copies and
  MLflow's; every other process deletes its own here. Versions removed in the last ``RETRY_WINDOW``
  also get their MLflow copy deleted again (a no-op when it is gone): a job marks its base version removed
  in its audit transaction and deletes the copies right after, so a worker killed in between leaves them
  for this.

The engine runs both every ``HOUSEKEEPING_S``; a worker runs :func:`purge_superseded` after each job.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from service import store as db
from service.context import PipelineContext
from service.domain import JobState

log = logging.getLogger(__name__)


def purge_superseded(ctx: PipelineContext, model_name: str | None = None) -> int:
    """Delete live dataset versions no serving version or job in flight needs; returns how many."""
    from service.pipeline import purge_dataset_copies

    with ctx.store.read() as conn:
        models = {row.model_name: row.serving_version for row in db.list_models(conn)}
        in_flight = {(job.model_name, job.base_version) for job in db.list_jobs(
            conn, [JobState.RUNNING.value, JobState.QUEUED.value], model_name, None, 100_000) if job.attempts}
        live = db.live_dataset_versions(conn, model_name)
    doomed = [row for row in live if row.model_name in models and row.model_version != models[row.model_name]
              and (row.model_name, row.model_version) not in in_flight]
    if doomed:
        log.warning("purging %d superseded dataset version(s) left live by an interrupted job", len(doomed))
        purge_dataset_copies(ctx, doomed)
    return len(doomed)


RETRY_WINDOW = timedelta(days=1)


def delete_removed_copies(ctx: PipelineContext) -> None:
    with ctx.store.read() as conn:
        removed = db.removed_dataset_versions(conn)
    recent = db.utcnow() - RETRY_WINDOW
    for row in removed:
        ctx.catalog.delete_local(row.path)
        if row.mlflow_artifact_uri and db.as_utc(row.removed_at) > recent:
            ctx.registry.delete_artifact(row.mlflow_artifact_uri)
