"""Intake of updates and rectifications (issue 13): validate, refuse anything erased, stage, commit, acknowledge.

An update brings new records for one model to learn; a rectification corrects existing records of one data
subject (GDPR Art. 16): the old values are erased and the corrected ones learned, in one job per model.
The path mirrors an erasure's (:mod:`service.intake`):

1. Shape: ids by the one id rule, bounded row counts (``LETHE_MAX_INLINE_UPDATE_ROWS`` inline,
   ``LETHE_MAX_UPDATE_ROWS`` from a Parquet ``dataset_uri`` inside the dataset roots), the task's columns with
   the right types (a classifier's ``features``: finite numbers, the registered dataset's width; ``label``:
   an integer below ``num_classes``, since the head cannot grow; a causal LM's ``prompt`` and ``answer``:
   non-empty text, and optionally ``paraphrase`` and ``perturbed`` together, as in a registered dataset, so
   that a later erasure of the new records can run the gate's knowledge check on them; the job checks that
   they fit the model's context). Every problem is INVALID_ARGUMENT naming the field (``records[3].columns.label``).
2. Guards: a record of a subject with an erasure request on the model, a record id that was erased
   (tombstoned), or a label of an erased class is FAILED_PRECONDITION naming the record. Nothing erased comes
   back through an update. An update's record ids must be new (an existing one is corrected by a
   rectification); a rectification's must exist and belong to its subject (NOT_FOUND otherwise, without
   saying whose a record is).
3. Staging: the records (clear ids: training data) go to a Parquet file in the dataset catalog, and to
   MLflow for workers on other hosts; the job store keeps only keyed hashes and the file's location.
4. One transaction: the request row, a job per model (updates coalesce like erasures: same model, strategy
   and parameters within the window), ACCEPTED events, the audit entry. The acknowledgement follows it.

Idempotent: the same request id with the same payload returns the earlier outcome; another payload is
ALREADY_EXISTS. A staged file whose transaction then failed is unreferenced scratch (housekeeping removes it).
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd

from service import store as db
from service.audit import canonical_json, keyed_hash, sha256_hex
from service.context import ModelInfo, PipelineContext
from service.datasets import PROBE_COLUMNS, is_null, read_parquet, resolve_dataset_uri
from service.domain import (
    DeadlineExceeded,
    EventKind,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    JobState,
    NewRecord,
    NotFound,
    RectificationSubmission,
    ServiceError,
    SubmitOutcome,
    TaskType,
    UpdateSubmission,
    id_problem,
    preview,
)
from service.intake import MAX_VIOLATIONS, _outcome, _utc
from service.intake_commit import replay_or_refuse
from service.updates import update_strategy

MAX_TEXT_LENGTH = 4096  # characters of one prompt or answer


class UpdateIntake:
    """Implements ``EngineProtocol.submit_update`` and ``submit_rectification``."""

    def __init__(self, ctx: PipelineContext):
        self.ctx = ctx

    # -------------------------------------------------------------------------------------------- update
    def submit_update(self, request: UpdateSubmission) -> SubmitOutcome:
        return self._counted("update", lambda: self._submit_update(request))

    def _submit_update(self, request: UpdateSubmission) -> SubmitOutcome:
        limit = self.ctx.settings.max_id_length
        violations = [FieldViolation("request_id", p) for p in [id_problem(request.request_id, limit)] if p]
        problem = id_problem(request.model_name, limit)
        if problem:
            violations.append(FieldViolation("model_name", problem))
        if bool(request.records) == bool(request.dataset_uri):
            violations.append(FieldViolation("records", "give the records inline or a dataset_uri, exactly one"))
        if len(request.records) > self.ctx.settings.max_inline_update_rows:
            violations.append(FieldViolation("records", f"{len(request.records)} inline records; at most "
                                             f"{self.ctx.settings.max_inline_update_rows} (send more as a "
                                             "Parquet dataset_uri)"))
        if violations:
            raise InvalidArgument("invalid update", tuple(violations))
        # Idempotency first, on the submission as sent: a client replaying after a lost ack gets its original
        # answer even once the job ran (its records are then training data, which the checks below refuse).
        deadline = _utc(request.deadline)
        digest = self._submission_digest("update", request.request_id, {
            "model": request.model_name, "records": _records_json(request.records),
            "dataset_uri": request.dataset_uri, "strategy": request.strategy, "params": request.strategy_params,
            "deadline": deadline.isoformat() if deadline else None})
        replay = self._replay(request.request_id, digest, request.submitter_hash)
        if replay is not None:
            return replay
        info, data = self._model(request.model_name, "model_name")
        strategy, params = update_strategy(info, request.strategy, request.strategy_params)
        frame = (self._inline_frame(request.records, info, data, "records") if request.records
                 else self._uri_frame(request.dataset_uri, info, data))
        self._refuse_erased(info, frame, "records" if request.records else "dataset")
        existing = np.isin(np.array([self.ctx.catalog.tombstone(r) for r in frame["record_id"]]), data.record_hashes)
        if existing.any():
            field = f"records[{int(np.flatnonzero(existing)[0])}].record_id" if request.records else "dataset.record_id"
            raise InvalidArgument("a record id of the update is already in the training data", (FieldViolation(
                field, "already in the training data: correct an existing record with a rectification"),))
        if deadline is not None and deadline <= db.utcnow():
            raise DeadlineExceeded(f"the request's deadline {deadline.isoformat()} has already passed",
                                   (FieldViolation("deadline", "already passed at submission"),))
        staged = self._stage(info, frame, request.request_id)
        return self._commit("update", request.request_id, digest, request.submitter_hash, deadline,
                            subject_hashes=sorted({self.ctx.catalog.subject_hash(s) for s in frame["subject_id"]}),
                            record_hashes=sorted(self.ctx.catalog.tombstone(r) for r in frame["record_id"]),
                            targets=[(info, strategy, params, len(frame), staged)])

    # ------------------------------------------------------------------------------------- rectification
    def submit_rectification(self, request: RectificationSubmission) -> SubmitOutcome:
        return self._counted("rectify", lambda: self._submit_rectification(request))

    def _submit_rectification(self, request: RectificationSubmission) -> SubmitOutcome:
        limit = self.ctx.settings.max_id_length
        violations = [FieldViolation(field, p) for field, p in (("request_id", id_problem(request.request_id, limit)),
                                                               ("subject_id", id_problem(request.subject_id, limit)))
                      if p]
        if not request.corrected:
            violations.append(FieldViolation("corrected_records", "name at least one record to correct"))
        if len(request.corrected) > self.ctx.settings.max_inline_update_rows:
            violations.append(FieldViolation("corrected_records", f"at most "
                                             f"{self.ctx.settings.max_inline_update_rows} records"))
        for index, name in enumerate(request.model_names):
            problem = id_problem(name, limit)
            if problem:
                violations.append(FieldViolation(f"model_names[{index}]", problem))
        if violations:
            raise InvalidArgument("invalid rectification", tuple(violations))
        subject_hash = self.ctx.catalog.subject_hash(request.subject_id)
        deadline = _utc(request.deadline)  # idempotency first, as for an update (the old values go after it)
        digest = self._submission_digest("rectify", request.request_id, {
            "subject": subject_hash, "corrected": _records_json(request.corrected),
            "models": list(request.model_names), "strategy": request.strategy, "params": request.strategy_params,
            "deadline": deadline.isoformat() if deadline else None})
        replay = self._replay(request.request_id, digest, request.submitter_hash)
        if replay is not None:
            return replay
        old_hashes = [self.ctx.catalog.tombstone(r.record_id) for r in request.corrected]
        suffix = sha256_hex(request.request_id)[:8]
        with self.ctx.store.read() as conn:
            names = list(request.model_names) or [row.model_name for row in db.list_models(conn)]
        targets, found = [], np.zeros(len(request.corrected), dtype=bool)
        for index, name in enumerate(names):
            info, data = self._model(name, f"model_names[{index}]" if request.model_names else "model_names")
            rows = np.array([_row_of(data.record_hashes, h) for h in old_hashes])
            ours = np.array([row >= 0 and data.subject_hashes[row] == subject_hash for row in rows], dtype=bool)
            if not ours.any() and not request.model_names:
                continue  # this model never saw the subject's records
            if not ours.all():  # NOT_FOUND either way: whose record it is, if anyone's, is not said
                missing = int(np.flatnonzero(~ours)[0])
                raise NotFound("no record of this subject with this id in the model's training data", (
                    FieldViolation(f"corrected_records[{missing}].record_id", "not a record of this subject"),))
            found |= ours
            corrected = tuple(NewRecord(f"{record.record_id}#r{suffix}", request.subject_id, record.columns)
                              for record in request.corrected)
            frame = self._inline_frame(corrected, info, data, "corrected_records")
            frame["split"] = data.splits[rows]  # a corrected record keeps its split (train or holdout)
            self._refuse_erased(info, frame, "corrected_records", subjects=False)
            strategy, params = update_strategy(info, request.strategy, request.strategy_params)
            targets.append((info, strategy, params, len(frame), frame))
        if not found.all():
            missing = int(np.flatnonzero(~found)[0])
            raise NotFound("no record of this subject with this id in any model's training data", (
                FieldViolation(f"corrected_records[{missing}].record_id", "not a record of this subject"),))
        if deadline is not None and deadline <= db.utcnow():
            raise DeadlineExceeded(f"the request's deadline {deadline.isoformat()} has already passed",
                                   (FieldViolation("deadline", "already passed at submission"),))
        staged = [(info, strategy, params, rows, self._stage(info, frame, request.request_id))
                  for info, strategy, params, rows, frame in targets]
        return self._commit("rectify", request.request_id, digest, request.submitter_hash, deadline,
                            subject_hashes=[subject_hash], record_hashes=sorted(old_hashes), targets=staged)

    # ----------------------------------------------------------------------------------------- pieces
    def _counted(self, kind: str, submit) -> SubmitOutcome:
        try:
            outcome = submit()
        except ServiceError as error:
            self.ctx.metrics.requests.labels(kind, _outcome(error)).inc()
            raise
        self.ctx.metrics.requests.labels(kind, "accepted" if outcome.created else "replayed").inc()
        return outcome

    def _model(self, name: str, field: str):
        """The registered model and its current dataset version (loaded)."""
        with self.ctx.store.read() as conn:
            row = db.get_model(conn, name)
            dataset = db.dataset_for_model_version(conn, name, row.serving_version) if row else None
        if row is None or dataset is None:
            raise NotFound(f"no unlearnable model named {preview(name)}", (FieldViolation(field, "unknown model"),))
        return ModelInfo.from_row(row), self.ctx.catalog.load(dataset.path, dataset.digest)

    def _inline_frame(self, records, info: ModelInfo, data, field: str) -> pd.DataFrame:
        """Inline records as a dataset frame (split ``train``), every problem named by its field path."""
        limit = self.ctx.settings.max_id_length
        violations: list[FieldViolation] = []
        seen: set[str] = set()
        rows = []
        for index, record in enumerate(records):
            path = f"{field}[{index}]"
            for key, value in (("record_id", record.record_id), ("subject_id", record.subject_id)):
                problem = id_problem(value, limit)
                if problem:
                    violations.append(FieldViolation(f"{path}.{key}", problem))
            if record.record_id in seen:
                violations.append(FieldViolation(f"{path}.record_id", "duplicate record id in this request"))
            seen.add(record.record_id)
            columns, problems = _task_columns(record.columns, info, data, f"{path}.columns")
            violations += problems
            rows.append({"record_id": record.record_id, "subject_id": record.subject_id, "split": "train", **columns})
            if len(violations) > MAX_VIOLATIONS:
                break
        counts = {len(row["perturbed"]) for row in rows if row.get("perturbed") is not None}
        if len(counts) > 1:  # the dataset's own count is checked per record (_probe_columns)
            violations.append(FieldViolation(f"{field}", "every record's perturbed list must have one length; "
                                                         f"this request has lengths {sorted(counts)}"))
        if violations:
            raise InvalidArgument("invalid records", tuple(violations[:MAX_VIOLATIONS]))
        return pd.DataFrame(rows)

    def _uri_frame(self, uri: str, info: ModelInfo, data) -> pd.DataFrame:
        location = resolve_dataset_uri(uri, self.ctx.settings.dataset_roots, self.ctx.settings.dataset_import_dir)
        frame = read_parquet(location)
        if len(frame) > self.ctx.settings.max_update_rows:
            raise InvalidArgument("too many records", (FieldViolation(
                "dataset_uri", f"{len(frame)} records; at most {self.ctx.settings.max_update_rows} per update"),))
        columns = (["features", "label"] if info.task_type is TaskType.CLASSIFICATION
                   else ["prompt", "answer", *(c for c in PROBE_COLUMNS if c in frame.columns)])
        missing = [c for c in ("record_id", "subject_id", *columns) if c not in frame.columns]
        if missing:
            raise InvalidArgument("the update's dataset lacks columns", (FieldViolation(
                "dataset.columns", f"required column(s) missing: {', '.join(missing)}"),))
        if "split" in frame.columns and (frame["split"].astype(str) != "train").any():
            raise InvalidArgument("an update holds training records only", (FieldViolation(
                "dataset.split", "every record of an update is a training record (split 'train' or no column)"),))
        records = tuple(NewRecord(str(row.record_id), str(row.subject_id),
                                  {c: None if is_null(getattr(row, c)) else getattr(row, c) for c in columns})
                        for row in frame.itertuples(index=False))
        try:
            return self._inline_frame(records, info, data, "dataset.rows")
        except InvalidArgument as error:  # the same checks, paths by row number
            raise InvalidArgument("invalid records in the update's dataset", error.violations) from None

    def _refuse_erased(self, info: ModelInfo, frame: pd.DataFrame, field: str, subjects: bool = True) -> None:
        """Nothing erased comes back: an erased subject, an erased record id, a label of an erased class."""
        with self.ctx.store.read() as conn:
            erased_subjects, pending_classes = db.erasure_selectors(conn, info.name)
            record_hashes = [self.ctx.catalog.tombstone(r) for r in frame["record_id"]]
            dead = db.tombstoned(conn, record_hashes)
        classes = set(self.ctx.registry.erased_classes(info.name, info.serving_version)) | set(pending_classes)
        for index, row in enumerate(frame.itertuples(index=False)):
            if subjects and self.ctx.catalog.subject_hash(str(row.subject_id)) in erased_subjects:
                raise FailedPrecondition("the update holds a record of a subject whose data was erased", (
                    FieldViolation(f"{field}[{index}].subject_id", "this subject's data was erased from the model"),))
            if record_hashes[index] in dead:
                raise FailedPrecondition("the update holds a record id that was erased", (
                    FieldViolation(f"{field}[{index}].record_id", "this record was erased and may not return"),))
            if info.task_type is TaskType.CLASSIFICATION and int(row.label) in classes:
                raise FailedPrecondition("the update holds a record of an erased class", (
                    FieldViolation(f"{field}[{index}].columns.label", f"class {int(row.label)} was erased "
                                                                       "from the model"),))

    def _submission_digest(self, kind: str, request_id: str, submission: dict[str, Any]) -> str:
        """The keyed digest of a submission as sent (record and subject ids only inside the keyed hash)."""
        return keyed_hash(self.ctx.settings.subject_hash_key_bytes, "payload",
                          canonical_json({"kind": kind, **submission}))

    def _replay(self, request_id: str, digest: str, submitter_hash: str | None) -> SubmitOutcome | None:
        with self.ctx.store.read() as conn:
            existing = db.get_request(conn, request_id)
        if existing is None:
            return None
        return replay_or_refuse(_Caller(request_id, submitter_hash), digest, existing)

    def _stage(self, info: ModelInfo, frame: pd.DataFrame, request_id: str) -> dict[str, Any]:
        """The records as a staged training-data file (catalog + MLflow); returns its description."""
        name = f"staged-{sha256_hex(request_id)[:16]}"
        path, digest = self.ctx.catalog.write_version(info.name, frame.reset_index(drop=True), name)
        artifact_uri = self.ctx.registry.stage_artifact(path)
        return {"path": str(path), "digest": digest, "rows": len(frame), "artifact_uri": artifact_uri}

    def _commit(self, kind: str, request_id: str, digest: str, submitter_hash: str | None, deadline,
                subject_hashes: list[str], record_hashes: list[str], targets: list) -> SubmitOutcome:
        now = db.utcnow()
        window = timedelta(seconds=self.ctx.settings.coalescing_window_s)
        payload = {info.name: {**staged, "strategy": strategy, "strategy_params": params}
                   for info, strategy, params, _, staged in targets}
        with self.ctx.store.write() as conn:
            existing = db.get_request(conn, request_id)
            if existing is not None:  # stored meanwhile by another call
                return replay_or_refuse(_Caller(request_id, submitter_hash), digest, existing)
            db.insert_request(conn, request_id=request_id, payload_digest=digest, kind=kind,
                              subject_hashes=subject_hashes, record_hashes=record_hashes,
                              submitter_hash=submitter_hash, classes=[], model_names=[t[0].name for t in targets],
                              method=None, method_params={}, policy_overrides={}, deadline=deadline,
                              received_at=now, state="PENDING", first_event_seq=0, outcome_job_ids=[],
                              payload=payload)
            job_ids, seqs = [], []
            for info, strategy, params, rows, _ in targets:
                if kind == "update":
                    method, method_params = strategy, params
                    key = sha256_hex(canonical_json({"kind": kind, "strategy": strategy, "params": params}))[:32]
                    job_id = db.open_job_for(conn, info.name, key, now) if window.total_seconds() > 0 else None
                else:  # a rectification's job erases with the policy chain's first method, then learns
                    first = info.policy.method_chain[0]
                    method, method_params, key, job_id = first.name, dict(first.params), f"rectify-{request_id}", None
                if job_id is None:
                    job_id = f"job-{uuid.uuid4().hex[:20]}"
                    db.insert_job(conn, job_id=job_id, model_name=info.name, coalesce_key=key, selector=kind,
                                  state=JobState.QUEUED.value, stage="queued", progress=0.0, method=method,
                                  method_params=method_params, policy_overrides={},
                                  base_version=info.serving_version, records=0, message="", evidence={},
                                  attempts=0, window_closes_at=now + window)
                    message = f"accepted; new {kind} job {job_id} on model {info.name}"
                else:
                    message = f"accepted; coalesced into {kind} job {job_id} on model {info.name}"
                db.link_request(conn, job_id, request_id)
                job = db.get_job(conn, job_id)
                db.update_job(conn, job_id, records=job.records + rows)
                job_ids.append(job_id)
                seqs.append(db.add_event(conn, job_id, (request_id,), EventKind.ACCEPTED.value,
                                         JobState.QUEUED.value, "queued", 0.0, message))
            self.ctx.audit.append(conn, "request_received", {
                "request_id": request_id, "request_kind": kind, "payload_digest": digest, "subjects": len(subject_hashes),
                "records": sum(t[3] for t in targets), "models": [t[0].name for t in targets]})
            db.set_request_jobs(conn, request_id, job_ids)
            conn.execute(db.requests.update().where(db.requests.c.request_id == request_id)
                         .values(first_event_seq=min(seqs)))
        return SubmitOutcome(request_id, tuple(job_ids), True, min(seqs))


class _Caller:
    """What the replay rule reads of a caller: the request id and who submitted it."""

    def __init__(self, request_id: str, submitter_hash: str | None):
        self.request_id, self.submitter_hash = request_id, submitter_hash


def _task_columns(columns: dict[str, Any], info: ModelInfo, data, path: str) -> tuple[dict, list[FieldViolation]]:
    """The task's columns of one record, converted, with every problem as a field violation."""
    violations = []
    if info.task_type is TaskType.CAUSAL_LM:
        wanted = ("prompt", "answer", *PROBE_COLUMNS)
        out = {}
        for key in ("prompt", "answer"):
            value = columns.get(key)
            if not _text(value):
                violations.append(FieldViolation(f"{path}.{key}", f"non-empty text of at most {MAX_TEXT_LENGTH} "
                                                                  "characters"))
            out[key] = value
        probe, problems = _probe_columns(columns, data, path)
        out.update(probe)
        violations += problems
    else:
        wanted = ("features", "label")
        width = data.features.shape[1]
        features = columns.get("features")
        try:
            array = np.asarray(features, dtype=np.float64)
            if array.ndim != 1 or array.shape[0] != width or not np.isfinite(array).all():
                raise ValueError
        except (TypeError, ValueError):
            violations.append(FieldViolation(f"{path}.features", f"a list of {width} finite numbers"))
            array = None
        label = columns.get("label")
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label) \
                or float(label) != int(label) or not 0 <= int(label) < info.num_classes:
            violations.append(FieldViolation(f"{path}.label", f"an integer in [0, {info.num_classes}) (the model's "
                                                              "head cannot grow)"))
            label = None
        out = {"features": None if array is None else array.astype(np.float32).tolist(),
               "label": None if label is None else int(label)}
    for key in sorted(set(columns) - set(wanted)):
        violations.append(FieldViolation(f"{path}.{key}", f"unknown column; expected {', '.join(wanted)}"))
    return out, violations


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip()) and len(value) <= MAX_TEXT_LENGTH


def _probe_columns(columns: dict[str, Any], data, path: str) -> tuple[dict, list[FieldViolation]]:
    """A causal-LM record's optional ``paraphrase`` and ``perturbed`` (:data:`service.datasets.PROBE_COLUMNS`):
    both or neither; a non-empty text and a non-empty list of non-empty texts, as many wrong answers as the
    registered dataset's records have. Absent (or null) in both: ``{}``."""
    paraphrase, perturbed = columns.get("paraphrase"), columns.get("perturbed")
    if paraphrase is None and perturbed is None:
        return {}, []
    if paraphrase is None or perturbed is None:
        missing = "paraphrase" if paraphrase is None else "perturbed"
        return {}, [FieldViolation(f"{path}.{missing}", "paraphrase and perturbed go together: give both or neither")]
    violations = []
    if not _text(paraphrase):
        violations.append(FieldViolation(f"{path}.paraphrase", f"non-empty text of at most {MAX_TEXT_LENGTH} characters"))
    items = list(perturbed) if isinstance(perturbed, (list, tuple, np.ndarray)) else None
    if not items or not all(_text(item) for item in items):
        violations.append(FieldViolation(f"{path}.perturbed", f"a non-empty list of non-empty texts of at most "
                                                              f"{MAX_TEXT_LENGTH} characters"))
        return {}, violations
    counts = {len(w) for w in (data.perturbed or ()) if w is not None}
    if counts and len(items) not in counts:
        violations.append(FieldViolation(f"{path}.perturbed", f"{len(items)} wrong answers; the model's dataset has "
                                                              f"{min(counts)} per record"))
    return {"paraphrase": paraphrase, "perturbed": [str(item) for item in items]}, violations


def _row_of(record_hashes: np.ndarray, record_hash: str) -> int:
    """The row of a record (by its keyed hash) in a dataset version, or -1."""
    rows = np.flatnonzero(record_hashes == record_hash)
    return int(rows[0]) if len(rows) else -1


def _records_json(records) -> list[list[Any]]:
    """Records as sent, in a canonical form for the submission digest (columns as JSON, NaN kept as text)."""
    return [[str(r.record_id), str(r.subject_id), json.dumps(r.columns, sort_keys=True, default=str)]
            for r in records]
