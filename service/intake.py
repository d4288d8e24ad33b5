"""Intake: validate an erasure, resolve the models and records it touches, commit it durably, acknowledge.

- Nothing is written on error: every check (shape, idempotency, deadline, models, method and parameters)
  runs before the transaction that stores the request.
- Resolution asks the record index (:mod:`service.record_index`): one indexed count per request, no
  dataset load.
- Group commit: concurrent submissions (many streams, many gRPC threads) are committed together, many
  requests per transaction (:class:`GroupCommit`): one fsync serves them all. A request's outcome in the
  batch is its own: a refusal of one never fails another.
- An acknowledgement (the return of :meth:`Intake.submit_erasure`) follows that transaction's commit.
- Coalescing: a request joins a QUEUED job of the same model, method, parameters and policy overrides
  whose window (``coalescing_window_s`` from the job's first request) is still open; otherwise it opens a
  new job (:mod:`service.scheduler` runs it once its window closes). The decision is made in the database
  (:func:`service.store.lock_coalescing`, :func:`service.store.open_job_for`), so replicas deciding at once
  neither open two jobs for one key nor join a job that a worker is claiming.
- A request that matches no record of a model is certified "no records found" in the same transaction.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from service import store as db
from service.audit import NO_RECORDS, canonical_json, certify, keyed_hash, sha256_hex
from service.context import ModelInfo, PipelineContext
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
from service.faults import fault_point
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
        self._group = GroupCommit(self._commit_batch)

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
        replay = self._replay(request, digest)
        if replay is not None:
            return replay
        if deadline is not None and deadline <= db.utcnow():
            raise DeadlineExceeded(f"the request's deadline {deadline.isoformat()} has already passed",
                                   (FieldViolation("deadline", "already passed at submission"),))
        targets = self._targets(request, subject_hashes, record_hashes)
        fault_point("intake.before_commit")
        outcome = self._group.submit(_Submission(request, subject_hashes, record_hashes, digest, deadline, targets))
        fault_point("intake.after_commit")
        return outcome

    def _replay(self, request: ErasureRequest, digest: str) -> SubmitOutcome | None:
        with self.ctx.store.read() as conn:
            existing = db.get_request(conn, request.request_id)
        if existing is None:
            return None
        return _replay_or_refuse(request, digest, existing)

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
        return self._targets(request, subject_hashes, record_hashes)

    def _targets(self, request: ErasureRequest, subject_hashes: list[str],
                 record_hashes: list[str]) -> list[dict[str, Any]]:
        """Per model the request touches: method, parameters, and how many records it matches now."""
        with self.ctx.store.read() as conn:
            rows = {row.model_name: row for row in db.list_models(conn)}
            datasets = {name: db.dataset_for_model_version(conn, name, row.serving_version)
                        for name, row in rows.items()}
        names = list(request.model_names) or sorted(rows)
        matches = self._indexed_matches([datasets[name] for name in names if name in datasets], subject_hashes,
                                        record_hashes, request)
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
            reason = methods.unsupported_reason(method, info.task_type.value)
            if reason:
                violations.append(FieldViolation("method", f"{reason} (model {preview(name)})"))
                continue
            for index, value in enumerate(request.classes):
                if value >= info.num_classes:
                    violations.append(FieldViolation(f"classes[{index}]",
                                                     f"model {name!r} has {info.num_classes} classes"))
            matched = matches.get(datasets[name].id, 0)
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

    def _indexed_matches(self, dataset_rows, subject_hashes: list[str], record_hashes: list[str],
                         request: ErasureRequest) -> dict[int, int]:
        """Per dataset version id: records the request names, from the record index (indexing a version no
        process has indexed yet, once)."""
        for row in dataset_rows:
            if row.indexed_at is None:
                ensure_indexed(self.ctx, row)
        with self.ctx.store.read() as conn:
            return db.indexed_matches(conn, [row.id for row in dataset_rows], subject_hashes, record_hashes,
                                      list(request.classes))

    def _commit_batch(self, batch: list[_Submission]) -> list[SubmitOutcome | ServiceError]:
        """Store a batch of validated submissions in ONE transaction; one outcome (or refusal) each.

        Two phases, for the store's deadlock rule (row and coalescing locks before the log lock): first every
        request row, job row and link; then every audit entry, event and "no records" certificate.
        """
        now = db.utcnow()
        window = timedelta(seconds=self.ctx.settings.coalescing_window_s)
        results: list[SubmitOutcome | ServiceError | None] = [None] * len(batch)
        with self.ctx.store.write() as conn:
            db.lock_coalescing(conn, [(t["info"].name, self._key(s, t)) for s in batch for t in s.targets
                                      if t["matched"]])
            decided: dict[str, tuple[str, list[tuple[str, str]]]] = {}  # request id -> (digest, [(job, message)])
            for index, submission in enumerate(batch):
                request = submission.request
                earlier = decided.get(request.request_id)
                existing = db.get_request(conn, request.request_id) if earlier is None else None
                if earlier is not None or existing is not None:
                    results[index] = self._duplicate(request, submission.digest, earlier, existing)
                    continue
                decided[request.request_id] = (submission.digest, self._store_rows(conn, submission, now, window))
            for index, submission in enumerate(batch):
                if results[index] is None:
                    results[index] = self._log_accepted(conn, submission, decided[submission.request.request_id][1])
        for index, result in enumerate(results):  # in-batch replays learn the seq their original got
            if isinstance(result, _Replay):
                original = next(r for r in results if isinstance(r, SubmitOutcome) and r.request_id == result.request_id)
                results[index] = SubmitOutcome(original.request_id, original.job_ids, False, original.first_event_seq)
        return results

    def _key(self, submission: _Submission, target: dict[str, Any]) -> str:
        selector = "classes" if submission.request.classes else "records"
        return sha256_hex(canonical_json({"method": target["method"], "params": target["params"],
                                          "overrides": dict(submission.request.policy_overrides),
                                          "selector": selector}))[:32]

    def _duplicate(self, request: ErasureRequest, digest: str, earlier, existing):
        """A request id stored meanwhile (by another replica, or earlier in this batch): replay or refuse."""
        if earlier is not None:
            if earlier[0] != digest:
                return AlreadyExists(f"request_id {preview(request.request_id)} was already used with a different "
                                     "payload", (FieldViolation("request_id", "reused with a different payload"),))
            return _Replay(request.request_id)
        try:
            return _replay_or_refuse(request, digest, existing)
        except AlreadyExists as refusal:
            return refusal

    def _store_rows(self, conn, submission: _Submission, now: datetime, window: timedelta) -> list[tuple[str, str]]:
        """Phase one for one request: its row, and the job of each matched model (new or coalesced)."""
        request, targets = submission.request, submission.targets
        selector = "classes" if request.classes else "records"
        db.insert_request(conn, request_id=request.request_id, payload_digest=submission.digest, kind="erase",
                          subject_hashes=submission.subject_hashes, record_hashes=submission.record_hashes,
                          submitter_hash=request.submitter_hash,
                          classes=sorted(request.classes), model_names=[t["info"].name for t in targets] or ["*"],
                          method=request.method, method_params=dict(request.method_params),
                          policy_overrides=dict(request.policy_overrides), deadline=submission.deadline,
                          received_at=now, state="PENDING", first_event_seq=0, outcome_job_ids=[])
        jobs = []
        for target in (t for t in targets if t["matched"]):
            info = target["info"]
            key = self._key(submission, target)
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
            jobs.append((job_id, message))
        db.set_request_jobs(conn, request.request_id, [job_id for job_id, _ in jobs])
        return jobs

    def _log_accepted(self, conn, submission: _Submission, jobs: list[tuple[str, str]]) -> SubmitOutcome:
        """Phase two for one request: its audit entry, ACCEPTED events and "no records" certificates."""
        request, targets = submission.request, submission.targets
        self.ctx.audit.append(conn, "request_received", {
            "request_id": request.request_id, "request_kind": "erase", "payload_digest": submission.digest,
            "subjects": len(submission.subject_hashes), "records": len(request.record_ids),
            "classes": sorted(request.classes), "models": [t["info"].name for t in targets]})
        seqs = [db.add_event(conn, job_id, (request.request_id,), EventKind.ACCEPTED.value, JobState.QUEUED.value,
                             "queued", 0.0, message) for job_id, message in jobs]
        if not jobs:
            seqs.append(db.add_event(conn, "", (request.request_id,), EventKind.ACCEPTED.value,
                                     JobState.SUCCEEDED.value, "resolve", 0.0,
                                     "accepted; no records found, certificate follows"))
        for target in (t for t in targets if not t["matched"]):
            self._no_records(conn, request.request_id, target["info"].name, submission.subject_hashes, request)
        if not targets:
            self._no_records(conn, request.request_id, "*", submission.subject_hashes, request)
        conn.execute(db.requests.update().where(db.requests.c.request_id == request.request_id)
                     .values(first_event_seq=min(seqs)))
        return SubmitOutcome(request.request_id, tuple(job_id for job_id, _ in jobs), True, min(seqs))

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


@dataclass(frozen=True)
class _Submission:
    """A validated, resolved request waiting for its group commit."""

    request: ErasureRequest
    subject_hashes: list[str]
    record_hashes: list[str]
    digest: str
    deadline: datetime | None
    targets: list[dict[str, Any]]


@dataclass(frozen=True)
class _Replay:
    """The same request id and payload twice in one batch: the second gets the first's outcome."""

    request_id: str


class _Slot:
    def __init__(self, item):
        self.item = item
        self.ready = threading.Event()
        self.lead = False  # woken to commit the next batch rather than with a result
        self.done = False
        self.result = None


class GroupCommit:
    """Commits concurrent submissions together: leader/follower group commit.

    A caller enqueues its item. If no batch is being committed it leads: it takes everything queued (up to
    ``max_batch``), commits it with ``commit_batch`` in one transaction, hands each waiter its own result,
    and passes the lead to the first item that arrived meanwhile (so no caller keeps committing others'
    batches while its own answer waits). Batches form by themselves while a commit is in flight: no timer,
    no added latency when the load is light. If a batch's transaction fails as a whole (a lost race with
    another replica, a database error), its items are retried one per transaction, so one item's trouble
    is only that item's.
    """

    def __init__(self, commit_batch, max_batch: int = 256):
        self._commit_batch = commit_batch
        self.max_batch = max_batch
        self._mutex = threading.Lock()
        self._queue: list[_Slot] = []
        self._leading = False

    def submit(self, item):
        slot = _Slot(item)
        with self._mutex:
            self._queue.append(slot)
            if not self._leading:
                self._leading = slot.lead = True
        while not slot.done:
            if slot.lead:
                self._lead()
            else:
                slot.ready.wait()
                slot.ready.clear()
        if isinstance(slot.result, BaseException):
            raise slot.result
        return slot.result

    def _lead(self) -> None:
        with self._mutex:
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
        try:
            results = self._commit_batch([slot.item for slot in batch])
        except Exception:
            log.warning("a group commit of %d submission(s) failed; committing them one by one", len(batch),
                        exc_info=True)
            results = []
            for slot in batch:
                try:
                    results.append(self._commit_batch([slot.item])[0])
                except Exception as error:  # this item's own failure
                    results.append(error)
        for slot, result in zip(batch, results):
            slot.result, slot.done, slot.lead = result, True, False
        with self._mutex:
            if self._queue:
                self._queue[0].lead = True
                self._queue[0].ready.set()
            else:
                self._leading = False
        for slot in batch:
            slot.ready.set()


def _replay_or_refuse(request: ErasureRequest, digest: str, existing) -> SubmitOutcome:
    """The same request id again: its stored outcome when the payload matches, ALREADY_EXISTS otherwise.

    Another identity's request id answers like a different payload: a caller learns nothing about requests it
    did not submit (not even their job ids)."""
    foreign = (request.submitter_hash is not None and existing.submitter_hash is not None
               and existing.submitter_hash != request.submitter_hash)
    if existing.payload_digest != digest or foreign:
        raise AlreadyExists(f"request_id {preview(request.request_id)} was already used with a different payload",
                            (FieldViolation("request_id", "reused with a different payload"),))
    return SubmitOutcome(request.request_id, tuple(existing.outcome_job_ids), False, existing.first_event_seq)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _outcome(error: ServiceError) -> str:
    return {InvalidArgument: "invalid_argument", AlreadyExists: "already_exists", NotFound: "not_found",
            FailedPrecondition: "failed_precondition", DeadlineExceeded: "deadline_exceeded",
            Unimplemented: "unimplemented"}.get(type(error), "error")
