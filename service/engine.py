"""The engine behind :class:`service.domain.EngineProtocol`: validation, durable submission, coalescing,
in-process workers, recovery, events, certificates (DESIGN.md, "Embedded default and scale-out").

- Nothing is written on error: every check (shape, idempotency, deadline, models, method and parameters)
  runs before the one transaction that stores the request.
- An acknowledgement (the return of :meth:`Engine.submit_erasure`) follows that transaction's commit.
- Coalescing: a request joins a QUEUED job of the same model, method, parameters and policy overrides
  whose window (``coalescing_window_s`` from the job's first request) is still open; otherwise it opens a
  new job. A job runs once its window closes. Jobs of one model lineage run one at a time, each from the
  version the previous one produced (the store's ``serving_version``, Lethe's head of the lineage).
- Crash safety: on :meth:`Engine.start`, RUNNING jobs (their process died) are re-queued and resumed;
  the pipeline's stages are idempotent and MLflow registration is exactly-once per job id.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from service import lm_support
from service import store as db
from service.audit import AuditLog, canonical_json, keyed_hash, sha256_hex
from service.datasets import DatasetCatalog, read_parquet, record_tombstone, validate_frame
from service.domain import (
    AlreadyExists,
    Certificate,
    CertificateCheck,
    DeadlineExceeded,
    ErasureRequest,
    EventKind,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    JobEvent,
    JobFilter,
    JobState,
    JobView,
    ModelRegistration,
    NotFound,
    PendingRequest,
    RegisteredModel,
    ServiceError,
    SubmitOutcome,
    TaskType,
    Unimplemented,
    VerificationPolicy,
)
from service.metrics import Metrics
from service.mlflow_registry import MlflowRegistry
from service.pipeline import NO_RECORDS, STAGES, ModelInfo, PipelineContext, _certify, run_job
from service.settings import Settings
from service.store_metrics import StoreCollector
from service.verification import OVERRIDE_LIMITS, override_violations
from unlearn import registry as methods
from unlearn.device import resolve_device
from unlearn.data import classification_examples
from unlearn.errors import InvalidDataError, InvalidParameterError, UnknownMethodError
from unlearn.tasks import ClassificationTask

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # a job that killed its process this often is marked FAILED instead of retried forever
IDLE_WAIT_S = 1.0  # upper bound of a worker's wait between store checks when nothing wakes it


class Engine:
    """Implements :class:`service.domain.EngineProtocol` on the embedded default."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = db.Store(self.settings.job_store_url)
        self.audit = AuditLog(self.settings.audit_key_bytes)
        self.catalog = DatasetCatalog(self.settings.datasets_dir, self.settings.subject_hash_key_bytes)
        self.metrics = Metrics(self._oldest_pending_age_s, self._overdue_pending_count)
        self.metrics.registry.register(StoreCollector(self.store, self.settings.audit_key_bytes, STAGES))
        self.registry = MlflowRegistry(self.settings.mlflow_tracking_uri, self.settings.mlflow_artifact_root,
                                       self.settings.mlflow_experiment, self.settings.serving_alias)
        self.device = resolve_device(self.settings.device)
        self.context = PipelineContext(self.settings, self.store, self.registry, self.catalog, self.audit,
                                       self.metrics, self.device)
        self._stopping = threading.Event()
        self._workers: list[threading.Thread] = []
        self._submit_lock = threading.Lock()  # coalescing decisions are made one request at a time
        self._claim_lock = threading.Lock()
        self._busy_models: set[str] = set()

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Re-queue jobs a dead process left RUNNING, then start the workers."""
        self._recover()
        self._stopping.clear()
        for index in range(self.settings.worker_threads):
            worker = threading.Thread(target=self._work, name=f"lethe-worker-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self, grace_s: float = 30.0) -> bool:
        """Stop taking jobs and wait up to ``grace_s`` for running ones; True when all workers ended.

        A job still running after the grace period stays RUNNING in the store and is resumed by the next
        :meth:`start` (its stages are idempotent), so stopping never loses work.
        """
        self._stopping.set()
        self.store.wake()
        deadline = time.monotonic() + grace_s
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        alive = [w for w in self._workers if w.is_alive()]
        self._workers = alive
        return not alive

    def _recover(self) -> None:
        with self.store.write() as conn:
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

    # ---------------------------------------------------------------------------------------- workers
    def _work(self) -> None:
        while not self._stopping.is_set():
            self.metrics.heartbeat()
            generation = self.store.generation()
            claimed = self._claim()
            if claimed is None:
                self.store.wait_for_change(generation, self._idle_timeout_s())
                continue
            job_id, model_name = claimed
            self.metrics.jobs_in_flight.inc()
            try:
                run_job(self.context, job_id)
            except Exception as error:  # any failure of one job must not stop the worker
                log.exception("job %s failed", job_id)
                self._fail(job_id, error)
            finally:
                self.metrics.jobs_in_flight.dec()
                with self._claim_lock:
                    self._busy_models.discard(model_name)

    def _idle_timeout_s(self) -> float:
        with self.store.read() as conn:
            closes = db.next_window_close(conn)
        if closes is None:
            return IDLE_WAIT_S
        return min(IDLE_WAIT_S, max(0.01, (closes - db.utcnow()).total_seconds()))

    def _claim(self) -> tuple[str, str] | None:
        with self._claim_lock:
            with self.store.read() as conn:
                candidate = db.next_runnable_job(conn, db.utcnow(), sorted(self._busy_models))
            if candidate is None:
                return None
            with self.store.write() as conn:
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

    def _fail(self, job_id: str, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        with self.store.write() as conn:
            job = db.get_job(conn, job_id)
            request_ids = db.job_request_ids(conn, job_id)
            db.update_job(conn, job_id, state=JobState.FAILED.value, message=message)
            db.add_event(conn, job_id, request_ids, EventKind.TERMINAL.value, JobState.FAILED.value, job.stage,
                         job.progress, message)
            self.audit.append(conn, "job_failed", {"job_id": job_id, "model_name": job.model_name,
                                                   "request_ids": list(request_ids), "error": message})

    # ------------------------------------------------------------------------------------- registration
    def register_model(self, registration: ModelRegistration) -> RegisteredModel:
        """Validate everything, then write the dataset copy, MLflow tags and the store rows."""
        version, frame, policy = self._validate_registration(registration)
        violations = self._tombstone_violations(frame)
        if registration.task_type is TaskType.CAUSAL_LM:  # tokenizer, context and vocabulary checks
            model, tokenizer = self.registry.load_lm(registration.model_name, version)
            violations += lm_support.registration_violations(model, tokenizer, frame)
        else:
            model = self.registry.load_model(registration.model_name, version)
            holdout = frame[frame["split"] == "holdout"].head(4)  # the model must accept the data's features
            examples = classification_examples(
                torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in holdout["features"]])),
                torch.from_numpy(holdout["label"].to_numpy(dtype=np.int64, copy=True)))
            try:
                ClassificationTask(registration.num_classes).validate(model, examples, "dataset.features")
            except InvalidDataError as error:
                violations.append(FieldViolation(error.field, error.reason))
        if violations:
            raise InvalidArgument("the dataset cannot be registered", tuple(violations))

        path, digest = self.catalog.write_version(registration.model_name, frame, f"registered-v{version}")
        training = {"model_factory": registration.model_factory, "train_recipe": dict(registration.train_recipe)}
        mlflow_version = self.registry.resolve(registration.model_name, version)
        artifact_uri = self.registry.attach_dataset(mlflow_version, path, {
            "lethe.unlearnable": "true", "lethe.task_type": registration.task_type.value,
            "lethe.num_classes": str(registration.num_classes or 0), "lethe.policy": _policy_json(policy),
            "lethe.training": training, "lethe.dataset_digest": digest,
            "lethe.code_version": self.settings.code_version})
        self.registry.set_serving(registration.model_name, version)
        with self.store.write() as conn:
            db.upsert_model(conn, registration.model_name, version, registration.task_type.value,
                            registration.num_classes, _policy_json(policy), training)
            db.insert_dataset_version(conn, registration.model_name, digest, str(path), len(frame), version, None,
                                      artifact_uri)
            self.audit.append(conn, "model_registered", {
                "model_name": registration.model_name, "version": version, "dataset_digest": digest,
                "records": len(frame), "policy": _policy_json(policy), "code_version": self.settings.code_version})
        return RegisteredModel(registration.model_name, version, self.settings.serving_alias,
                               registration.task_type, digest, len(frame), policy)

    def _validate_registration(self, registration: ModelRegistration):
        violations: list[FieldViolation] = []
        if not registration.model_name or len(registration.model_name) > self.settings.max_id_length:
            violations.append(FieldViolation("model_name", "must be 1 to "
                                             f"{self.settings.max_id_length} characters"))
        if bool(registration.version) == bool(registration.alias):
            violations.append(FieldViolation("version", "give exactly one of version or alias"))
        if registration.task_type is TaskType.CLASSIFICATION and (registration.num_classes is None
                                                                  or registration.num_classes < 2):
            violations.append(FieldViolation("num_classes", "a classifier needs num_classes >= 2"))
        violations += _policy_violations(registration.policy)
        if registration.model_factory and ":" not in registration.model_factory:
            violations.append(FieldViolation("model_factory", "expected 'module:function'"))
        if violations:
            raise InvalidArgument("invalid model registration", tuple(violations))
        if not self.registry.model_exists(registration.model_name):
            raise NotFound(f"MLflow has no registered model {registration.model_name!r}",
                           (FieldViolation("model_name", "no such registered model in MLflow"),))
        version = str(self.registry.resolve(registration.model_name, registration.version, registration.alias).version)
        frame = read_parquet(registration.dataset_uri)
        violations = validate_frame(frame, registration.task_type, registration.num_classes)
        if violations:
            raise InvalidArgument("the dataset cannot be registered", tuple(violations))
        return version, frame, registration.policy

    def _tombstone_violations(self, frame) -> list[FieldViolation]:
        hashes = [record_tombstone(self.settings.subject_hash_key_bytes, r) for r in frame["record_id"].astype(str)]
        with self.store.read() as conn:
            dead = db.tombstoned(conn, hashes)
        if not dead:
            return []
        erased = [r for r, h in zip(frame["record_id"].astype(str), hashes) if h in dead]
        return [FieldViolation("dataset.record_id", f"{len(erased)} record(s) were erased earlier and may not be "
                                                    f"re-ingested (e.g. {', '.join(erased[:3])})")]

    # ---------------------------------------------------------------------------------------- submission
    def submit_erasure(self, request: ErasureRequest) -> SubmitOutcome:
        try:
            outcome = self._submit(request)
        except ServiceError as error:
            self.metrics.requests.labels("erase", _outcome(error)).inc()
            raise
        self.metrics.requests.labels("erase", "accepted" if outcome.created else "replayed").inc()
        return outcome

    def _submit(self, request: ErasureRequest) -> SubmitOutcome:
        violations = self._shape_violations(request)
        if violations:
            raise InvalidArgument("invalid erasure request", tuple(violations))
        subject_hashes = sorted(self.catalog.subject_hash(s) for s in request.subject_ids)
        deadline = _utc(request.deadline)
        payload = canonical_json({
            "kind": "erase", "subjects": subject_hashes, "records": sorted(request.record_ids),
            "classes": sorted(request.classes), "models": sorted(request.model_names), "method": request.method,
            "method_params": request.method_params, "policy_overrides": request.policy_overrides,
            "deadline": deadline.isoformat() if deadline else None})
        digest = keyed_hash(self.settings.subject_hash_key_bytes, "payload", payload)
        with self._submit_lock:
            replay = self._replay(request.request_id, digest)
            if replay is not None:
                return replay
            if deadline is not None and deadline <= db.utcnow():
                raise DeadlineExceeded(f"the request's deadline {deadline.isoformat()} has already passed",
                                       (FieldViolation("deadline", "already passed at submission"),))
            targets = self._targets(request, subject_hashes)
            return self._commit(request, subject_hashes, digest, deadline, targets)

    def _replay(self, request_id: str, digest: str) -> SubmitOutcome | None:
        with self.store.read() as conn:
            existing = db.get_request(conn, request_id)
        if existing is None:
            return None
        if existing.payload_digest != digest:
            raise AlreadyExists(f"request_id {request_id!r} was already used with a different payload",
                                (FieldViolation("request_id", "reused with a different payload"),))
        return SubmitOutcome(request_id, tuple(existing.outcome_job_ids), False, existing.first_event_seq)

    def _shape_violations(self, request: ErasureRequest) -> list[FieldViolation]:
        limit, most = self.settings.max_id_length, self.settings.max_ids_per_request
        violations = []
        if not isinstance(request.request_id, str) or not request.request_id.strip():
            violations.append(FieldViolation("request_id", "must be a non-empty string"))
        elif len(request.request_id) > limit or not request.request_id.isprintable():
            violations.append(FieldViolation("request_id", f"must be printable and at most {limit} characters"))
        for name, values in (("subject_ids", request.subject_ids), ("record_ids", request.record_ids),
                             ("model_names", request.model_names)):
            if len(values) > most:
                violations.append(FieldViolation(name, f"{len(values)} ids; at most {most} per request"))
                continue
            seen: set[str] = set()
            for index, value in enumerate(values):
                if not isinstance(value, str) or not value.strip():
                    violations.append(FieldViolation(f"{name}[{index}]", "must be a non-empty string"))
                elif len(value) > limit:
                    violations.append(FieldViolation(f"{name}[{index}]", f"longer than {limit} characters"))
                elif value in seen:
                    violations.append(FieldViolation(f"{name}[{index}]", "duplicate id in this request"))
                seen.add(value)
        seen_classes: set[int] = set()
        for index, value in enumerate(request.classes):
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
        return violations

    def _targets(self, request: ErasureRequest, subject_hashes: list[str]) -> list[dict[str, Any]]:
        """Per model the request touches: method, parameters, and how many records it matches now."""
        with self.store.read() as conn:
            rows = {row.model_name: row for row in db.list_models(conn)}
            datasets = {name: db.dataset_for_model_version(conn, name, row.serving_version)
                        for name, row in rows.items()}
        names = list(request.model_names) or sorted(rows)
        for index, name in enumerate(request.model_names):
            if name not in rows:
                if self.registry.model_exists(name):
                    raise FailedPrecondition(f"model {name!r} exists in MLflow but is not registered as "
                                             "unlearnable (lethe register)",
                                             (FieldViolation(f"model_names[{index}]", f"{name!r} is not unlearnable"),))
                raise NotFound(f"no model named {name!r}",
                               (FieldViolation(f"model_names[{index}]", f"unknown model {name!r}"),))
        targets, violations = [], []
        for name in names:
            info = ModelInfo.from_row(rows[name])
            method = request.method or info.policy.default_method
            params = dict(request.method_params) if request.method else {**info.policy.method_params,
                                                                          **request.method_params}
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
            data = self.catalog.load(dataset.path, dataset.digest)
            matched = int(data.match(set(subject_hashes), set(request.record_ids), set(request.classes)).sum())
            if not (request.model_names or matched):
                continue
            if methods.get(method).erases == "classes" and not request.classes:
                source = "requested" if request.method else "policy default"
                violations.append(FieldViolation("method", f"{method!r} ({source} for model {name!r}) erases whole "
                                                 "classes only; name a record-erasure method for subject or "
                                                 "record erasure"))
                continue
            targets.append({"info": info, "method": method, "params": params, "matched": matched})
        if violations:
            # One bad parameter is one violation, however many targeted models share the method.
            raise InvalidArgument("invalid method or parameters", tuple(dict.fromkeys(violations)))
        return targets

    def _commit(self, request: ErasureRequest, subject_hashes: list[str], digest: str,
                deadline: datetime | None, targets: list[dict[str, Any]]) -> SubmitOutcome:
        now = db.utcnow()
        window = timedelta(seconds=self.settings.coalescing_window_s)
        selector = "classes" if request.classes else "records"
        with self.store.write() as conn:
            if db.get_request(conn, request.request_id) is not None:  # another process won the race
                raise AlreadyExists(f"request_id {request.request_id!r} was stored concurrently")
            db.insert_request(conn, request_id=request.request_id, payload_digest=digest, kind="erase",
                              subject_hashes=subject_hashes, record_ids=sorted(request.record_ids),
                              classes=sorted(request.classes), model_names=[t["info"].name for t in targets] or ["*"],
                              method=request.method, method_params=dict(request.method_params),
                              policy_overrides=dict(request.policy_overrides), deadline=deadline, received_at=now,
                              state="PENDING", first_event_seq=0, outcome_job_ids=[])
            self.audit.append(conn, "request_received", {
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
        _certify(self.context, conn, request_id, model_name, None, {
            "request_id": request_id, "model_name": model_name, "label": NO_RECORDS, "job_id": None,
            "statement": "No records of this request were found in the training data of the searched model(s); "
                         "nothing had to be unlearned.",
            "searched": searched,
            "subjects": {"count": len(subject_hashes), "keyed_sha256": subject_hashes},
            "records": {"matched": 0, "record_ids_sha256": sha256_hex("\n".join(sorted(request.record_ids)))},
            "classes": sorted(request.classes), "code_version": self.settings.code_version})

    # ------------------------------------------------------------------------------------------- reads
    def get_job(self, job_id: str) -> JobView:
        with self.store.read() as conn:
            row = db.get_job(conn, job_id)
            if row is None:
                raise NotFound(f"no job {job_id!r}", (FieldViolation("job_id", "unknown job"),))
            return _job_view(row, db.job_request_ids(conn, job_id))

    def list_jobs(self, job_filter: JobFilter) -> list[JobView]:
        if not 1 <= job_filter.limit <= 10000:
            raise InvalidArgument("invalid job filter", (FieldViolation("limit", "must be in [1, 10000]"),))
        before = db.seconds_ago(job_filter.min_age_s) if job_filter.min_age_s else None
        with self.store.read() as conn:
            rows = db.list_jobs(conn, [s.value for s in job_filter.states], job_filter.model_name, before,
                                job_filter.limit)
            return [_job_view(row, db.job_request_ids(conn, row.job_id)) for row in rows]

    def events(self, after_seq: int = 0, job_ids: tuple[str, ...] = (), request_ids: tuple[str, ...] = (),
               wait_s: float = 0.0) -> list[JobEvent]:
        """Stored events after ``after_seq``; waits on the store's change condition (no busy polling)."""
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            generation = self.store.generation()
            with self.store.read() as conn:
                rows = db.events_after(conn, after_seq, job_ids, request_ids)
                if rows:
                    return [self._event(conn, row) for row in rows]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set() and not self._workers:
                return []
            # Bounded slices so a write from another process (not notified here) is seen within a second.
            self.store.wait_for_change(generation, min(remaining, IDLE_WAIT_S))

    def _event(self, conn, row) -> JobEvent:
        certificate = None
        if row.certificate_id:
            cert = db.get_certificate(conn, row.certificate_id)
            certificate = Certificate(cert.request_id, cert.body_json, cert.signature)
        return JobEvent(row.seq, row.job_id, tuple(row.request_ids), EventKind(row.kind), JobState(row.state),
                        row.stage, row.fraction, row.message, db.as_utc(row.time), certificate)

    def get_certificate(self, request_id: str) -> list[Certificate]:
        with self.store.read() as conn:
            rows = db.certificates_for(conn, request_id)
            known = rows or db.get_request(conn, request_id) is not None
        if not rows:
            reason = "no certificate has been issued yet" if known else "unknown request"
            raise NotFound(f"{reason} for request {request_id!r}", (FieldViolation("request_id", reason),))
        return [Certificate(row.request_id, row.body_json, row.signature) for row in rows]

    def verify_certificate(self, body_json: str, signature: str) -> CertificateCheck:
        check = self.audit.check_certificate(body_json, signature)
        if not check.valid:
            return check
        with self.store.read() as conn:
            issued = any(row.body_json == body_json for row in db.certificates_for(conn, _request_of(body_json)))
        if not issued:
            return CertificateCheck(False, "signed with this service's key but not recorded in its job store")
        return check

    def pending_requests(self) -> list[PendingRequest]:
        now = db.utcnow()
        with self.store.read() as conn:
            rows = db.pending_requests(conn)
        return [PendingRequest(request_id, received_at, deadline, deadline is not None and deadline < now)
                for request_id, received_at, deadline in rows]

    def _overdue_pending_count(self) -> float:
        with self.store.read() as conn:
            return float(db.overdue_pending_count(conn, db.utcnow()))

    def _oldest_pending_age_s(self) -> float:
        with self.store.read() as conn:
            oldest = db.oldest_pending_received_at(conn)
        return 0.0 if oldest is None else max(0.0, (db.utcnow() - oldest).total_seconds())


# ------------------------------------------------------------------------------------------------ helpers
def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _request_of(body_json: str) -> str:
    return str(json.loads(body_json).get("request_id", ""))


def _policy_json(policy: VerificationPolicy) -> dict[str, Any]:
    return asdict(policy)


def _policy_violations(policy: VerificationPolicy) -> list[FieldViolation]:
    violations = []
    for name in OVERRIDE_LIMITS:
        value = getattr(policy, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            violations.append(FieldViolation(f"policy.{name}", f"must be a number in [0, 1], got {value!r}"))
    try:
        methods.parse_config(policy.default_method, policy.method_params)
    except UnknownMethodError as error:
        violations.append(FieldViolation("policy.default_method", str(error)))
    except InvalidParameterError as error:
        violations.append(FieldViolation(f"policy.method_params.{error.field}", error.reason))
    return violations


def _outcome(error: ServiceError) -> str:
    return {InvalidArgument: "invalid_argument", AlreadyExists: "already_exists", NotFound: "not_found",
            FailedPrecondition: "failed_precondition", DeadlineExceeded: "deadline_exceeded",
            Unimplemented: "unimplemented"}.get(type(error), "error")


def _job_view(row, request_ids: tuple[str, ...]) -> JobView:
    return JobView(job_id=row.job_id, model_name=row.model_name, base_version=row.base_version or "",
                   state=JobState(row.state), stage=row.stage, progress=row.progress, method=row.method,
                   request_ids=request_ids, records=row.records, created_at=db.as_utc(row.created_at),
                   updated_at=db.as_utc(row.updated_at), result_version=row.result_version, message=row.message,
                   evidence=dict(row.evidence or {}))
