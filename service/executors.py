"""Executors: where a claimed job runs (``LETHE_EXECUTOR``). ``inprocess``: worker threads of this process.

Every executor has the same contract: :meth:`start` begins claiming jobs from the scheduler, each job runs
:func:`service.pipeline.run_job` to a terminal state, a job that raises is FAILED by the scheduler, and
:meth:`stop` stops claiming and waits for running jobs up to a grace period (a job still running then
stays RUNNING in the store and is resumed later: its stages are idempotent).
"""

from __future__ import annotations

import logging
import threading
import time

from service.context import PipelineContext
from service.domain import JobState
from service.pipeline import run_job
from service.prefetch import ImportancePrefetcher
from service.scheduler import Scheduler

log = logging.getLogger(__name__)


class InProcessExecutor:
    """``settings.worker_threads`` threads, each looping: claim, run, release."""

    def __init__(self, ctx: PipelineContext, scheduler: Scheduler, stopping: threading.Event,
                 prefetcher: ImportancePrefetcher | None = None):
        self.ctx, self.scheduler, self._stopping, self.prefetcher = ctx, scheduler, stopping, prefetcher
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.ctx.settings.worker_threads):
            worker = threading.Thread(target=self._work, name=f"lethe-worker-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self, grace_s: float) -> bool:
        """Wait up to ``grace_s`` for the workers (``stopping`` must be set); True when all ended."""
        deadline = time.monotonic() + grace_s
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        self._workers = [w for w in self._workers if w.is_alive()]
        return not self._workers

    def _work(self) -> None:
        while not self._stopping.is_set():
            self.ctx.metrics.heartbeat()
            generation = self.ctx.store.generation()
            claimed = self.scheduler.claim()
            if claimed is None:
                self.ctx.store.wait_for_change(generation, self.scheduler.idle_timeout_s())
                continue
            job_id, model_name = claimed
            if self.prefetcher is not None:  # background work gives way to a real job
                self.prefetcher.job_started()
            self.ctx.metrics.jobs_in_flight.inc()
            try:
                if run_job(self.ctx, job_id) is JobState.SUCCEEDED and self.prefetcher is not None:
                    self.prefetcher.schedule(model_name)  # I_D of the version this job registered
            except Exception as error:  # any failure of one job must not stop the worker
                log.exception("job %s failed", job_id)
                self.scheduler.fail(job_id, error)
            finally:
                self.ctx.metrics.jobs_in_flight.dec()
                self.scheduler.release(model_name)
                if self.prefetcher is not None:
                    self.prefetcher.job_finished()
