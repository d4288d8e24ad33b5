"""Intake: validate an erasure, resolve the models and records it touches, commit it durably, acknowledge.

- Nothing is written on error: every check (shape, idempotency, deadline, models, method and parameters)
  runs before the one transaction that stores the request.
- An acknowledgement (the return of :meth:`Intake.submit_erasure`) follows that transaction's commit.
- Coalescing: a request joins a QUEUED job of the same model, method, parameters and policy overrides
  whose window (``coalescing_window_s`` from the job's first request) is still open; otherwise it opens a
  new job (:mod:`service.scheduler` runs it once its window closes).
- A request that matches no record of a model is certified "no records found" in the same transaction.
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from service import store as db
from service.audit import NO_RECORDS, canonical_json, certify, keyed_hash, sha256_hex
from service.context import ModelInfo, PipelineContext
from service.faults import fault_point
from service.domain import (
    AlreadyExists,
    DeadlineExceeded,
    ErasureRequest,
    EventKind,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    JobState,
    NotFound,
    ServiceError,
    SubmitOutcome,
    Unimplemented,
    id_problem,
    preview,
)
from service.verification import override_violations
from unlearn import registry as methods
from unlearn.errors import InvalidParameterError, UnknownMethodError

MAX_VIOLATIONS = 20
"""Field violations reported for one request: enough to fix it, while a status built from 10,000 bad ids
would outgrow the client's metadata limit (8 KiB by default)."""


class Intake:
    """Implements ``EngineProtocol.submit_erasure``."""

    def __init__(self, ctx: PipelineContext):
        self.ctx = ctx
        self._submit_lock = threading.Lock()  # coalescing decisions are made one request at a time

    def submit_erasure(self, request: ErasureRequest) -> SubmitOutcome:
        try:
            outcome = self._submit(request)
        except ServiceError as error:
            self.ctx.metrics.requests.labels("erase", _outcome(error)).inc()
            raise
        self.ctx.metrics.requests.labels("erase", "accepted" if outcome.created else "replayed").inc()
        return outcome

    def _submit(self, request: ErasureRequest) -> SubmitOutcome:
        violations = self._shape_violations(request)
        if violations:
            raise InvalidArgument("invalid erasure request", tuple(violations))
        subject_hashes = sorted(self.ctx.catalog.subject_hash(s) for s in request.subject_ids)
        record_hashes = sorted(self.ctx.catalog.tombstone(r) for r in request.record_ids)
        deadline = _utc(request.deadline)
        payload = canonical_json({
            "kind": "erase", "subjects": subject_hashes, "records": sorted(request.record_ids),
            "classes": sorted(request.classes), "models": sorted(request.model_names), "method": request.method,
            "method_params": request.method_params, "policy_overrides": request.policy_overrides,
            "deadline": deadline.isoformat() if deadline else None})
        digest = keyed_hash(self.ctx.settings.subject_hash_key_bytes, "payload", payload)
        with self._submit_lock:
            replay = self._replay(request, digest)
            if replay is not None:
                return replay
            if deadline is not None and deadline <= db.utcnow():
                raise DeadlineExceeded(f"the request's deadline {deadline.isoformat()} has already passed",
                                       (FieldViolation("deadline", "already passed at submission"),))
            targets = self._targets(request, subject_hashes, record_hashes)
            fault_point("intake.before_commit")
            outcome = self._commit(request, subject_hashes, record_hashes, digest, deadline, targets)
            fault_point("intake.after_commit")
            return outcome

    def _replay(self, request: ErasureRequest, digest: str) -> SubmitOutcome | None:
        with self.ctx.store.read() as conn:
            existing = db.get_request(conn, request.request_id)
        if existing is None:
            return None
        # Another identity's request id answers like a different payload: a caller learns nothing about
        # requests it did not submit (not even their job ids).
        foreign = (request.submitter_hash is not None and existing.submitter_hash is not None
                   and existing.submitter_hash != request.submitter_hash)
        if existing.payload_digest != digest or foreign:
            raise AlreadyExists(f"request_id {preview(request.request_id)} was already used with a different payload",
                                (FieldViolation("request_id", "reused with a different payload"),))
        return SubmitOutcome(request.request_id, tuple(existing.outcome_job_ids), False, existing.first_event_seq)

    def _shape_violations(self, request: ErasureRequest) -> list[FieldViolation]:
        limit, most = self.ctx.settings.max_id_length, self.ctx.settings.max_ids_per_request
        violations = []
        problem = id_problem(request.request_id, limit)
        if problem:
            violations.append(FieldViolation("request_id", problem))
        for name, values in (("subject_ids", request.subject_ids), ("record_ids", request.record_ids),
                             ("model_names", request.model_names)):
            if len(values) > most:
                violations.append(FieldViolation(name, f"{len(values)} ids; at most {most} per request"))
                continue
            seen: set[str] = set()
            for index, value in enumerate(values):
                problem = id_problem(value, limit)
                if problem:
                    violations.append(FieldViolation(f"{name}[{index}]", problem))
                elif value in seen:
                    violations.append(FieldViolation(f"{name}[{index}]", "duplicate id in this request"))
                seen.add(value)
            if len(violations) > MAX_VIOLATIONS:  # enough to fix the request; a status stays small
                break
        if len(request.classes) > most:
            violations.append(FieldViolation("classes", f"{len(request.classes)} classes; at most {most} per request"))
        seen_classes: set[int] = set()
        for index, value in enumerate(request.classes[:most]):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                violations.append(FieldViolation(f"classes[{index}]", "must be a non-negative integer"))
            elif value in seen_classes:
                violations.append(FieldViolation(f"classes[{index}]", "duplicate class in this request"))
            seen_classes.add(value)
        if not (request.subject_ids or request.record_ids or request.classes):
            # The "at least one of" rule is reported on the first selector, the one most requests use.
            violations.append(FieldViolation("subject_ids", "name at least one of subject_ids, record_ids or "
                                                            "classes"))
        if request.classes and (request.subject_ids or request.record_ids):
            violations.append(FieldViolation("classes", "class erasure cannot be combined with subject or record ids"))
        if request.classes and not request.model_names:
            violations.append(FieldViolation("model_names", "class erasure must name its models"))
        if request.method is not None:
            try:
                methods.get(request.method)
            except UnknownMethodError as error:
                violations.append(FieldViolation("method", str(error)))
        if not isinstance(request.method_params, dict) or not all(isinstance(k, str) for k in request.method_params):
            violations.append(FieldViolation("method_params", "must map parameter names to values"))
        violations += override_violations(dict(request.policy_overrides))
        return violations[:MAX_VIOLATIONS]

    def _targets(self, request: ErasureRequest, subject_hashes: list[str],
                 record_hashes: list[str]) -> list[dict[str, Any]]:
        """Per model the request touches: method, parameters, and how many records it matches now."""
        with self.ctx.store.read() as conn:
            rows = {row.model_name: row for row in db.list_models(conn)}
            datasets = {name: db.dataset_for_model_version(conn, name, row.serving_version)
                        for name, row in rows.items()}
        names = list(request.model_names) or sorted(rows)
        for index, name in enumerate(request.model_names):
            if name not in rows:
                if self.ctx.registry.model_exists(name):
                    raise FailedPrecondition(f"model {preview(name)} exists in MLflow but is not registered as "
                                             "unlearnable (lethe register)",
                                             (FieldViolation(f"model_names[{index}]",
                                                             "not registered as unlearnable"),))
                raise NotFound(f"no model named {preview(name)}",
                               (FieldViolation(f"model_names[{index}]", "unknown model"),))
        targets, violations = [], []
        for name in names:
            info = ModelInfo.from_row(rows[name])
            # The request's method, or the first of the policy's chain that can do this kind of erasure.
            usable = [step for step in info.policy.method_chain
                      if request.classes or methods.get(step.name).erases != "classes"]
            first = usable[0] if usable else info.policy.method_chain[0]
            method = request.method or first.name
            params = dict(request.method_params) if request.method else {**first.params, **request.method_params}
            try:
                methods.parse_config(method, params)
            except InvalidParameterError as error:
                violations.append(FieldViolation(f"method_params.{error.field}", error.reason))
                continue
            except UnknownMethodError as error:
                violations.append(FieldViolation("method", str(error)))
                continue
            for index, value in enumerate(request.classes):
                if value >= info.num_classes:
                    violations.append(FieldViolation(f"classes[{index}]",
                                                     f"model {name!r} has {info.num_classes} classes"))
            dataset = datasets[name]
            data = self.ctx.catalog.load(dataset.path, dataset.digest)
            matched = int(data.match(set(subject_hashes), set(record_hashes), set(request.classes)).sum())
            if not (request.model_names or matched):
                continue
            if methods.get(method).erases == "classes" and not request.classes:
                source = "requested" if request.method else "every method of the policy chain"
                violations.append(FieldViolation("method", f"{method!r} ({source} for model {name!r}) erases whole "
                                                 "classes only; name a record-erasure method for subject or "
                                                 "record erasure"))
                continue
            targets.append({"info": info, "method": method, "params": params, "matched": matched})
        if violations:
            # One bad parameter is one violation, however many targeted models share the method.
            raise InvalidArgument("invalid method or parameters", tuple(dict.fromkeys(violations)))
        return targets

    def _commit(self, request: ErasureRequest, subject_hashes: list[str], record_hashes: list[str], digest: str,
                deadline: datetime | None, targets: list[dict[str, Any]]) -> SubmitOutcome:
        now = db.utcnow()
        window = timedelta(seconds=self.ctx.settings.coalescing_window_s)
        selector = "classes" if request.classes else "records"
        with self.ctx.store.write() as conn:
            if db.get_request(conn, request.request_id) is not None:  # another process won the race
                raise AlreadyExists(f"request_id {preview(request.request_id)} was stored concurrently",
                                    (FieldViolation("request_id", "stored concurrently by another call"),))
            db.insert_request(conn, request_id=request.request_id, payload_digest=digest, kind="erase",
                              subject_hashes=subject_hashes, record_hashes=record_hashes,
                              submitter_hash=request.submitter_hash,
                              classes=sorted(request.classes), model_names=[t["info"].name for t in targets] or ["*"],
                              method=request.method, method_params=dict(request.method_params),
                              policy_overrides=dict(request.policy_overrides), deadline=deadline, received_at=now,
                              state="PENDING", first_event_seq=0, outcome_job_ids=[])
            self.ctx.audit.append(conn, "request_received", {
                "request_id": request.request_id, "kind": "erase", "payload_digest": digest,
                "subjects": len(subject_hashes), "records": len(request.record_ids), "classes": sorted(request.classes),
                "models": [t["info"].name for t in targets]})
            job_ids, seqs = [], []
            for target in (t for t in targets if t["matched"]):
                info = target["info"]
                key = sha256_hex(canonical_json({"method": target["method"], "params": target["params"],
                                                 "overrides": dict(request.policy_overrides),
                                                 "selector": selector}))[:32]
                job_id = db.open_job_for(conn, info.name, key, now) if window.total_seconds() > 0 else None
                if job_id is None:
                    job_id = f"job-{uuid.uuid4().hex[:20]}"
                    db.insert_job(conn, job_id=job_id, model_name=info.name, coalesce_key=key, selector=selector,
                                  state=JobState.QUEUED.value, stage="queued", progress=0.0, method=target["method"],
                                  method_params=target["params"], policy_overrides=dict(request.policy_overrides),
                                  base_version=info.serving_version, records=0, message="", evidence={},
                                  attempts=0, window_closes_at=now + window)
                    message = f"accepted; new job {job_id} on model {info.name}"
                else:
                    message = f"accepted; coalesced into job {job_id} on model {info.name}"
                db.link_request(conn, job_id, request.request_id)
                job = db.get_job(conn, job_id)
                db.update_job(conn, job_id, records=job.records + target["matched"])
                seqs.append(db.add_event(conn, job_id, (request.request_id,), EventKind.ACCEPTED.value,
                                         JobState.QUEUED.value, "queued", 0.0, message))
                job_ids.append(job_id)
            if not job_ids:
                seqs.append(db.add_event(conn, "", (request.request_id,), EventKind.ACCEPTED.value,
                                         JobState.SUCCEEDED.value, "resolve", 0.0,
                                         "accepted; no records found, certificate follows"))
            for target in (t for t in targets if not t["matched"]):
                self._no_records(conn, request.request_id, target["info"].name, subject_hashes, request)
            if not targets:
                self._no_records(conn, request.request_id, "*", subject_hashes, request)
            db.set_request_jobs(conn, request.request_id, job_ids)
            conn.execute(db.requests.update().where(db.requests.c.request_id == request.request_id)
                         .values(first_event_seq=min(seqs)))
        return SubmitOutcome(request.request_id, tuple(job_ids), True, min(seqs))

    def _no_records(self, conn, request_id: str, model_name: str, subject_hashes: list[str],
                    request: ErasureRequest) -> None:
        with_models = [model_name] if model_name != "*" else [r.model_name for r in db.list_models(conn)]
        searched = {}
        for name in with_models:
            row = db.get_model(conn, name)
            dataset = db.dataset_for_model_version(conn, name, row.serving_version) if row else None
            searched[name] = {"version": row.serving_version if row else None,
                              "dataset_digest": dataset.digest if dataset else None}
        certify(conn, self.ctx.audit, request_id, model_name, None, {
            "request_id": request_id, "model_name": model_name, "label": NO_RECORDS, "job_id": None,
            "statement": "No records of this request were found in the training data of the searched model(s); "
                         "nothing had to be unlearned.",
            "searched": searched,
            "subjects": {"count": len(subject_hashes), "keyed_sha256": subject_hashes},
            "records": {"matched": 0, "record_ids_sha256": sha256_hex("\n".join(sorted(request.record_ids)))},
            "classes": sorted(request.classes), "code_version": self.ctx.settings.code_version})


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _outcome(error: ServiceError) -> str:
    return {InvalidArgument: "invalid_argument", AlreadyExists: "already_exists", NotFound: "not_found",
            FailedPrecondition: "failed_precondition", DeadlineExceeded: "deadline_exceeded",
            Unimplemented: "unimplemented"}.get(type(error), "error")
