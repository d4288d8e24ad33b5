"""Intake: validate an erasure, resolve the models and records it touches, commit it durably, acknowledge.

- Nothing is written on error: every check (shape, idempotency, deadline, models, method and parameters)
  runs before the transaction that stores the request.
- One read transaction per submission: the idempotency lookup, the registered models with their serving
  datasets, and the record index's counts (:mod:`service.record_index`: one indexed count, no dataset load).
- Group commit (:mod:`service.group_commit`): concurrent submissions (many streams, many gRPC threads) are
  committed together by :func:`service.intake_commit.commit_batch`, many requests per transaction and one
  statement per table: one fsync serves them all. A request's outcome in the batch is its own: a refusal
  of one never fails another.
- An acknowledgement (the return of :meth:`Intake.submit_erasure`) follows that transaction's commit.
- Coalescing: a request joins a QUEUED job of the same model, method, parameters and policy overrides
  whose window (``coalescing_window_s`` from the job's first request) is still open; otherwise it opens a
  new job (:mod:`service.scheduler` runs it once its window closes). The decision is made in the database
  (:func:`service.store.lock_coalescing`, :func:`service.store.open_job_for`), so replicas deciding at once
  neither open two jobs for one key nor join a job that a worker is claiming.
- A request that matches no record of a model is certified "no records found" in the same transaction.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from service import store as db
from service.audit import canonical_json, keyed_hash
from service.context import ModelInfo, PipelineContext
from service.domain import (
    AlreadyExists,
    DeadlineExceeded,
    ErasureRequest,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ServiceError,
    SubmitOutcome,
    Unimplemented,
    id_problem,
    preview,
)
from service.faults import fault_point
from service.group_commit import GroupCommit
from service.intake_commit import Submission, commit_batch, replay_or_refuse
from service.record_index import ensure_indexed
from service.verification import override_violations
from unlearn import registry as methods
from unlearn.errors import InvalidParameterError, UnknownMethodError

log = logging.getLogger(__name__)
MAX_VIOLATIONS = 20
"""Field violations reported for one request: enough to fix it, while a status built from 10,000 bad ids
would outgrow the client's metadata limit (8 KiB by default)."""


class Intake:
    """Implements ``EngineProtocol.submit_erasure``."""

    def __init__(self, ctx: PipelineContext):
        self.ctx = ctx
        self._group = GroupCommit(lambda batch: commit_batch(ctx, batch))

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
        record_hashes = sorted(self.ctx.catalog.tombstone(r) for r in request.record_ids)  # never stored in clear
        deadline = _utc(request.deadline)
        payload = canonical_json({
            "kind": "erase", "subjects": subject_hashes, "records": sorted(request.record_ids),
            "classes": sorted(request.classes), "models": sorted(request.model_names), "method": request.method,
            "method_params": request.method_params, "policy_overrides": request.policy_overrides,
            "deadline": deadline.isoformat() if deadline else None})
        digest = keyed_hash(self.ctx.settings.subject_hash_key_bytes, "payload", payload)
        found = self._look_up(request, subject_hashes, record_hashes, idempotency=True)
        if found.existing is not None:
            return replay_or_refuse(request, digest, found.existing)
        if deadline is not None and deadline <= db.utcnow():
            raise DeadlineExceeded(f"the request's deadline {deadline.isoformat()} has already passed",
                                   (FieldViolation("deadline", "already passed at submission"),))
        targets = self._targets(request, found)
        fault_point("intake.before_commit")
        outcome = self._group.submit(Submission(request, subject_hashes, record_hashes, digest, deadline, targets))
        fault_point("intake.after_commit")
        return outcome

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

    def resolve_targets(self, request: ErasureRequest, subject_hashes: list[str],
                        record_hashes: list[str]) -> list[dict[str, Any]]:
        """Per model the request touches: method, parameters, and matched records (also for a retry)."""
        return self._targets(request, self._look_up(request, subject_hashes, record_hashes, idempotency=False))

    def _look_up(self, request: ErasureRequest, subject_hashes: list[str], record_hashes: list[str],
                 idempotency: bool) -> _Found:
        """One read transaction: the request stored under this id (``idempotency``; nothing else is read when
        there is one), then every registered model with how many records of its serving dataset the request
        names (the record index; a version no process has indexed yet is indexed first, once)."""
        classes = list(request.classes)
        with self.ctx.store.read() as conn:
            existing = db.request_outcome(conn, request.request_id) if idempotency else None
            if existing is not None:
                return _Found(existing, {})
            models = db.serving_matches(conn, subject_hashes, record_hashes, classes)
        searched = [models[name] for name in (request.model_names or sorted(models)) if name in models]
        unindexed = [row for row in searched if row.dataset_id is not None and row.dataset_indexed_at is None]
        if unindexed:
            with self.ctx.store.read() as conn:
                datasets = [db.dataset_for_model_version(conn, row.model_name, row.serving_version) for row in unindexed]
            for dataset in datasets:
                ensure_indexed(self.ctx, dataset)
            with self.ctx.store.read() as conn:
                models = db.serving_matches(conn, subject_hashes, record_hashes, classes)
        return _Found(None, models)

    def _targets(self, request: ErasureRequest, found: _Found) -> list[dict[str, Any]]:
        """Per model the request touches: method, parameters, and how many records it matches now."""
        rows = found.models
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
            problem = _parameter_problem(method, canonical_json(params))
            if problem is not None:
                violations.append(problem)
                continue
            reason = methods.unsupported_reason(method, info.task_type.value)
            if reason:
                violations.append(FieldViolation("method", f"{reason} (model {preview(name)})"))
                continue
            if methods.get(method).needs_training and not info.training.get("train_recipe"):
                violations.append(FieldViolation("method", f"method {method!r} retrains from the original recipe, "
                                                           f"and model {preview(name)} was registered without "
                                                           "model_factory and train_recipe"))
                continue
            for index, value in enumerate(request.classes):
                if value >= info.num_classes:
                    violations.append(FieldViolation(f"classes[{index}]",
                                                     f"model {name!r} has {info.num_classes} classes"))
            matched = rows[name].matched or 0
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


@dataclass(frozen=True)
class _Found:
    """What one read transaction found for a submission (:meth:`Intake._look_up`)."""

    existing: Any  # the request already stored under this id, or None
    models: dict[str, Any]  # registered models by name (store.serving_matches: with the records matched)


@functools.lru_cache(maxsize=1024)
def _parameter_problem(method: str, params_json: str) -> FieldViolation | None:
    """What is wrong with ``method``'s parameters (canonical JSON), or None. Remembered: the check is pure,
    and building a method's config resolves its type hints, which cost more than the rest of a request's
    validation; most requests repeat their policy's default parameters."""
    try:
        methods.parse_config(method, json.loads(params_json))
    except InvalidParameterError as error:
        return FieldViolation(f"method_params.{error.field}", error.reason)
    except UnknownMethodError as error:
        return FieldViolation("method", str(error))
    return None


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _outcome(error: ServiceError) -> str:
    return {InvalidArgument: "invalid_argument", AlreadyExists: "already_exists", NotFound: "not_found",
            FailedPrecondition: "failed_precondition", DeadlineExceeded: "deadline_exceeded",
            Unimplemented: "unimplemented"}.get(type(error), "error")
