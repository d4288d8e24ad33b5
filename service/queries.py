"""Reads: jobs, events (with a wait that needs no polling), certificates, the pending requests' clock.

Events are served from this process's :class:`service.event_feed.EventFeed` (the newest events, read from the
store once per change for every waiter) whenever it holds the cursor asked for, from the store otherwise.
"""

from __future__ import annotations

import json
import threading
import time

from service import store as db
from service.context import PipelineContext
from service.event_feed import EventFeed
from service.domain import (
    Certificate,
    CertificateCheck,
    EventKind,
    FieldViolation,
    InvalidArgument,
    JobEvent,
    JobFilter,
    JobState,
    JobView,
    NotFound,
    PendingRequest,
    preview,
)

IDLE_WAIT_S = 1.0  # bound of one wait on the store's change condition (writes of other processes)


class Queries:
    """The read side of ``EngineProtocol``. ``stopping`` ends waits when the engine shuts down."""

    def __init__(self, ctx: PipelineContext | None, stopping: threading.Event):
        self._stopping = stopping
        if ctx is not None:
            self.attach(ctx)

    def attach(self, ctx: PipelineContext) -> None:
        """Read from ``ctx``'s store (the engine builds the queries before the context: the metrics need them)."""
        self.ctx = ctx
        self._feed = EventFeed(ctx.store, self._event)

    def get_job(self, job_id: str) -> JobView:
        with self.ctx.store.read() as conn:
            row = db.get_job(conn, job_id)
            if row is None:
                raise NotFound(f"no job {preview(job_id)}", (FieldViolation("job_id", "unknown job"),))
            return _job_view(row, db.job_request_ids(conn, job_id))

    def list_jobs(self, job_filter: JobFilter) -> list[JobView]:
        if not 1 <= job_filter.limit <= 10000:
            raise InvalidArgument("invalid job filter", (FieldViolation("limit", "must be in [1, 10000]"),))
        before = db.seconds_ago(job_filter.min_age_s) if job_filter.min_age_s else None
        with self.ctx.store.read() as conn:
            rows = db.list_jobs(conn, [s.value for s in job_filter.states], job_filter.model_name, before,
                                job_filter.limit)
            return [_job_view(row, db.job_request_ids(conn, row.job_id)) for row in rows]

    def events(self, after_seq: int = 0, job_ids: tuple[str, ...] = (), request_ids: tuple[str, ...] = (),
               wait_s: float = 0.0) -> list[JobEvent]:
        """Stored events after ``after_seq``; waits on the store's change condition (no busy polling)."""
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            generation = self.ctx.store.generation()
            found = self._feed.after(after_seq, job_ids, request_ids)
            if found is None:  # older than what the feed holds
                with self.ctx.store.read() as conn:
                    found = [self._event(conn, row) for row in db.events_after(conn, after_seq, job_ids, request_ids)]
            if found:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                return []
            # Bounded slices so a write from another process (not notified here) is seen within a second.
            self.ctx.store.wait_for_change(generation, min(remaining, IDLE_WAIT_S))

    def _event(self, conn, row) -> JobEvent:
        certificate = None
        if row.certificate_id:
            cert = db.get_certificate(conn, row.certificate_id)
            certificate = Certificate(cert.request_id, cert.body_json, cert.signature)
        return JobEvent(row.seq, row.job_id, tuple(row.request_ids), EventKind(row.kind), JobState(row.state),
                        row.stage, row.fraction, row.message, db.as_utc(row.time), certificate)

    def get_certificate(self, request_id: str) -> list[Certificate]:
        with self.ctx.store.read() as conn:
            rows = db.certificates_for(conn, request_id)
            known = rows or db.get_request(conn, request_id) is not None
        if not rows:
            reason = "no certificate has been issued yet" if known else "unknown request"
            raise NotFound(f"{reason} for request {preview(request_id)}", (FieldViolation("request_id", reason),))
        return [Certificate(row.request_id, row.body_json, row.signature) for row in rows]

    def verify_certificate(self, body_json: str, signature: str) -> CertificateCheck:
        check = self.ctx.audit.check_certificate(body_json, signature)
        if not check.valid:
            return check
        with self.ctx.store.read() as conn:
            issued = any(row.body_json == body_json for row in db.certificates_for(conn, _request_of(body_json)))
        if not issued:
            return CertificateCheck(False, "signed with this service's key but not recorded in its job store")
        return check

    def pending_requests(self) -> list[PendingRequest]:
        now = db.utcnow()
        with self.ctx.store.read() as conn:
            rows = db.pending_requests(conn)
        return [PendingRequest(request_id, received_at, deadline, deadline is not None and deadline < now)
                for request_id, received_at, deadline in rows]

    def last_event_seq(self) -> int:
        with self.ctx.store.read() as conn:
            return db.last_event_seq(conn)

    def request_owners(self, request_ids: tuple[str, ...]) -> dict[str, str | None]:
        with self.ctx.store.read() as conn:
            return db.request_owners(conn, request_ids)

    def overdue_pending_count(self) -> float:
        with self.ctx.store.read() as conn:
            return float(db.overdue_pending_count(conn, db.utcnow()))

    def oldest_pending_age_s(self) -> float:
        with self.ctx.store.read() as conn:
            oldest = db.oldest_pending_received_at(conn)
        return 0.0 if oldest is None else max(0.0, (db.utcnow() - oldest).total_seconds())



def _request_of(body_json: str) -> str:
    return str(json.loads(body_json).get("request_id", ""))


def _job_view(row, request_ids: tuple[str, ...]) -> JobView:
    return JobView(job_id=row.job_id, model_name=row.model_name, base_version=row.base_version or "",
                   state=JobState(row.state), stage=row.stage, progress=row.progress, method=row.method,
                   request_ids=request_ids, records=row.records, created_at=db.as_utc(row.created_at),
                   updated_at=db.as_utc(row.updated_at), result_version=row.result_version, message=row.message,
                   evidence=dict(row.evidence or {}))
