"""The scheduler: which job runs next, who holds it, and what happens to jobs whose process died.

- Claims: a QUEUED job whose coalescing window has closed, of a model lineage no other job is running on,
  becomes RUNNING with ``attempts + 1``. A fresh job (attempt 1) starts from the head of the lineage now
  (the store's ``serving_version``); a resumed one keeps the base version it started from.
- Jobs of one model lineage run one at a time, each from the version the previous one produced.
- Recovery: RUNNING jobs left by a dead process are re-queued (or FAILED after ``MAX_ATTEMPTS``); the
  pipeline's stages are idempotent and MLflow registration is exactly-once per job id.
- A job that raised is FAILED with its error, an event and an audit entry.
"""

from __future__ import annotations

import logging
import threading

from service import store as db
from service.context import PipelineContext
from service.domain import EventKind, JobState

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # a job that killed its process this often is marked FAILED instead of retried forever
IDLE_WAIT_S = 1.0  # upper bound of a worker's wait between store checks when nothing wakes it


class Scheduler:
    def __init__(self, ctx: PipelineContext):
        self.ctx = ctx
        self._claim_lock = threading.Lock()
        self._busy_models: set[str] = set()

    def recover(self) -> None:
        """Re-queue jobs a dead process left RUNNING (FAILED once they used up their attempts)."""
        with self.ctx.store.write() as conn:
            for job in db.running_jobs(conn):
                request_ids = db.job_request_ids(conn, job.job_id)
                if job.attempts >= MAX_ATTEMPTS:
                    message = f"gave up after {job.attempts} attempts that did not finish"
                    db.update_job(conn, job.job_id, state=JobState.FAILED.value, message=message)
                    db.add_event(conn, job.job_id, request_ids, EventKind.TERMINAL.value, JobState.FAILED.value,
                                 job.stage, job.progress, message)
                    continue
                db.update_job(conn, job.job_id, state=JobState.QUEUED.value, window_closes_at=db.utcnow())
                db.add_event(conn, job.job_id, request_ids, EventKind.PROGRESS.value, JobState.QUEUED.value,
                             job.stage, job.progress, "re-queued after a restart; resuming")
                log.warning("re-queued job %s left RUNNING by a previous process", job.job_id)

    def idle_timeout_s(self) -> float:
        """How long a worker may wait before the next claim: until the next window closes, at most a second."""
        with self.ctx.store.read() as conn:
            closes = db.next_window_close(conn)
        if closes is None:
            return IDLE_WAIT_S
        return min(IDLE_WAIT_S, max(0.01, (closes - db.utcnow()).total_seconds()))

    def claim(self) -> tuple[str, str] | None:
        """Claim the next runnable job: ``(job_id, model_name)``, or None when there is none."""
        with self._claim_lock:
            with self.ctx.store.read() as conn:
                candidate = db.next_runnable_job(conn, db.utcnow(), sorted(self._busy_models))
            if candidate is None:
                return None
            with self.ctx.store.write() as conn:
                job = db.get_job(conn, candidate.job_id)
                if job.state != JobState.QUEUED.value:
                    return None
                base = job.base_version
                if job.attempts == 0:  # a fresh job starts from the head of the lineage now
                    base = db.get_model(conn, job.model_name).serving_version
                db.update_job(conn, job.job_id, state=JobState.RUNNING.value, attempts=job.attempts + 1,
                              base_version=base, stage="resolve", progress=0.0)
                db.add_event(conn, job.job_id, db.job_request_ids(conn, job.job_id), EventKind.PROGRESS.value,
                             JobState.RUNNING.value, "resolve", 0.0,
                             f"started from version {base} (attempt {job.attempts + 1})")
            self._busy_models.add(job.model_name)
            return job.job_id, job.model_name

    def release(self, model_name: str) -> None:
        """The claimed job of ``model_name`` ended (in any state): its lineage may run the next one."""
        with self._claim_lock:
            self._busy_models.discard(model_name)

    def fail(self, job_id: str, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        with self.ctx.store.write() as conn:
            job = db.get_job(conn, job_id)
            request_ids = db.job_request_ids(conn, job_id)
            db.update_job(conn, job_id, state=JobState.FAILED.value, message=message)
            db.add_event(conn, job_id, request_ids, EventKind.TERMINAL.value, JobState.FAILED.value, job.stage,
                         job.progress, message)
            self.ctx.audit.append(conn, "job_failed", {"job_id": job_id, "model_name": job.model_name,
                                                       "request_ids": list(request_ids), "error": message})
