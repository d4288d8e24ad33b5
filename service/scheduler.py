"""The scheduler: which job runs next, who holds it (a lease), and how a dead holder's job is taken over.

Everything here is decided by the job store, so it holds with any number of processes (issue 11):

- **Claims.** A claim is one transaction over :func:`service.store.claim_candidates` (``FOR UPDATE SKIP
  LOCKED``): a QUEUED job whose coalescing window has closed, of a model lineage with no RUNNING job,
  becomes RUNNING with ``attempts + 1`` and a lease (``lease_owner``, ``lease_expires_at``). A fresh job
  (attempt 1) starts from the head of the lineage now (the store's ``serving_version``); a resumed one keeps
  the base version it started from.
- **One job per lineage.** The claim locks the model's row (``FOR UPDATE SKIP LOCKED``) and re-checks that
  nothing of the model is RUNNING; a partial unique index (one RUNNING job per model) makes the invariant a
  database constraint, not a promise of this code.
- **Leases.** The holder renews its lease every third of ``job_lease_s`` (:class:`Heartbeat`). Every write
  the pipeline makes for a claimed job goes through a :class:`FencedStore`, which locks the job's row and
  checks the lease is still this holder's (same owner, same attempt) inside the same transaction; a holder
  that lost its lease (it stalled past expiry and someone else reclaimed the job) therefore cannot commit
  anything, and stops with :class:`LeaseLost`.
- **Crash recovery is lease expiry.** A RUNNING job whose lease expired is reclaimed by whichever worker
  claims next (``attempts + 1``; FAILED once ``job_max_attempts`` claims did not finish). Nothing is
  re-queued at start-up: with several processes, "RUNNING at my start" does not mean "its holder is dead".
  On SQLite (one host by construction) a dead holder is also recognised at once by its released liveness
  lock (:mod:`service.liveness`), so an embedded restart resumes without waiting out the lease.
- **Hand-over.** The ``subprocess`` and ``kubernetes`` executors claim a job under their own lease, start a
  ``lethe worker --once --job-id ID --attempt N`` process, and keep the lease alive until the worker takes
  it over (:meth:`Scheduler.adopt`).

A job that raised is FAILED by :meth:`Scheduler.fail`, with an event and an audit entry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from service import store as db
from service.context import PipelineContext
from service.domain import EventKind, JobState
from service.liveness import LivenessLocks

log = logging.getLogger(__name__)
IDLE_WAIT_S = 1.0  # upper bound of a worker's wait between store checks when nothing wakes it
DISPATCH_PREFIX = "dispatch:"  # lease owners that are executors holding a job for the worker they start


class LeaseLost(RuntimeError):
    """This holder's lease on a job is gone (expired and reclaimed, or the job ended elsewhere): it must stop
    working on the job without writing anything more. Never marks the job FAILED."""


@dataclass(frozen=True)
class Claim:
    """A held lease: ``attempt`` is the job's ``attempts`` value the lease was taken with (the fencing token)."""

    job_id: str
    model_name: str
    attempt: int
    owner: str


class Scheduler:
    """Claims, leases and failures for one process. ``owner`` identifies this process in every lease."""

    def __init__(self, ctx: PipelineContext, owner: str):
        self.ctx = ctx
        self.owner = owner
        self.lease_s = ctx.settings.job_lease_s
        self.liveness = LivenessLocks.for_store(ctx.store)

    # ------------------------------------------------------------------------------------------ claims
    def claim(self, job_id: str | None = None, owner: str | None = None) -> Claim | None:
        """Claim the next runnable (or reclaimable) job, or ``job_id`` only; None when there is none."""
        owner = owner or self.owner
        self.liveness.hold(owner)
        dead = self.liveness.dead_owners(self._lease_owners())
        try:
            with self.ctx.store.write() as conn:
                for dead_owner in dead:  # SQLite only: its process is gone, its leases are void now
                    _expire_owner(conn, dead_owner)
                return self._claim_in(conn, db.utcnow(), job_id, owner)
        except IntegrityError as error:  # a second RUNNING job of one model: the database said no
            log.warning("claim lost a race on a model lineage (%s); will retry", error.orig)
            return None

    def _claim_in(self, conn: Connection, now, job_id: str | None, owner: str) -> Claim | None:
        # Row locks first (jobs, then the lineage's model row); events and audit entries, which take the
        # store's log lock, only after every row lock (service.store's deadlock rule).
        chosen, exhausted = None, []
        for row in db.claim_candidates(conn, now, job_id):
            if row.state == JobState.RUNNING.value:
                if row.attempts >= self.ctx.settings.job_max_attempts:
                    exhausted.append(row)
                    continue
                chosen = row
                break
            if db.lock_lineage(conn, row.model_name) and not db.lineage_running(conn, row.model_name):
                chosen = row
                break
        for row in exhausted:
            self._fail_exhausted(conn, row)
        if chosen is None:
            return None
        attempt = chosen.attempts + 1
        expires = now + timedelta(seconds=self.lease_s)
        request_ids = db.job_request_ids(conn, chosen.job_id)
        if chosen.state == JobState.RUNNING.value:
            db.take_lease(conn, chosen.job_id, owner, expires, attempts=attempt)
            db.add_event(conn, chosen.job_id, request_ids, EventKind.PROGRESS.value, JobState.RUNNING.value,
                         chosen.stage, chosen.progress,
                         f"the lease of {chosen.lease_owner or 'a previous process'} expired; resumed by {owner} "
                         f"(attempt {attempt} of {self.ctx.settings.job_max_attempts})")
            log.warning("reclaimed job %s from %s (attempt %d)", chosen.job_id, chosen.lease_owner, attempt)
        else:
            base = chosen.base_version
            if chosen.attempts == 0:  # a fresh job starts from the head of the lineage now
                base = db.get_model(conn, chosen.model_name).serving_version
            db.take_lease(conn, chosen.job_id, owner, expires, state=JobState.RUNNING.value, attempts=attempt,
                          base_version=base, stage="resolve", progress=0.0)
            db.add_event(conn, chosen.job_id, request_ids, EventKind.PROGRESS.value, JobState.RUNNING.value,
                         "resolve", 0.0, f"started from version {base} (attempt {attempt}) by {owner}")
        return Claim(chosen.job_id, chosen.model_name, attempt, owner)

    def _fail_exhausted(self, conn: Connection, row) -> None:
        message = f"gave up after {row.attempts} attempts that did not finish (LETHE_JOB_MAX_ATTEMPTS)"
        request_ids = db.job_request_ids(conn, row.job_id)
        db.update_job(conn, row.job_id, state=JobState.FAILED.value, message=message, lease_expires_at=None)
        db.add_event(conn, row.job_id, request_ids, EventKind.TERMINAL.value, JobState.FAILED.value, row.stage,
                     row.progress, message)
        self.ctx.audit.append(conn, "job_failed", {"job_id": row.job_id, "model_name": row.model_name,
                                                   "request_ids": list(request_ids), "error": message})
        log.error("job %s: %s", row.job_id, message)

    def adopt(self, job_id: str, attempt: int, owner: str | None = None) -> Claim | None:
        """Take over the lease an executor holds for this attempt of ``job_id`` (the worker it started)."""
        owner = owner or self.owner
        self.liveness.hold(owner)
        with self.ctx.store.write() as conn:
            row = db.lock_job(conn, job_id)
            if (row is None or row.state != JobState.RUNNING.value or row.attempts != attempt
                    or not (row.lease_owner or "").startswith(DISPATCH_PREFIX)):
                return None
            expires = db.utcnow() + timedelta(seconds=self.lease_s)
            if not db.hand_over_lease(conn, job_id, row.lease_owner, attempt, owner, expires):
                return None
            db.add_event(conn, job_id, db.job_request_ids(conn, job_id), EventKind.PROGRESS.value,
                         JobState.RUNNING.value, row.stage, row.progress, f"worker {owner} took over attempt {attempt}")
            return Claim(job_id, row.model_name, attempt, owner)

    def _lease_owners(self) -> set[str]:
        if not self.liveness.enabled:
            return set()
        with self.ctx.store.read() as conn:
            return {row.lease_owner for row in db.running_leases(conn) if row.lease_owner}

    # ------------------------------------------------------------------------------------------ leases
    def renew(self, claim: Claim) -> bool:
        """Extend ``claim``'s lease by ``job_lease_s``; False once it is lost."""
        with self.ctx.store.write() as conn:
            return db.renew_lease(conn, claim.job_id, claim.owner, claim.attempt,
                                  db.utcnow() + timedelta(seconds=self.lease_s))

    def expire(self, claim: Claim, owner: str | None = None) -> bool:
        """Void a lease whose holder is known to be gone (``owner``, default the claim's), so the job is
        reclaimed at once instead of after ``job_lease_s``."""
        with self.ctx.store.write() as conn:
            return db.expire_lease(conn, claim.job_id, owner or claim.owner, claim.attempt)

    def release(self, claim: Claim) -> bool:
        """Give a claim back unused (its worker could not be started): QUEUED again, attempt not counted."""
        with self.ctx.store.write() as conn:
            return db.release_claim(conn, claim.job_id, claim.owner, claim.attempt)

    def fenced(self, claim: Claim) -> PipelineContext:
        """The context the pipeline runs a claimed job with: every write is fenced by the claim's lease."""
        return replace(self.ctx, store=FencedStore(self.ctx.store, claim))

    def job_state(self, job_id: str) -> tuple[str, int, str | None] | None:
        """(state, attempts, lease owner) of a job, or None when it does not exist."""
        with self.ctx.store.read() as conn:
            row = db.get_job(conn, job_id)
        return None if row is None else (row.state, row.attempts, row.lease_owner)

    def idle_timeout_s(self, looked_at: datetime) -> float:
        """How long a worker that found nothing to claim at ``looked_at`` may wait before the next claim: until
        the next window that was not yet closed then closes, at most :data:`IDLE_WAIT_S`. A job whose window
        had closed and that still was not claimable waits for its lineage's running job, whose end is a write
        that wakes the worker (or for that job's lease to expire, within the bound)."""
        with self.ctx.store.read() as conn:
            closes = db.next_window_close(conn, after=looked_at)
        if closes is None:
            return IDLE_WAIT_S
        return min(IDLE_WAIT_S, max(0.01, (closes - db.utcnow()).total_seconds()))

    def fail(self, claim: Claim, error: Exception) -> bool:
        """Mark the claimed job FAILED (event, audit entry); False, writing nothing, when the lease is lost."""
        message = f"{type(error).__name__}: {error}"
        with self.ctx.store.write() as conn:
            job = db.lock_job(conn, claim.job_id)
            if not _holds(job, claim):
                return False
            request_ids = db.job_request_ids(conn, claim.job_id)
            db.update_job(conn, claim.job_id, state=JobState.FAILED.value, message=message)
            db.add_event(conn, claim.job_id, request_ids, EventKind.TERMINAL.value, JobState.FAILED.value, job.stage,
                         job.progress, message)
            self.ctx.audit.append(conn, "job_failed", {"job_id": claim.job_id, "model_name": job.model_name,
                                                       "request_ids": list(request_ids), "error": message})
        return True

    def close(self) -> None:
        """This process runs no more jobs: release its liveness locks (SQLite). A job it abandoned while
        RUNNING is then reclaimed by the next claimer at once."""
        if self.liveness.enabled:
            self.liveness.release_all(self._lease_owners())


def _holds(job, claim: Claim) -> bool:
    """The claim's lease is live: same owner, same attempt, job RUNNING."""
    return _owns(job, claim) and job.state == JobState.RUNNING.value


def _owns(job, claim: Claim) -> bool:
    """The job is (or was last, until it ended) this claim's: same owner and attempt. A job the holder took
    to a terminal state stays its to tidy up (nobody reclaims a terminal job)."""
    return job is not None and job.lease_owner == claim.owner and job.attempts == claim.attempt


def _expire_owner(conn: Connection, owner: str) -> None:
    for row in db.running_leases(conn):
        if row.lease_owner == owner:
            job = db.get_job(conn, row.job_id)
            db.expire_lease(conn, row.job_id, owner, job.attempts)
            log.warning("job %s: holder %s is gone (its liveness lock is free); reclaiming now", row.job_id, owner)


class FencedStore:
    """A :class:`service.store.Store` whose every write transaction first checks, under the job row's lock,
    that ``claim`` still holds the lease (:class:`LeaseLost` otherwise). Reads and waits pass through."""

    def __init__(self, store: db.Store, claim: Claim):
        self._store = store
        self.claim = claim

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self._store.write() as conn:
            job = db.lock_job(conn, self.claim.job_id)
            if not _owns(job, self.claim) or job.state == JobState.QUEUED.value:
                holder = "nobody" if job is None else f"{job.lease_owner} (attempt {job.attempts}, {job.state})"
                raise LeaseLost(f"job {self.claim.job_id}: lease of {self.claim.owner} (attempt "
                                f"{self.claim.attempt}) is gone; now held by {holder}")
            yield conn

    def __getattr__(self, name: str):
        return getattr(self._store, name)


class Heartbeat:
    """Renews a claim's lease every third of ``job_lease_s`` in a daemon thread while the job runs.

    ``lost`` is set when a renewal finds the lease gone; the next fenced write then raises
    :class:`LeaseLost`. A failed renewal (store unreachable) is retried at the next beat: the lease only
    lapses if that lasts ``job_lease_s``.
    """

    def __init__(self, scheduler: Scheduler, claim: Claim, on_lost=None):
        self.scheduler, self.claim = scheduler, claim
        self.lost = threading.Event()
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lethe-lease-{claim.job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _beat(self) -> None:
        interval = self.scheduler.lease_s / 3
        while not self._stop.wait(interval):
            try:
                if not self.scheduler.renew(self.claim):
                    log.warning("job %s: lease of %s lost", self.claim.job_id, self.claim.owner)
                    self.lost.set()
                    if self._on_lost is not None:
                        self._on_lost()
                    return
            except Exception:  # the store is unreachable for now; the lease lapses only if it stays so
                log.exception("job %s: lease renewal failed; retrying", self.claim.job_id)
