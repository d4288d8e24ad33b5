"""Sealed verification sets of erasures, and their crypto-shredding (DESIGN.md, "Updates and rectifications").

An update's gate checks that every earlier erasure on the lineage still holds ("erased stays erased"), but an
erasure purges its records from every dataset copy. So each erasure keeps, for a policy retention window
only, a sealed copy of what it erased:

- :func:`seal_erasure` runs once per erasure job, after the gate passed and before registration, while the
  base dataset is loaded. For EACH request of the job, the records it matched that the model trained on
  (its forget set) are serialised in the dataset's own Parquet schema (record and subject ids, split,
  features/label or prompt/answer: personal data, hence sealed) and encrypted with AES-256-GCM under a
  fresh key per request, a random 96-bit nonce, and the model, job and request ids as associated data (a
  ciphertext moved to another set fails authentication). The ciphertext is written atomically to
  ``<state_dir>/sealed/<model>/<job>-<request hash>.bin`` and copied to MLflow (a run per job tagged
  ``lethe.sealed_job``), where a worker on another host fetches it like a dataset version. The key and the
  set's metadata go into the store table ``sealed_sets`` in ONE transaction with the audit entry
  ``sealed_set_created``, which names the key only by its fingerprint. Exactly once per (job, request): a
  resumed job reuses the row's key and rewrites the same file.
- :func:`open_sealed` decrypts every sealed set of a model's lineage (the erasures whose job registered its
  model version) and
  lists, with the reason, every erasure whose set cannot be checked: nothing was kept (retention 0), the key
  was destroyed after the window, the window ended, the ciphertext is missing, or it fails authentication
  (tampered or corrupt; logged as an error). Nothing is skipped silently.
- :func:`erasure_rechecks` is the update gate's part: one :class:`unlearn.gate.GateCheck` per erasure on
  the model after the update (class sets: accuracy <= ``class_forget_max_accuracy``; record and subject
  sets: the two-sided membership test of :mod:`unlearn.membership` against the audit split).
- :func:`shred_expired` (the engine's housekeeping loop; a fake ``now`` in tests) destroys every key whose
  window has ended, and at once the keys of sets whose job ended without registering a version (they
  attest nothing):
  the key column is overwritten with NULL, ``destroyed_at`` and the reason are set, the audit entry
  ``sealed_key_destroyed`` is appended in the same transaction, then the ciphertext copies are deleted. The
  ciphertext is worthless without its key, so a copy that outlives a crash (or sits on another host) is
  harmless; housekeeping deletes this host's copies again for a day.

Retention: ``VerificationPolicy.sealed_retention_days`` (default 30; bounded [0, 3650]). 0 keeps nothing:
no ciphertext and no key, a row and an audit entry ``sealed_set_not_kept`` record that the erasure exists
and cannot be re-checked, and the job evidence and certificate say so.

Keys at rest: the per-request key is stored wrapped (AES-GCM) under a key derived from the subject hash key,
so a copy of the job store alone opens no set. Limits of shredding: it destroys the key in the live store;
a backup of the job store taken inside the window, SQLite WAL frames not yet checkpointed and PostgreSQL
row versions not yet vacuumed still hold the wrapped key until they age out. Keep store backups no longer
than the retention window (or accept that a backup restores the ability to open sets it contains).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from continual.examples import join
from service import store as db
from service.audit import sha256_hex
from service.context import PipelineContext
from service.datasets import (
    DatasetCatalog,
    LoadedDataset,
    dataset_columns,
    dataset_table,
    safe_name,
)
from service.domain import JobState
from unlearn.data import ExampleSet
from unlearn.gate import GateCheck, GateResult, KnowledgeProbe, still_erased
from unlearn.membership import family_z
from unlearn.tasks import TaskAdapter

log = logging.getLogger(__name__)

MAGIC = b"LETHESS1"  # file format version: MAGIC | 96-bit nonce | AES-GCM ciphertext and 128-bit tag
NONCE_BYTES = 12  # 96 bits: the GCM nonce size NIST SP 800-38D recommends; random per encryption
KEY_BITS = 256
RETRY_WINDOW = timedelta(days=1)  # destroyed sets whose local copies housekeeping deletes again
# Job states that, without a registered version, mean the job erased nothing: its sets are destroyed at once.
ENDED_UNSUCCESSFULLY = (JobState.FAILED.value, JobState.REJECTED_BY_VERIFICATION.value, JobState.CANCELLED.value)
CHECKABLE_NEVER = ("not_kept", "destroyed", "expired")  # by policy: the check is skipped, "not checkable"
RECHECK = "erased_stays_erased"


class SealedSetError(Exception):
    """A sealed set that should be readable fails authentication (tampered, truncated, another set's file, or
    an altered key)."""

    status = "corrupt"


class CiphertextMissing(SealedSetError):
    """A sealed set that should be readable has no ciphertext on this host nor in MLflow."""

    status = "missing"


@dataclass(frozen=True)
class OpenedSet:
    """One erasure's sealed records, decrypted: ``frame`` is in the dataset's schema."""

    request_id: str
    job_id: str
    kind: str  # "records" (subjects or record ids) | "classes"
    classes: tuple[int, ...]
    frame: pd.DataFrame = field(repr=False)
    created_at: datetime | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True)
class UnavailableSet:
    """An erasure whose set cannot be checked, and why. ``status``: ``not_kept`` (retention 0),
    ``destroyed`` (key shredded), ``expired`` (window ended, key awaiting destruction), ``missing`` or
    ``corrupt`` (the set should be readable and is not: an integrity failure, see :func:`erasure_rechecks`)."""

    request_id: str
    job_id: str
    kind: str
    classes: tuple[int, ...]
    status: str
    reason: str


# ------------------------------------------------------------------------------------------- sealing
def seal_erasure(ctx: PipelineContext, job, request_rows, data: LoadedDataset, matched: dict[str, np.ndarray],
                 forget_mask: np.ndarray, policy, frame: pd.DataFrame | None = None,
                 now: datetime | None = None) -> dict[str, Any]:
    """Seal each request's forget records (``matched[request_id] & forget_mask`` of the loaded dataset
    ``data``; ``frame`` is its dataset frame, row for row, read from ``data.path`` when not given: a
    rectification passes the base version plus its staged records); returns the summary the job evidence
    keeps (``requests``: per request its kind, rows, key fingerprint, expiry) and the certificate's part of it
    (:func:`certificate_summary`). Never the key."""
    days = float(policy.sealed_retention_days)
    now = now or db.utcnow()
    summary: dict[str, Any] = {"retention_days": days, "sets": 0, "rows": 0, "expires_at": None, "requests": {}}
    columns: pd.DataFrame | None = None
    for row in request_rows:
        mask = matched.get(row.request_id, np.zeros(len(data), dtype=bool)) & forget_mask
        if not mask.any():
            summary["requests"][row.request_id] = {
                "rows": 0, "note": "no training record of this request: the model never learned it, nothing to "
                                   "re-check"}
            continue
        kind = "classes" if row.classes else "records"
        if days <= 0:
            summary["requests"][row.request_id] = _record_not_kept(ctx, job, row, kind, int(mask.sum()), now)
            continue
        if columns is None:
            columns = dataset_columns(ctx.catalog.frame(data.path) if frame is None else frame)
            if not np.array_equal(columns["record_id"].astype(str).to_numpy(), data.record_ids.astype(str)):
                raise RuntimeError(f"dataset file {data.path} no longer matches the loaded version {data.digest[:12]}")
        sealed = _seal_request(ctx, job, row, kind, columns.iloc[np.flatnonzero(mask)], days, now)
        summary["requests"][row.request_id] = sealed
        summary["sets"] += 1
        summary["rows"] += sealed["rows"]
        summary["expires_at"] = max(filter(None, (summary["expires_at"], sealed["expires_at"])))
    if days <= 0:
        summary["note"] = ("policy sealed_retention_days is 0: no verification set was kept, so later updates "
                           "cannot re-check this erasure")
    return summary


def certificate_summary(sealed: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a certificate states about the job's sealed sets: how many, retention, expiry (no request ids, no
    keys, no fingerprints)."""
    if sealed is None:
        return None
    return {key: sealed[key] for key in ("retention_days", "sets", "rows", "expires_at", "note") if key in sealed}


def _seal_request(ctx: PipelineContext, job, row, kind: str, records: pd.DataFrame, days: float,
                  now: datetime) -> dict[str, Any]:
    with ctx.store.read() as conn:
        existing = db.sealed_set(conn, job.job_id, row.request_id)
    aad = _associated_data(job.model_name, job.job_id, row.request_id)
    if existing is not None and existing.wrapped_key:  # a resumed job: same key, same file, same row
        key = _unwrap(ctx, existing.wrapped_key, aad)
    else:
        key = AESGCM.generate_key(bit_length=KEY_BITS)
    buffer = io.BytesIO()
    pq.write_table(dataset_table(records.reset_index(drop=True)), buffer)
    nonce = secrets.token_bytes(NONCE_BYTES)
    blob = MAGIC + nonce + AESGCM(key).encrypt(nonce, buffer.getvalue(), aad)
    path = _sealed_dir(ctx, job.model_name) / f"{job.job_id}-{sha256_hex(row.request_id)[:16]}.bin"
    _write_atomically(path, blob)
    artifact_uri = ctx.registry.log_sealed(job.model_name, job.job_id, path)
    fingerprint = key_fingerprint(key)
    created_at = db.as_utc(existing.created_at) if existing is not None else now
    expires_at = created_at + timedelta(days=days)
    values = {"path": str(path), "artifact_uri": artifact_uri, "rows": len(records)}
    with ctx.store.write() as conn:
        if existing is None:
            db.insert_sealed_set(conn, job_id=job.job_id, request_id=row.request_id, model_name=job.model_name,
                                 kind=kind, classes=sorted(row.classes), wrapped_key=_wrap(ctx, key, aad),
                                 key_fingerprint=fingerprint, retention_days=days, created_at=created_at,
                                 expires_at=expires_at, **values)
            ctx.audit.append(conn, "sealed_set_created", {
                "job_id": job.job_id, "request_id": row.request_id, "model_name": job.model_name, "set_kind": kind,
                "rows": len(records), "key_fingerprint": fingerprint, "ciphertext_sha256": sha256_hex(blob),
                "retention_days": days, "expires_at": expires_at.isoformat()})
        else:
            db.update_sealed_set(conn, job.job_id, row.request_id, **values)
    return {"kind": kind, "rows": len(records), "key_fingerprint": fingerprint, "expires_at": expires_at.isoformat()}


def _record_not_kept(ctx: PipelineContext, job, row, kind: str, rows: int, now: datetime) -> dict[str, Any]:
    """Retention 0: no ciphertext, no key; a row and an audit entry so the erasure is known as unchecked."""
    reason = "policy sealed_retention_days is 0: nothing was kept"
    with ctx.store.write() as conn:
        if db.sealed_set(conn, job.job_id, row.request_id) is None:
            db.insert_sealed_set(conn, job_id=job.job_id, request_id=row.request_id, model_name=job.model_name,
                                 kind=kind, classes=sorted(row.classes), rows=0, path=None, artifact_uri=None,
                                 wrapped_key=None, key_fingerprint=None, retention_days=0.0, created_at=now,
                                 expires_at=now, destroyed_at=now, destroyed_reason=reason)
            ctx.audit.append(conn, "sealed_set_not_kept", {
                "job_id": job.job_id, "request_id": row.request_id, "model_name": job.model_name, "set_kind": kind,
                "reason": reason})
    return {"kind": kind, "rows": 0, "kept": False, "note": reason}


# ------------------------------------------------------------------------------------------- opening
def open_sealed(ctx: PipelineContext, model_name: str,
                now: datetime | None = None) -> tuple[list[OpenedSet], list[UnavailableSet]]:
    """Every erasure of ``model_name``'s lineage (the sealed sets of its jobs that registered a model
    version, oldest first): decrypted
    when it can be checked, otherwise listed in the second list with the reason."""
    now = now or db.utcnow()
    with ctx.store.read() as conn:
        rows = db.lineage_sealed_sets(conn, model_name)
    opened: list[OpenedSet] = []
    unavailable: list[UnavailableSet] = []
    for row in rows:
        classes = tuple(int(c) for c in row.classes or ())

        def missing(status: str, reason: str) -> None:
            unavailable.append(UnavailableSet(row.request_id, row.job_id, row.kind, classes, status, reason))

        if row.path is None:
            missing("not_kept", f"retention 0: nothing was kept (policy sealed_retention_days was 0 when job "
                                f"{row.job_id} ran)")
        elif row.destroyed_at is not None:
            missing("destroyed", f"key destroyed on {_day(row.destroyed_at)} ({row.destroyed_reason})")
        elif db.as_utc(row.expires_at) <= now:
            missing("expired", f"the retention window of {row.retention_days:g} day(s) ended on "
                               f"{_day(row.expires_at)}; the key awaits destruction")
        else:
            try:
                frame = decrypt_set(ctx, row)
            except SealedSetError as error:
                log.error("sealed set of request %s (job %s) cannot be opened: %s", row.request_id, row.job_id, error)
                missing(error.status, str(error))
                continue
            opened.append(OpenedSet(row.request_id, row.job_id, row.kind, classes, frame,
                                    db.as_utc(row.created_at), db.as_utc(row.expires_at)))
    return opened, unavailable


def decrypt_set(ctx: PipelineContext, row) -> pd.DataFrame:
    """One sealed set's records; :class:`SealedSetError` when the ciphertext is missing or fails
    authentication (tampered, truncated, or another set's file)."""
    path = _readable_copy(ctx, row)
    blob = path.read_bytes()
    aad = _associated_data(row.model_name, row.job_id, row.request_id)
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + NONCE_BYTES + 16:
        raise SealedSetError(f"{path.name} fails authentication: not a sealed set file (tampered or truncated)")
    nonce, ciphertext = blob[len(MAGIC):len(MAGIC) + NONCE_BYTES], blob[len(MAGIC) + NONCE_BYTES:]
    try:
        plain = AESGCM(_unwrap(ctx, row.wrapped_key, aad)).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise SealedSetError(f"{path.name} fails authentication: the ciphertext was altered, is corrupt, or "
                             "belongs to another set") from None
    return pq.read_table(io.BytesIO(plain)).to_pandas()


def _readable_copy(ctx: PipelineContext, row) -> Path:
    """The ciphertext on this host: where it was written, or this host's mirror, fetched from MLflow."""
    recorded = Path(row.path)
    if recorded.exists():
        return recorded
    mirror = _sealed_dir(ctx, row.model_name) / recorded.name
    if not mirror.exists():
        try:
            ctx.registry.download_artifact(row.artifact_uri or "", mirror)
        except Exception as error:  # MLflow's errors vary by store; the reason is what matters here
            raise CiphertextMissing(f"ciphertext missing: {recorded.name} is on no host and its MLflow copy cannot "
                                 f"be read ({type(error).__name__})") from None
    return mirror


# ------------------------------------------------------------------------------------------ checking
def erasure_rechecks(catalog: DatasetCatalog, support, task: TaskAdapter, model, audit: ExampleSet, policy,
                     opened: list[OpenedSet], unavailable: list[UnavailableSet],
                     knowledge_of: Callable[[LoadedDataset], KnowledgeProbe | None] | None = None) -> GateResult:
    """One check per earlier erasure of the lineage, on ``model`` (the update's result), named
    ``erased_stays_erased[<request id>]``:

    - class erasure: accuracy on the class's sealed training records <= ``class_forget_max_accuracy``
      (the erasure gate's ``forgetting`` check, :func:`unlearn.gate.judge`);
    - record and subject erasure: the two-sided membership test of the sealed records against ``audit``
      (never-trained records of the current data): KS p >= ``min_forget_p`` and the loss-attack AUC within
      0.5 +- (``mia_auc_margin`` + noise), as the erasure gate's ``membership_ks``/``membership_auc``, at the
      Bonferroni level over the N record erasures re-checked here (``min_forget_p / N``, the band at
      :func:`unlearn.membership.family_z`): an update of a model that forgot all of them is refused at most
      about 1% of the time in all, as one erasure's gate is, however long the lineage; on a
      causal LM also the erasure gate's ``knowledge`` check, with ``knowledge_of(sealed records)`` as the
      probe (the sealed records keep their ``paraphrase``/``perturbed`` columns; the audit side is the current
      dataset's): a fact that an update brought back in other wordings fails the re-check. Without a probe
      (no paraphrases on either side) the evidence says the re-check is answer-level only;
    - an erasure without a set: ``passed=None`` with the reason when the policy let it go (retention 0, key
      destroyed, window ended): "not checkable"; ``passed=False`` when the set should be readable and is not
      (ciphertext missing or failing authentication): fail closed, an operator must look.

    ``support`` is the update job's :class:`service.task_support.TaskSupport` (its model already loaded, so an
    LM's tokenizer is set); ``policy`` anything with the gate's thresholds. The evidence holds each check's
    measurements by request id.
    """
    checks: list[GateCheck] = []
    evidence: dict[str, Any] = {}
    family = max(1, sum(1 for sealed in opened if sealed.kind != "classes"))  # tested together: Bonferroni
    z = family_z(family)
    for sealed in opened:
        name = f"{RECHECK}[{sealed.request_id}]"
        data = catalog.from_frame(sealed.frame)
        examples = support.examples(data, model)(np.ones(len(data), dtype=bool))
        classes = tuple(sealed.classes) if sealed.kind == "classes" else None
        probe = knowledge_of(data) if knowledge_of is not None and classes is None else None
        check = still_erased(task, model, examples, audit, policy, classes, probe, family)
        if classes:
            checks.append(GateCheck(name, check.value, check.limit, check.passed,
                                    f"class erasure {list(sealed.classes)} by job {sealed.job_id}: accuracy on its "
                                    f"{len(examples)} sealed training record(s) <= class_forget_max_accuracy"))
            evidence[sealed.request_id] = {"kind": "classes", "classes": list(sealed.classes),
                                           "accuracy": check.value, "records": len(examples),
                                           "job_id": sealed.job_id}
        else:
            test, slack = check.membership, check.auc_slack
            rule = (f"record erasure by job {sealed.job_id}: its {len(examples)} sealed record(s) vs the audit split, "
                    f"one of {family} record erasure(s) re-checked together (Bonferroni): KS p-value >= "
                    f"min_forget_p / {family} and loss-attack AUC ({test.auc:.3f}) within 0.5 +- "
                    f"(mia_auc_margin + {z:.3f} * null sd) = 0.5 +- {slack:.3f}")
            found = {"kind": "records", "membership": test.as_dict(), "auc_slack": slack, "family": family,
                     "ks_floor": check.limit, "job_id": sealed.job_id}
            if check.knowledge is not None:  # causal LM: the paraphrase probe, or why it could not run
                rule += f"; and the knowledge check (truth ratios vs audit's, KS p-value >= min_forget_p / {family})"
                found["knowledge"] = check.knowledge_summary()
            checks.append(GateCheck(name, check.value, check.limit, check.passed, rule))
            evidence[sealed.request_id] = found
    for gone in unavailable:
        by_policy = gone.status in CHECKABLE_NEVER
        checks.append(GateCheck(
            f"{RECHECK}[{gone.request_id}]", None, None, None if by_policy else False,
            f"{gone.kind} erasure by job {gone.job_id}: re-checked on its sealed verification set",
            reason=("not checkable: " if by_policy else "sealed set unreadable: ") + gone.reason))
        evidence[gone.request_id] = {"kind": gone.kind, "status": gone.status, "reason": gone.reason,
                                     "job_id": gone.job_id}
    return GateResult(tuple(checks), {"erasure_rechecks": evidence})


def sealed_examples(catalog: DatasetCatalog, support, model, sets: list[OpenedSet]) -> ExampleSet:
    """The records of ``sets`` as one example set for ``model`` (a re-erasure's forget set)."""
    examples = None
    for sealed in sets:
        data = catalog.from_frame(sealed.frame)
        part = support.examples(data, model)(np.ones(len(data), dtype=bool))
        examples = part if examples is None else join(examples, part)  # LM sets: padded to the wider
    if examples is None:
        raise ValueError("no sealed set to take examples from")
    return examples


# ------------------------------------------------------------------------------------------ shredding
def shred_expired(ctx: PipelineContext, now: datetime | None = None, model_name: str | None = None) -> int:
    """Destroy every key whose retention window has ended (and those of sets whose job ended without
    registering a version), each with the audit entry ``sealed_key_destroyed``; then delete the ciphertext copies.
    ``model_name`` limits it to one lineage. Returns how many keys were destroyed. Safe to run in several
    processes: each key is destroyed once."""
    now = now or db.utcnow()
    with ctx.store.read() as conn:
        doomed = db.sealed_sets_to_destroy(conn, now, ENDED_UNSUCCESSFULLY, model_name)
    destroyed = 0
    for row in doomed:
        if db.as_utc(row.expires_at) > now:  # its job ended without registering a version
            reason = f"job {row.job_id} ended {row.job_state or 'unknown'}: it erased nothing, the set attests nothing"
        else:
            reason = (f"after the retention window of {row.retention_days:g} day(s), which ended on "
                      f"{_day(row.expires_at)}")
        with ctx.store.write() as conn:
            if not db.destroy_sealed_key(conn, row.job_id, row.request_id, now, reason):
                continue  # another process destroyed it first
            ctx.audit.append(conn, "sealed_key_destroyed", {
                "job_id": row.job_id, "request_id": row.request_id, "model_name": row.model_name,
                "key_fingerprint": row.key_fingerprint, "reason": reason})
        destroyed += 1
        log.info("sealed-set key %s of request %s destroyed (%s)", row.key_fingerprint, row.request_id, reason)
        try:  # worthless without the key from here on: a failure is logged, retried locally by the next pass
            ctx.registry.delete_artifact(row.artifact_uri or "")
        except Exception:
            log.warning("could not delete the MLflow copy of sealed set %s; it is unreadable without its key",
                        row.key_fingerprint, exc_info=True)
    with ctx.store.read() as conn:
        recent = db.destroyed_sealed_sets_since(conn, now - RETRY_WINDOW)
    for row in recent:
        Path(row.path).unlink(missing_ok=True)
        (_sealed_dir(ctx, row.model_name) / Path(row.path).name).unlink(missing_ok=True)
    return destroyed


# -------------------------------------------------------------------------------------------- crypto
def key_fingerprint(key: bytes) -> str:
    """How the audit chain and the evidence name a key: 128 bits of a domain-separated SHA-256 (reveals
    nothing of a random 256-bit key)."""
    return hashlib.sha256(b"lethe sealed-set key fingerprint v1\n" + key).hexdigest()[:32]


def _associated_data(model_name: str, job_id: str, request_id: str) -> bytes:
    """Binds a ciphertext (and a wrapped key) to its set: moved to another set it fails authentication."""
    return f"lethe sealed set v1\n{model_name}\n{job_id}\n{request_id}".encode()


def _wrapping_key(ctx: PipelineContext) -> bytes:
    return hmac.new(ctx.settings.subject_hash_key_bytes, b"lethe sealed-set key wrap v1", hashlib.sha256).digest()


def _wrap(ctx: PipelineContext, key: bytes, aad: bytes) -> str:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return (nonce + AESGCM(_wrapping_key(ctx)).encrypt(nonce, key, aad)).hex()


def _unwrap(ctx: PipelineContext, wrapped: str | None, aad: bytes) -> bytes:
    if not wrapped:
        raise SealedSetError("the key is gone although the set was not destroyed (the store row was altered)")
    blob = bytes.fromhex(wrapped)
    try:
        return AESGCM(_wrapping_key(ctx)).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SealedSetError("the stored key fails authentication (altered, or another subject hash key)") from None


# ------------------------------------------------------------------------------------------- helpers
def _sealed_dir(ctx: PipelineContext, model_name: str) -> Path:
    return ctx.settings.state_dir / "sealed" / safe_name(model_name)


def _write_atomically(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as handle:
        handle.write(blob)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)


def _day(value: datetime) -> str:
    return db.as_utc(value).date().isoformat()
