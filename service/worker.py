"""``lethe worker``: run unlearning jobs from the job store, talking only to the store and MLflow.

    lethe worker                               # loop: claim, run, repeat (a worker pool, e.g. a Deployment)
    lethe worker --once --job-id ID [--attempt N]   # one job, then exit (a Kubernetes Job; the subprocess executor)

No gRPC port is opened. Configuration is the same ``LETHE_*`` settings as ``lethe serve``; the job store URL,
the MLflow tracking URI and both keys must be the API replicas' (in Kubernetes, one Secret via ``envFrom``).

``--once`` takes the job's lease from the executor that started it (``--attempt``, :meth:`Scheduler.adopt`),
or claims it like any worker when it is QUEUED and runnable or its lease has expired; while another live
holder has it, it waits (up to ``2 x job_lease_s``) for that lease to lapse. Exit status (the Kubernetes
Job's pod failure policy keys on it):

====  ====================================================================================================
 0    the job reached a terminal state other than FAILED (SUCCEEDED, REJECTED_BY_VERIFICATION, CANCELLED),
      now or before; or another attempt of it owns it (this one is superseded): nothing left to do here
 3    ``EXIT_JOB_FAILED``, NOT retryable: the job is FAILED (it raised: e.g. a bad input, a broken dataset,
      or it used up ``job_max_attempts``). Running the pod again cannot help; the pod failure policy
      fails the Job at once on this code
 2    usage error (bad arguments, unknown job id): not retryable either
75    ``EXIT_RETRY`` (EX_TEMPFAIL), retryable: the job could not be claimed in time (another live holder,
      its lineage busy), the lease was lost mid-run, or the store or MLflow was unreachable
====  ====================================================================================================

A worker killed by a signal (OOM, node drain) exits by the signal: retryable; its lease lapses and the job
is reclaimed with ``attempts + 1``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from service.domain import JobState

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_JOB_FAILED = 3
EXIT_RETRY = 75


def run_once(settings, job_id: str, attempt: int | None = None) -> int:
    """Run one job (``lethe worker --once``); returns the exit status documented in the module docstring."""
    from service.engine import Engine
    from service.executors import run_claimed
    from service.scheduler import LeaseLost

    engine = Engine(settings.model_copy(update={"executor": "external"}))
    scheduler = engine.scheduler
    try:
        deadline = time.monotonic() + 2 * settings.job_lease_s + 5
        while True:
            state = scheduler.job_state(job_id)
            if state is None:
                log.error("no job %r in the job store", job_id)
                return EXIT_USAGE
            if JobState(state[0]).terminal:
                log.info("job %s is already %s", job_id, state[0])
                return EXIT_JOB_FAILED if state[0] == JobState.FAILED.value else EXIT_OK
            if attempt is not None and state[1] > attempt and state[0] == JobState.RUNNING.value:
                log.info("job %s: attempt %d superseded by attempt %d", job_id, attempt, state[1])
                return EXIT_OK
            claim = scheduler.adopt(job_id, attempt) if attempt is not None else None
            claim = claim or scheduler.claim(job_id=job_id)
            if claim is not None:
                break
            if time.monotonic() > deadline:
                log.warning("job %s could not be claimed (held by %s); retry later", job_id, state[2])
                return EXIT_RETRY
            time.sleep(min(2.0, settings.job_lease_s / 3))
        log.info("job %s attempt %d claimed by %s", job_id, claim.attempt, claim.owner)
        try:
            final = run_claimed(scheduler, claim)
        except LeaseLost as error:
            log.warning("%s", error)
            return EXIT_RETRY
        log.info("job %s ended %s", job_id, final.value)
        return EXIT_JOB_FAILED if final is JobState.FAILED else EXIT_OK
    except Exception:
        log.exception("worker for job %s could not run it", job_id)
        return EXIT_RETRY
    finally:
        scheduler.close()
        engine.store.dispose()


def run_loop(settings, stop: threading.Event | None = None, grace_s: float = 30.0) -> int:
    """Claim and run jobs until SIGTERM/SIGINT (or ``stop``); ``worker_threads`` jobs at once."""
    from service.engine import Engine

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda number, _frame: (log.info("signal %d: stopping", number), stop.set()))
    engine = Engine(settings.model_copy(update={"executor": "inprocess"}))
    engine.start()
    log.info("lethe worker %s claiming jobs from the store (%d thread(s))", engine.owner, settings.worker_threads)
    try:
        stop.wait()
    finally:
        engine.stop(grace_s)
        engine.store.dispose()
    return EXIT_OK
