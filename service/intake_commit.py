"""Intake's durable commit: a batch of validated erasure submissions stored in ONE transaction.

What an accepted request leaves in the store, all in the transaction its acknowledgement waits for: its
request row; per matched model a job (a new one, or the open one it coalesces into) and the link to it; one
ACCEPTED event per job (one with job id "" when it matched nothing); a ``request_received`` audit entry; and
a "no records found" certificate for each searched model it matched nothing of.

A batch costs one statement per table whatever its size (``executemany``: requests, new jobs, links, the
joined jobs' record counts, audit entries, events, their request links, first event seqs), plus one
open-job lookup per coalescing key. One statement per row of each request (about 16 per request) was most
of an acknowledgement's CPU (issue 11).

The store's deadlock rule (row and coalescing locks before the log lock) orders the transaction:

1. the coalescing locks (PostgreSQL), the idempotency check, the job decisions (each open job locked
   ``FOR UPDATE``), the request rows, new jobs, links and record counts;
2. under the log lock: audit entries, events, each request's first event seq, "no records" certificates.

A request's outcome is its own: an id already stored (by another replica meanwhile) or repeated within the
batch is replayed or refused (:func:`replay_or_refuse`) without failing the others.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from service import store as db
from service.audit import NO_RECORDS, canonical_json, certify, sha256_hex
from service.context import PipelineContext
from service.domain import (
    AlreadyExists,
    ErasureRequest,
    EventKind,
    FieldViolation,
    JobState,
    ServiceError,
    SubmitOutcome,
    preview,
)


@dataclass(frozen=True)
class Submission:
    """A validated, resolved request waiting for its group commit. ``targets``: per model it touches, a dict
    of ``info`` (:class:`service.context.ModelInfo`), ``method``, ``params`` and ``matched`` (records)."""

    request: ErasureRequest
    subject_hashes: list[str]
    record_hashes: list[str]
    digest: str
    deadline: datetime | None
    targets: list[dict[str, Any]]


def commit_batch(ctx: PipelineContext, batch: list[Submission]) -> list[SubmitOutcome | ServiceError]:
    """Store ``batch`` in one transaction; one outcome (or refusal) per submission, in order."""
    now = db.utcnow()
    window = timedelta(seconds=ctx.settings.coalescing_window_s)
    results: list[SubmitOutcome | ServiceError | None] = [None] * len(batch)
    storing: dict[str, int] = {}  # request id -> index of the submission that stores it
    with ctx.store.write() as conn:
        db.lock_coalescing(conn, [(t["info"].name, coalesce_key(s, t)) for s in batch for t in s.targets
                                  if t["matched"]])
        stored = db.request_outcomes(conn, [submission.request.request_id for submission in batch])
        for index, submission in enumerate(batch):
            request_id = submission.request.request_id
            if request_id in stored:
                results[index] = _replayed(submission.request, submission.digest, stored[request_id])
            elif request_id not in storing:
                storing[request_id] = index
        accepted = [batch[index] for index in storing.values()]
        jobs = _store_requests(conn, accepted, now, window)
        first_seqs = _log_accepted(conn, ctx, accepted, jobs)
    for (request_id, index), request_jobs in zip(storing.items(), jobs):
        results[index] = SubmitOutcome(request_id, tuple(job_id for job_id, _ in request_jobs), True,
                                       first_seqs[request_id])
    for index, submission in enumerate(batch):  # the same id again within the batch: replay or refusal
        if results[index] is None:
            first = storing[submission.request.request_id]
            outcome = results[first]
            results[index] = _replayed(submission.request, submission.digest, _Stored(
                batch[first].digest, batch[first].request.submitter_hash, outcome.job_ids, outcome.first_event_seq))
    return results


def coalesce_key(submission: Submission, target: dict[str, Any]) -> str:
    """What a request must share with a queued job to join it (besides the model): method, parameters,
    policy overrides, and whether it erases records or classes."""
    selector = "classes" if submission.request.classes else "records"
    return sha256_hex(canonical_json({"method": target["method"], "params": target["params"],
                                      "overrides": dict(submission.request.policy_overrides),
                                      "selector": selector}))[:32]


def replay_or_refuse(request, digest: str, existing) -> SubmitOutcome:
    """The same request id again (``request``: its ``request_id`` and ``submitter_hash``; ``existing``: the
    stored request): its stored outcome when the payload matches, ALREADY_EXISTS otherwise.

    Another identity's request id answers like a different payload: a caller learns nothing about requests it
    did not submit (not even their job ids)."""
    foreign = (request.submitter_hash is not None and existing.submitter_hash is not None
               and existing.submitter_hash != request.submitter_hash)
    if existing.payload_digest != digest or foreign:
        raise AlreadyExists(f"request_id {preview(request.request_id)} was already used with a different payload",
                            (FieldViolation("request_id", "reused with a different payload"),))
    return SubmitOutcome(request.request_id, tuple(existing.outcome_job_ids), False, existing.first_event_seq)


def _replayed(request: ErasureRequest, digest: str, existing) -> SubmitOutcome | AlreadyExists:
    try:
        return replay_or_refuse(request, digest, existing)
    except AlreadyExists as refusal:
        return refusal


@dataclass(frozen=True)
class _Stored:
    """What :func:`replay_or_refuse` reads of a stored request, for one stored earlier in the same batch."""

    payload_digest: str
    submitter_hash: str | None
    outcome_job_ids: tuple[str, ...]
    first_event_seq: int


def _store_requests(conn, accepted: list[Submission], now: datetime,
                    window: timedelta) -> list[list[tuple[str, str]]]:
    """Phase one: each matched model's job (one decision per coalescing key), then the request rows, new jobs,
    links and record counts. Returns per request its [(job id, ACCEPTED message)]."""
    coalescing = window.total_seconds() > 0
    job_by_key: dict[tuple[str, str], str] = {}
    new_jobs: dict[str, dict[str, Any]] = {}
    joined_records: dict[str, int] = {}  # open job -> records the batch's requests add to it
    links: list[tuple[str, str]] = []
    request_rows: list[dict[str, Any]] = []
    decisions: list[list[tuple[str, str]]] = []
    for submission in accepted:
        request = submission.request
        jobs = []
        for target in (t for t in submission.targets if t["matched"]):
            name, key = target["info"].name, coalesce_key(submission, target)
            job_id = None
            if coalescing:
                job_id = job_by_key.get((name, key)) or db.open_job_for(conn, name, key, now)
            if job_id is None:
                job_id = f"job-{uuid.uuid4().hex[:20]}"
                new_jobs[job_id] = _job_row(job_id, submission, target, key, now, window)
                message = f"accepted; new job {job_id} on model {name}"
            else:
                message = f"accepted; coalesced into job {job_id} on model {name}"
            if coalescing:
                job_by_key[(name, key)] = job_id
            if job_id in new_jobs:
                new_jobs[job_id]["records"] += target["matched"]
            else:
                joined_records[job_id] = joined_records.get(job_id, 0) + target["matched"]
            links.append((job_id, request.request_id))
            jobs.append((job_id, message))
        request_rows.append(_request_row(submission, [job_id for job_id, _ in jobs], now))
        decisions.append(jobs)
    db.insert_requests(conn, request_rows)
    db.insert_jobs(conn, list(new_jobs.values()))
    db.link_requests(conn, links)
    db.add_job_records(conn, joined_records, now)
    return decisions


def _request_row(submission: Submission, job_ids: list[str], now: datetime) -> dict[str, Any]:
    request = submission.request
    return {"request_id": request.request_id, "payload_digest": submission.digest, "kind": "erase",
            "subject_hashes": submission.subject_hashes, "record_hashes": submission.record_hashes,
            "submitter_hash": request.submitter_hash, "classes": sorted(request.classes),
            "model_names": [t["info"].name for t in submission.targets] or ["*"], "method": request.method,
            "method_params": dict(request.method_params), "policy_overrides": dict(request.policy_overrides),
            "deadline": submission.deadline, "received_at": now, "state": "PENDING",
            "first_event_seq": 0,  # set in phase two, once its events have seqs
            "outcome_job_ids": job_ids}


def _job_row(job_id: str, submission: Submission, target: dict[str, Any], key: str, now: datetime,
             window: timedelta) -> dict[str, Any]:
    info = target["info"]
    return {"job_id": job_id, "model_name": info.name, "coalesce_key": key,
            "selector": "classes" if submission.request.classes else "records", "state": JobState.QUEUED.value,
            "stage": "queued", "progress": 0.0, "method": target["method"], "method_params": target["params"],
            "policy_overrides": dict(submission.request.policy_overrides), "base_version": info.serving_version,
            "records": 0, "message": "", "evidence": {}, "attempts": 0, "window_closes_at": now + window,
            "created_at": now, "updated_at": now}


def _log_accepted(conn, ctx: PipelineContext, accepted: list[Submission],
                  jobs: list[list[tuple[str, str]]]) -> dict[str, int]:
    """Phase two: audit entries, ACCEPTED events, first event seqs, "no records" certificates. Returns each
    request's first event seq."""
    ctx.audit.append_many(conn, [("request_received", {
        "request_id": s.request.request_id, "request_kind": "erase", "payload_digest": s.digest,
        "subjects": len(s.subject_hashes), "records": len(s.request.record_ids), "classes": sorted(s.request.classes),
        "models": [t["info"].name for t in s.targets]}) for s in accepted])
    events, owners = [], []
    for submission, request_jobs in zip(accepted, jobs):
        request_id = submission.request.request_id
        for job_id, message in request_jobs:
            events.append(_accepted_event(job_id, request_id, JobState.QUEUED, "queued", message))
            owners.append(request_id)
        if not request_jobs:
            events.append(_accepted_event("", request_id, JobState.SUCCEEDED, "resolve",
                                          "accepted; no records found, certificate follows"))
            owners.append(request_id)
    first_seqs: dict[str, int] = {}
    for request_id, seq in zip(owners, db.add_events(conn, events)):
        first_seqs[request_id] = min(seq, first_seqs.get(request_id, seq))
    db.set_first_event_seqs(conn, first_seqs)
    for submission in accepted:
        for target in (t for t in submission.targets if not t["matched"]):
            _no_records(conn, ctx, submission, target["info"].name)
        if not submission.targets:
            _no_records(conn, ctx, submission, "*")
    return first_seqs


def _accepted_event(job_id: str, request_id: str, state: JobState, stage: str, message: str) -> dict[str, Any]:
    return {"job_id": job_id, "request_ids": [request_id], "kind": EventKind.ACCEPTED.value, "state": state.value,
            "stage": stage, "fraction": 0.0, "message": message, "certificate_id": None}


def _no_records(conn, ctx: PipelineContext, submission: Submission, model_name: str) -> None:
    """Certify at once that ``model_name`` ("*": every registered model) holds no record of the request."""
    request = submission.request
    with_models = [model_name] if model_name != "*" else [r.model_name for r in db.list_models(conn)]
    searched = {}
    for name in with_models:
        row = db.get_model(conn, name)
        dataset = db.dataset_for_model_version(conn, name, row.serving_version) if row else None
        searched[name] = {"version": row.serving_version if row else None,
                          "dataset_digest": dataset.digest if dataset else None}
    certify(conn, ctx.audit, request.request_id, model_name, None, {
        "request_id": request.request_id, "model_name": model_name, "label": NO_RECORDS, "job_id": None,
        "statement": "No records of this request were found in the training data of the searched model(s); "
                     "nothing had to be unlearned.",
        "searched": searched,
        "subjects": {"count": len(submission.subject_hashes), "keyed_sha256": submission.subject_hashes},
        "records": {"matched": 0, "record_ids_sha256": sha256_hex("\n".join(sorted(request.record_ids)))},
        "classes": sorted(request.classes), "code_version": ctx.settings.code_version})
