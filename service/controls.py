"""Operator controls on a request: read it, cancel it, retry it, close it (issue 10, "Operator controls").

A request is PENDING until every model it touched holds a certificate (the GDPR clock runs meanwhile). A
rejected or failed job leaves it PENDING on purpose: the erasure is still owed. An operator then:

- retries it (:meth:`RequestControls.retry_request`): a new job per model still without a certificate,
  recorded as attempt N of the same request id, optionally with another method and policy overrides that
  may only make the gate STRICTER (a retry is no way around a rejection);
- closes it (:meth:`close_request`) with a written reason, e.g. "handled by a manual retrain", which stops
  the clock; queued jobs of the request are cancelled;
- or, before any of its jobs ran, cancels it (:meth:`cancel_request`).

Each control is one store transaction with its audit chain entry and the request's TERMINAL event (cancel,
close) or ACCEPTED events (retry), so a watching client sees it. A running job is never interrupted: cancel
and close answer FAILED_PRECONDITION while one runs.
"""

from __future__ import annotations

import uuid
from typing import Any

from service import store as db
from service.context import PipelineContext, policy_from_json
from service.domain import (
    ErasureRequest,
    EventKind,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    JobState,
    NotFound,
    RequestState,
    RequestView,
    RetryOutcome,
    RetryRequest,
    preview,
)
from service.intake import Intake
from service.verification import override_violations

MAX_REASON_LENGTH = 2000
# Per policy value, the direction in which an override makes the gate stricter.
STRICTER: dict[str, str] = {"max_utility_drop": "lower", "class_forget_max_accuracy": "lower",
                            "min_forget_p": "higher", "mia_auc_margin": "lower", "onnx_tolerance": "lower",
                            "min_update_fit": "higher"}


class RequestControls:
    def __init__(self, ctx: PipelineContext, intake: Intake):
        self.ctx, self.intake = ctx, intake

    # ------------------------------------------------------------------------------------------- read
    def get_request(self, request_id: str) -> RequestView:
        with self.ctx.store.read() as conn:
            return _view(conn, _require(conn, request_id))

    # ----------------------------------------------------------------------------------------- cancel
    def cancel_request(self, request_id: str, reason: str) -> RequestView:
        reason = _reason(reason, required=False)
        with self.ctx.store.write() as conn:
            row = _require(conn, request_id)
            _require_pending(row, "cancelled")
            if db.certificates_for(conn, request_id):
                raise FailedPrecondition("the request already holds a certificate for some model; close it instead",
                                         (FieldViolation("request_id", "partly certified: use CloseRequest"),))
            jobs = self._settle_jobs(conn, row, "cancel")
            if any(job.state != JobState.QUEUED.value for job in jobs):
                raise FailedPrecondition("a job of the request already ran; retry or close it instead",
                                         (FieldViolation("request_id", "a job already ran: use CloseRequest"),))
            return self._end(conn, row, RequestState.CANCELLED, reason, "request_cancelled")

    # ------------------------------------------------------------------------------------------ close
    def close_request(self, request_id: str, reason: str) -> RequestView:
        reason = _reason(reason, required=True)
        with self.ctx.store.write() as conn:
            row = _require(conn, request_id)
            _require_pending(row, "closed")
            self._settle_jobs(conn, row, "close")
            return self._end(conn, row, RequestState.CLOSED, reason, "request_closed")

    def _settle_jobs(self, conn, row, action: str) -> list:
        """Refuse while a job of the request runs; cancel its queued jobs (or leave a coalesced one that serves
        other requests too). Returns the request's jobs as they were."""
        jobs = [db.get_job(conn, job_id) for job_id, _ in db.request_attempts(conn, row.request_id)]
        running = [job.job_id for job in jobs if job.state == JobState.RUNNING.value]
        if running:
            raise FailedPrecondition(f"job {running[0]} of the request is running; it cannot be {action}led "
                                     "mid-run (wait for it to end)",
                                     (FieldViolation("request_id", "a job of the request is running"),))
        for job in (j for j in jobs if j.state == JobState.QUEUED.value):
            others = tuple(r for r in db.job_request_ids(conn, job.job_id) if r != row.request_id)
            db.unlink_request(conn, job.job_id, row.request_id)
            if not others:
                db.update_job(conn, job.job_id, state=JobState.CANCELLED.value, stage="cancelled",
                              message=f"cancelled: its only request was {action}led by an operator")
                db.add_event(conn, job.job_id, (row.request_id,), EventKind.TERMINAL.value,
                             JobState.CANCELLED.value, "cancelled", job.progress, f"request {action}led")
        return jobs

    def _end(self, conn, row, state: RequestState, reason: str, audit_kind: str) -> RequestView:
        db.end_request(conn, row.request_id, state.value, reason)
        db.add_event(conn, "", (row.request_id,), EventKind.TERMINAL.value, JobState.CANCELLED.value, "done", 1.0,
                     f"request {state.value.lower()} by an operator" + (f": {reason}" if reason else ""))
        self.ctx.audit.append(conn, audit_kind, {"request_id": row.request_id, "reason": reason})
        return _view(conn, db.get_request(conn, row.request_id))

    # ------------------------------------------------------------------------------------------ retry
    def retry_request(self, retry: RetryRequest) -> RetryOutcome:
        violations = override_violations(dict(retry.policy_overrides))
        if retry.expected_attempt < 0:
            violations.append(FieldViolation("expected_attempt", "must be 0 (the next attempt) or positive"))
        if violations:
            raise InvalidArgument("invalid retry", tuple(violations))
        with self.ctx.store.read() as conn:
            row = _require(conn, retry.request_id)
            attempts = db.request_attempts(conn, retry.request_id)
            certified = {c.model_name for c in db.certificates_for(conn, retry.request_id)}
        last = max((attempt for _, attempt in attempts), default=1)
        if retry.expected_attempt and retry.expected_attempt <= last:  # a repeated call: what it created
            if retry.expected_attempt == last and last > 1:
                with self.ctx.store.read() as conn:
                    return RetryOutcome(_view(conn, row), tuple(j for j, a in attempts if a == last), last, False)
            raise FailedPrecondition(f"attempt {retry.expected_attempt} already exists (the request is at attempt "
                                     f"{last})", (FieldViolation("expected_attempt", f"the next attempt is {last + 1}"),))
        if retry.expected_attempt and retry.expected_attempt != last + 1:
            raise FailedPrecondition(f"the next attempt is {last + 1}",
                                     (FieldViolation("expected_attempt", f"the next attempt is {last + 1}"),))
        _require_pending(row, "retried")
        models = [name for name in row.model_names if name != "*" and name not in certified]
        if not models:
            raise FailedPrecondition("no model of the request is left without a certificate",
                                     (FieldViolation("request_id", "nothing to retry"),))
        overrides = {**dict(row.policy_overrides or {}), **dict(retry.policy_overrides)}
        targets = self._targets(row, models, retry, overrides)
        with self.ctx.store.write() as conn:
            row = _require(conn, retry.request_id)  # re-read under the write lock: the state may have moved
            _require_pending(row, "retried")
            busy = [job_id for job_id, _ in db.request_attempts(conn, row.request_id)
                    if db.get_job(conn, job_id).state in (JobState.QUEUED.value, JobState.RUNNING.value)]
            if busy:
                raise FailedPrecondition(f"job {busy[0]} of the request has not ended; retry after it does",
                                         (FieldViolation("request_id", "a job of the request has not ended"),))
            attempt = max((a for _, a in db.request_attempts(conn, row.request_id)), default=1) + 1
            job_ids = [self._retry_job(conn, row, target, overrides, attempt) for target in targets]
            self.ctx.audit.append(conn, "request_retried", {
                "request_id": row.request_id, "attempt": attempt, "job_ids": job_ids,
                "method": retry.method, "policy_overrides": dict(retry.policy_overrides)})
            return RetryOutcome(_view(conn, db.get_request(conn, row.request_id)), tuple(job_ids), attempt, True)

    def _targets(self, row, models: list[str], retry: RetryRequest, overrides: dict[str, float]) -> list[dict]:
        """Method, parameters and matched records per model, validated as a submission's are."""
        with self.ctx.store.read() as conn:
            policies = {name: db.get_model(conn, name) for name in models}
        violations = []
        for name, model in policies.items():
            if model is None:
                raise FailedPrecondition(f"model {preview(name)} is no longer registered",
                                         (FieldViolation("request_id", "a model of the request is gone"),))
            policy = policy_from_json(model.policy)
            for key, value in dict(retry.policy_overrides).items():
                base = dict(row.policy_overrides or {}).get(key, getattr(policy, key))  # what the request had
                looser = value > base if STRICTER[key] == "lower" else value < base
                if looser:
                    violations.append(FieldViolation(f"policy_overrides.{key}",
                                                     f"a retry may only make the gate stricter ({STRICTER[key]} "
                                                     f"than {base} for model {preview(name)})"))
        if violations:
            raise InvalidArgument("invalid retry", tuple(dict.fromkeys(violations)))
        method = retry.method if retry.method else row.method
        params = dict(retry.method_params) if retry.method else dict(row.method_params or {})
        request = ErasureRequest(request_id=row.request_id, classes=tuple(row.classes), model_names=tuple(models),
                                 method=method, method_params=params, policy_overrides=overrides)
        return self.intake.resolve_targets(request, list(row.subject_hashes), list(row.record_hashes))

    def _retry_job(self, conn, row, target: dict[str, Any], overrides: dict[str, float], attempt: int) -> str:
        info, now = target["info"], db.utcnow()
        job_id = f"job-{uuid.uuid4().hex[:20]}"
        selector = "classes" if row.classes else "records"
        db.insert_job(conn, job_id=job_id, model_name=info.name, coalesce_key=f"retry-{job_id}", selector=selector,
                      state=JobState.QUEUED.value, stage="queued", progress=0.0, method=target["method"],
                      method_params=target["params"], policy_overrides=overrides,
                      base_version=info.serving_version, records=target["matched"], message="", evidence={},
                      attempts=0, window_closes_at=now)
        db.link_request(conn, job_id, row.request_id, attempt)
        db.add_event(conn, job_id, (row.request_id,), EventKind.ACCEPTED.value, JobState.QUEUED.value, "queued", 0.0,
                     f"retry: attempt {attempt} of the request, new job {job_id} on model {info.name} "
                     f"({target['method']})")
        return job_id


def _require(conn, request_id: str):
    row = db.get_request(conn, request_id)
    if row is None:
        raise NotFound(f"no request {preview(request_id)}", (FieldViolation("request_id", "unknown request"),))
    return row


def _require_pending(row, action: str) -> None:
    if row.state != RequestState.PENDING.value:
        raise FailedPrecondition(f"the request is {row.state}; only a pending request can be {action}",
                                 (FieldViolation("request_id", f"the request is {row.state}"),))


def _reason(reason: str, required: bool) -> str:
    reason = (reason or "").strip()
    if required and not reason:
        raise InvalidArgument("a reason is required", (FieldViolation("reason", "say why the request is closed"),))
    if len(reason) > MAX_REASON_LENGTH or not reason.isprintable():
        raise InvalidArgument("invalid reason", (FieldViolation(
            "reason", f"printable text of at most {MAX_REASON_LENGTH} characters"),))
    return reason


def _view(conn, row) -> RequestView:
    attempts = db.request_attempts(conn, row.request_id)
    return RequestView(
        request_id=row.request_id, kind=row.kind, state=RequestState(row.state), received_at=db.as_utc(row.received_at),
        completed_at=db.as_utc(row.completed_at), deadline=db.as_utc(row.deadline),
        attempts=max((a for _, a in attempts), default=1), job_ids=tuple(job_id for job_id, _ in attempts),
        certified_models=tuple(sorted({c.model_name for c in db.certificates_for(conn, row.request_id)})),
        state_reason=row.state_reason or "")
