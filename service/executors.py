"""Executors: where a claimed job runs (``LETHE_EXECUTOR``).

- ``inprocess`` (default): ``worker_threads`` threads of this process claim and run jobs.
- ``subprocess``: each job runs in a fresh ``lethe worker --once --job-id ID --attempt N`` process, the
  same contract as a Kubernetes Job (:mod:`service.worker`); at most ``worker_threads`` at once.
- ``kubernetes``: one ``batch/v1`` Job per unlearning job (:mod:`service.kubernetes_jobs`); at most
  ``worker_threads`` Jobs in flight per replica.
- ``external``: this process runs no job; separately deployed ``lethe worker`` processes claim them.

Every executor has the same contract: :meth:`start` begins claiming from the scheduler; each job runs
:func:`service.pipeline.run_job` under a lease (:mod:`service.scheduler`) to a terminal state; a job that
raises is FAILED; :meth:`stop` stops claiming and waits for running jobs up to a grace period (a job still
running then keeps its lease until its holder dies, and is then reclaimed: its stages are idempotent).

The dispatching executors (``subprocess``, ``kubernetes``) claim a job under their own lease
(``dispatch:<owner>``), start its worker, renew the lease until the worker takes it over, and watch the
worker to its end. When the worker died without finishing (its process exited, or its Job failed before it
took over) the lease is voided so the job is reclaimed at once; otherwise the lease's expiry decides.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

from service import store as db
from service.context import PipelineContext
from service.domain import JobState
from service.pipeline import run_job
from service.prefetch import ImportancePrefetcher
from service.scheduler import DISPATCH_PREFIX, Claim, Heartbeat, LeaseLost, Scheduler

log = logging.getLogger(__name__)
LAUNCH_RETRY_S = 5.0  # pause after a failed launch (e.g. the Kubernetes API refused), before claiming again


def run_claimed(scheduler: Scheduler, claim: Claim) -> JobState:
    """Run one claimed job to its end under a heartbeat, with every write fenced by the lease.

    Returns the terminal state (FAILED when the pipeline raised). Raises :class:`LeaseLost` when the lease
    was lost: the job is someone else's now and nothing more was written.
    """
    ctx = scheduler.ctx
    ctx.metrics.jobs_in_flight.inc()
    try:
        with Heartbeat(scheduler, claim):
            try:
                state = run_job(scheduler.fenced(claim), claim.job_id)
            except LeaseLost:
                raise
            except Exception as error:  # one job's failure must not stop the worker
                log.exception("job %s failed", claim.job_id)
                if not scheduler.fail(claim, error):
                    raise LeaseLost(f"job {claim.job_id}: lease lost before the failure could be recorded") from error
                return JobState.FAILED
        after_job(ctx, claim)
        return state
    finally:
        ctx.metrics.jobs_in_flight.dec()


def after_job(ctx: PipelineContext, claim: Claim) -> None:
    """Work that follows a finished job in the process that ran it: index the lineage's new dataset version
    so intake resolves the next requests without loading it (:mod:`service.record_index`), and purge a
    superseded version an interrupted earlier attempt left live (:mod:`service.housekeeping`)."""
    from service.housekeeping import purge_superseded
    from service.record_index import index_serving

    try:
        index_serving(ctx, claim.model_name)
    except Exception:  # intake indexes lazily as well; a failure here costs one dataset load there
        log.exception("indexing %s after job %s failed", claim.model_name, claim.job_id)
    try:
        purge_superseded(ctx, claim.model_name)
    except Exception:  # the engine's housekeeping retries
        log.exception("purging superseded data of %s failed", claim.model_name)


class Executor(Protocol):
    def start(self) -> None: ...

    def stop(self, grace_s: float) -> bool: ...


class _ThreadedExecutor:
    """``worker_threads`` threads, each looping: claim, then :meth:`_run` the claim."""

    name = "worker"

    def __init__(self, scheduler: Scheduler, stopping: threading.Event):
        self.scheduler, self.ctx, self._stopping = scheduler, scheduler.ctx, stopping
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.ctx.settings.worker_threads):
            worker = threading.Thread(target=self._work, name=f"lethe-{self.name}-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self, grace_s: float) -> bool:
        """Wait up to ``grace_s`` for the workers (``stopping`` must be set); True when all ended."""
        deadline = time.monotonic() + grace_s
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        self._workers = [w for w in self._workers if w.is_alive()]
        if not self._workers:
            self.scheduler.close()
        return not self._workers

    def _claim(self) -> Claim | None:
        return self.scheduler.claim()

    def _work(self) -> None:
        while not self._stopping.is_set():
            self.ctx.metrics.heartbeat()
            looked_at = db.utcnow()
            try:
                claim = self._claim()
            except Exception:  # the store is unreachable for now: retry, do not die
                log.exception("claiming a job failed; retrying")
                self._stopping.wait(1.0)
                continue
            if claim is None:
                # The generation is read AFTER the claim: the claim's own write transaction, which changed
                # nothing, is not a change to wake for (read before it, it woke this wait at once: an idle
                # worker spun at a full core). A job committed before this point is in the store and its
                # window bounds the timeout; one committed after it wakes the wait.
                generation = self.ctx.store.generation()
                self.ctx.store.wait_for_change(generation, self.scheduler.idle_timeout_s(looked_at))
                continue
            try:
                self._run(claim)
            except LeaseLost as error:
                log.warning("%s", error)

    def _run(self, claim: Claim) -> None:
        raise NotImplementedError


class InProcessExecutor(_ThreadedExecutor):
    """Jobs run in this process's worker threads (the embedded default; ``lethe worker`` uses it too), with
    the importance prefetcher giving way to each job and scheduled after a successful one."""

    def __init__(self, scheduler: Scheduler, stopping: threading.Event,
                 prefetcher: ImportancePrefetcher | None = None):
        super().__init__(scheduler, stopping)
        self.prefetcher = prefetcher

    def _run(self, claim: Claim) -> None:
        if self.prefetcher is not None:  # background work gives way to a real job
            self.prefetcher.job_started()
        try:
            if run_claimed(self.scheduler, claim) is JobState.SUCCEEDED and self.prefetcher is not None:
                self.prefetcher.schedule(claim.model_name)  # I_D of the version this job registered
        finally:
            if self.prefetcher is not None:
                self.prefetcher.job_finished()


class ExternalExecutor:
    """Runs nothing here: ``lethe worker`` processes elsewhere claim the jobs from the shared store."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def start(self) -> None:
        log.info("executor 'external': jobs are run by separately deployed `lethe worker` processes")

    def stop(self, grace_s: float) -> bool:
        return True


class Launcher(Protocol):
    """Starts the worker of one claimed job and waits for it (subprocess, Kubernetes Job)."""

    def launch(self, claim: Claim) -> object:
        """Start (or find again, after a retried create) the worker of ``claim``; returns a handle."""

    def wait(self, handle: object, stopping: threading.Event, poll_s: float) -> bool | None:
        """Block until the worker ended: True finished cleanly, False failed; None when ``stopping`` was set
        first (the worker goes on without us)."""


class DispatchingExecutor(_ThreadedExecutor):
    """Claims under a ``dispatch:`` lease, launches the worker, keeps the lease alive until the worker takes
    it over, and voids it when the worker is known dead without having finished."""

    name = "dispatch"

    def __init__(self, scheduler: Scheduler, stopping: threading.Event, launcher: Launcher):
        super().__init__(scheduler, stopping)
        self.launcher = launcher
        self.dispatch_owner = f"{DISPATCH_PREFIX}{scheduler.owner}"

    def _claim(self) -> Claim | None:
        return self.scheduler.claim(owner=self.dispatch_owner)

    def _run(self, claim: Claim) -> None:
        handed_over = threading.Event()
        watcher_stop = threading.Event()

        def keep_until_handed_over() -> None:  # renew our lease until the worker's adopt() changes the owner
            while not watcher_stop.wait(self.scheduler.lease_s / 3):
                try:
                    if not self.scheduler.renew(claim):
                        handed_over.set()
                        return
                except Exception:
                    log.exception("job %s: renewing the dispatch lease failed; retrying", claim.job_id)

        keeper = threading.Thread(target=keep_until_handed_over, name=f"lethe-dispatch-lease-{claim.job_id}",
                                  daemon=True)
        keeper.start()
        try:
            handle = self.launcher.launch(claim)
        except Exception:
            watcher_stop.set()
            keeper.join(5)
            log.exception("job %s: launching its worker failed; queued again, retrying in %.0f s", claim.job_id,
                          LAUNCH_RETRY_S)
            self.scheduler.release(claim)
            self._stopping.wait(LAUNCH_RETRY_S)
            return
        try:
            finished = self.launcher.wait(handle, self._stopping, poll_s=1.0)
        except Exception:
            log.exception("job %s: watching its worker failed; its lease decides", claim.job_id)
            return
        finally:
            watcher_stop.set()
            keeper.join(5)
        if finished is None:
            return  # shutting down: the worker (or our lease's expiry) carries on
        state = self.scheduler.job_state(claim.job_id)
        if state is None or state[0] != JobState.RUNNING.value or state[1] != claim.attempt:
            return  # it ended (or moved on to another attempt): nothing to do
        owner = state[2] or ""
        if owner == self.dispatch_owner or self.launcher_knows_worker_dead(finished):
            if self.scheduler.expire(claim, owner):
                log.warning("job %s: its worker (%s) ended without finishing; released for reclaim", claim.job_id,
                            owner)

    def launcher_knows_worker_dead(self, finished: bool) -> bool:
        return getattr(self.launcher, "worker_dead_when_done", False)


class SubprocessLauncher:
    """``lethe worker --once --job-id ID --attempt N`` in a fresh process (``spawn``-like: a new interpreter,
    never a ``fork`` of a process holding gRPC state); it inherits this process's environment."""

    worker_dead_when_done = True  # we waited on the process: once it exited, it holds nothing

    def __init__(self, settings):
        self.settings = settings
        self.log_dir = settings.state_dir / "worker-logs"

    def command(self, claim: Claim) -> list[str]:
        return [sys.executable, "-m", "service.cli", "worker", "--once", "--job-id", claim.job_id,
                "--attempt", str(claim.attempt)]

    def launch(self, claim: Claim) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{claim.job_id}-a{claim.attempt}.log"
        with open(log_path, "ab") as output:
            process = subprocess.Popen(self.command(claim), stdout=output, stderr=subprocess.STDOUT,
                                       env={**os.environ, **self.settings.as_environment()},
                                       cwd=Path(__file__).resolve().parents[1])
        log.info("job %s attempt %d: worker process %d (log %s)", claim.job_id, claim.attempt, process.pid, log_path)
        return process

    def wait(self, handle: subprocess.Popen, stopping: threading.Event, poll_s: float) -> bool | None:
        while handle.poll() is None:
            if stopping.wait(poll_s):
                return None
        from service.worker import EXIT_OK

        if handle.returncode != EXIT_OK:
            log.warning("worker process %d exited with %d", handle.pid, handle.returncode)
        return handle.returncode == EXIT_OK


def build_executor(scheduler: Scheduler, stopping: threading.Event,
                   prefetcher: ImportancePrefetcher | None = None) -> Executor:
    """The executor ``LETHE_EXECUTOR`` names."""
    settings = scheduler.ctx.settings
    if settings.executor == "inprocess":
        return InProcessExecutor(scheduler, stopping, prefetcher)
    if settings.executor == "external":
        return ExternalExecutor(scheduler)
    if settings.executor == "subprocess":
        return DispatchingExecutor(scheduler, stopping, SubprocessLauncher(settings))
    if settings.executor == "kubernetes":
        from service.kubernetes_jobs import KubernetesLauncher

        return DispatchingExecutor(scheduler, stopping, KubernetesLauncher(settings))
    raise ValueError(f"unknown executor {settings.executor!r}")
