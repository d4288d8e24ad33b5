"""Tamper-evident audit log, signed certificates, keyed hashes, and their offline verification.

The log is append-only and hash-chained (DESIGN.md, pipeline step "audit"): entry ``n`` stores
``prev_hash`` (entry ``n-1``'s hash, 64 zeros for the first), its body as canonical JSON (sorted keys, no
whitespace, UTF-8), ``entry_hash = SHA-256(seq \\n prev_hash \\n body)`` and an HMAC-SHA256 signature of that
hash with the audit key. Changing, removing or reordering any entry breaks every later hash; forging a
consistent chain needs the key.

A certificate is the canonical JSON of what was done for one (request, model), signed with the same key,
and recorded in the chain (its body's SHA-256), so a certificate cannot silently be replaced either.
Approximate unlearning cannot be proven from weights (Thudi et al., USENIX Security 2022): the certificate
attests the process and its measured evidence, labelled ``approximate``, ``exact`` (retrain) or
``no records found``.

Subject ids never appear in clear: :func:`keyed_hash` (HMAC-SHA256 with the subject hash key) is used
for subjects, payload digests and record tombstones.

Offline check: ``python -m service.audit verify --state-dir .lethe`` (or ``--store-url`` and
``--key-file``), which is what ``lethe audit verify`` calls through :func:`verify_audit`.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import Connection

from service import store as db
from service.domain import Certificate, CertificateCheck, EventKind, JobState

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
CERTIFICATE_SCHEMA = "lethe.certificate/v1"


def canonical_json(value: Any) -> str:
    """The one serialisation that is hashed and signed: sorted keys, no whitespace, UTF-8 kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def keyed_hash(key: bytes, kind: str, value: str) -> str:
    """HMAC-SHA256 of ``kind:value``; the kind separates subject hashes from record hashes."""
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def sha256_hex(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def _sign(key: bytes, material: str) -> str:
    return hmac.new(key, material.encode(), hashlib.sha256).hexdigest()


def _entry_hash(seq: int, prev_hash: str, body_json: str) -> str:
    return sha256_hex(f"{seq}\n{prev_hash}\n{body_json}")


class AuditLog:
    """Appends signed, chained entries inside the caller's store transaction (so an entry is written
    exactly when the state change it describes is)."""

    def __init__(self, key: bytes):
        self.key = key

    def append(self, conn: Connection, kind: str, body: dict[str, Any]) -> tuple[int, str]:
        """Append one entry. Appenders in several processes are serialised by the store's log lock, held
        to the transaction's commit, so ``seq`` stays gap-free and every ``prev_hash`` is the entry before."""
        return self.append_many(conn, [(kind, body)])[0]

    def append_many(self, conn: Connection, entries: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[int, str]]:
        """Append ``(kind, body)`` entries in order, chained as :meth:`append` would one by one, with one read
        of the chain's tail and one INSERT (a group commit's ``request_received`` entries); their (seq, hash)."""
        for kind, body in entries:
            if "kind" in body or "time" in body:  # would silently replace the entry's own kind or time
                raise ValueError(f"audit entry body of {kind!r} may not set 'kind' or 'time'")
        if not entries:
            return []
        db.lock_log(conn)
        seq, prev_hash = db.audit_tail(conn) or (0, GENESIS_HASH)
        time = db.utcnow().isoformat()
        rows, appended = [], []
        for kind, body in entries:
            seq += 1
            body_json = canonical_json({"kind": kind, "time": time, **body})
            entry_hash = _entry_hash(seq, prev_hash, body_json)
            rows.append({"seq": seq, "prev_hash": prev_hash, "body_json": body_json, "entry_hash": entry_hash,
                         "signature": _sign(self.key, entry_hash)})
            appended.append((seq, entry_hash))
            prev_hash = entry_hash
        db.insert_audit_entries(conn, rows)
        return appended

    def sign_certificate(self, body: dict[str, Any]) -> Certificate:
        body_json = canonical_json({"schema": CERTIFICATE_SCHEMA, **body})
        return Certificate(request_id=body["request_id"], body_json=body_json, signature=_sign(self.key, body_json))

    def check_certificate(self, body_json: str, signature: str) -> CertificateCheck:
        return check_certificate(self.key, body_json, signature)


# --------------------------------------------------------------------------------- certificate issuance
NO_RECORDS = "no records found"


def certify(conn: Connection, audit: AuditLog, request_id: str, model_name: str, job_id: str | None,
            body: dict[str, Any]) -> bool:
    """Sign, store, chain and announce one certificate; completes the request when it was the last one.

    Returns whether the certificate came after the request's deadline. Every certificate states when it was
    issued and, when the client set a deadline, whether it was met (:func:`deadline_record`). A late
    erasure is still done and certified (the obligation does not lapse with the deadline), but the
    certificate, the audit entry and the TERMINAL event say it was late.
    """
    request = db.get_request(conn, request_id)
    issued_at = db.utcnow()
    deadline = deadline_record(db.as_utc(request.deadline), issued_at)
    body = {**body, "issued_at": issued_at.isoformat(), "deadline": deadline}
    certificate = audit.sign_certificate(jsonable(body))
    certificate_id = sha256_hex(f"{request_id}\n{model_name}")[:32]
    db.insert_certificate(conn, certificate_id, request_id, model_name, job_id, certificate.body_json,
                          certificate.signature)
    late = bool(deadline and deadline["late"])
    audit.append(conn, "certificate_issued", {
        "certificate_id": certificate_id, "request_id": request_id, "model_name": model_name, "job_id": job_id,
        "certificate_sha256": sha256_hex(certificate.body_json), "late": late})
    issued = {row.model_name for row in db.certificates_for(conn, request_id)}
    if set(request.model_names) <= issued:
        db.complete_request(conn, request_id)
    message = f"certificate issued for model {model_name} ({body['label']})"
    if late:
        message += f"; LATE: {deadline['late_by_s']:.0f} s after the request's deadline {deadline['at']}"
        log.warning("request %s certified %.0f s after its deadline", request_id, deadline["late_by_s"])
    db.add_event(conn, job_id or "", (request_id,), EventKind.TERMINAL.value, JobState.SUCCEEDED.value, "done",
                 1.0, message, certificate_id)
    return late


def issue_job_certificates(conn: Connection, audit: AuditLog, job, request_rows, resolved: dict[str, dict[str, Any]],
                           shared: dict[str, Any], label: str, state: JobState, message: str) -> int:
    """The audit stage's single transaction: one certificate per request of the job, then the job's state.

    ``resolved[request_id]`` holds what the resolve stage found for the request: ``matched`` records,
    ``erased_from_training`` and ``record_ids_sha256`` (the SHA-256 of the matched record ids, sorted, one per
    line, so an auditor holding the ids can check which records a certificate covers). Returns the number of
    late certificates.
    """
    late = 0
    for row in request_rows:
        found = resolved.get(row.request_id, {"matched": 0, "erased_from_training": 0,
                                              "record_ids_sha256": sha256_hex("")})
        kind = label if found["matched"] else NO_RECORDS
        body = {
            **shared, "request_id": row.request_id, "label": kind,
            "statement": statement(kind, job.model_name, found["matched"],
                                   shared.get("model", {}).get("weights_changed", True)),
            "subjects": {"count": len(row.subject_hashes), "keyed_sha256": sorted(row.subject_hashes)},
            "classes": list(row.classes),
            "records": {"matched": found["matched"], "erased_from_training": found["erased_from_training"],
                        "record_ids_sha256": found["record_ids_sha256"]},
        }
        late += certify(conn, audit, row.request_id, job.model_name, job.job_id, body)
    db.update_job(conn, job.job_id, state=state.value, stage="done", progress=1.0, message=message)
    audit.append(conn, "job_finished", {"job_id": job.job_id, "model_name": job.model_name, "state": state.value,
                                        "request_ids": [r.request_id for r in request_rows], "message": message})
    return late


def deadline_record(deadline: datetime | None, issued_at: datetime) -> dict[str, Any] | None:
    """The certificate's account of the client's deadline: None when the request set none; otherwise the
    deadline, whether the certificate came after it, and by how many seconds."""
    if deadline is None:
        return None
    late_by_s = (issued_at - deadline).total_seconds()
    return {"at": deadline.isoformat(), "late": late_by_s > 0, "late_by_s": round(max(late_by_s, 0.0), 3)}


def statement(label: str, model_name: str, found: int, weights_changed: bool = True) -> str:
    """The certificate's one-sentence claim. It must not claim more than happened: when the method left the
    weights unchanged (e.g. ``ssd-auto`` found the records already scored no better than unseen data), the
    statement says so instead of claiming their influence was removed."""
    if label == NO_RECORDS:
        return (f"No records of this request were found in the training data of model {model_name!r}; "
                "nothing had to be unlearned.")
    if label == "update":
        return (f"{found} record(s) were learned by model {model_name!r} with the named continual-learning "
                "strategy; the result was verified with the recorded evidence (the new records learned, utility "
                "kept, every earlier erasure of the lineage still holding) and the new version registered.")
    if label == "rectification":
        return (f"{found} record(s) of model {model_name!r} were rectified: their old values were erased by "
                "approximate unlearning and purged from the training data, and the corrected values learned; "
                "both were verified with the recorded evidence. This attests the process and its evidence, "
                "not a proof from the weights.")
    if label == "exact":
        kind = "exact unlearning (the model was retrained, or never trained, without the records)"
    elif weights_changed:
        kind = ("approximate unlearning: the records' influence was removed by the named method and the "
                "result was verified with the recorded evidence; this attests the process, not a proof "
                "from the weights")
    else:
        kind = ("approximate unlearning in which the named method left the model's weights unchanged: the "
                "recorded evidence shows the model already scored these records no better than unseen data "
                "(within the policy's margin); the records were purged from the training data and the new "
                "version registered; this attests the process and its evidence, not a proof from the weights")
    return f"{found} record(s) were removed from model {model_name!r} and its training data by {kind}."


def jsonable(value: Any) -> Any:
    """Evidence as plain JSON (numpy scalars, tuples, inf) so it can be stored, hashed and signed."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if np.isfinite(value) else str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if hasattr(value, "tolist"):  # torch tensors
        return jsonable(value.tolist())
    return value


def check_certificate(key: bytes, body_json: str, signature: str) -> CertificateCheck:
    """Signature and form of one certificate (not whether the chain records it: see verify_audit)."""
    # Bytes, not str: compare_digest refuses non-ASCII text, and a signature is anyone's input here.
    if not hmac.compare_digest(_sign(key, body_json).encode(), (signature or "").encode("utf-8", "replace")):
        return CertificateCheck(False, "signature does not match the body (altered, or another key)")
    try:
        body = json.loads(body_json)
    except json.JSONDecodeError as error:
        return CertificateCheck(False, f"body is not JSON: {error}")
    if not isinstance(body, dict) or body.get("schema") != CERTIFICATE_SCHEMA:
        return CertificateCheck(False, f"not a {CERTIFICATE_SCHEMA} document")
    if canonical_json(body) != body_json:
        return CertificateCheck(False, "body is not in canonical form")
    return CertificateCheck(True, f"valid signature; {body.get('label', '?')} unlearning of request "
                                  f"{body.get('request_id')!r} on model {body.get('model_name')!r}")


@dataclass
class AuditReport:
    """Result of checking the whole chain and every stored certificate."""

    valid: bool
    entries: int
    certificates: int
    last_hash: str
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_chain(conn: Connection, key: bytes, max_errors: int = 50) -> AuditReport:
    """Walk the chain from seq 1 and every certificate; report every inconsistency found (bounded)."""
    errors: list[str] = []
    expected_seq, prev_hash = 1, GENESIS_HASH
    certified: set[str] = set()
    count = 0
    for entry in db.audit_entries(conn):
        count += 1
        errors += _entry_errors(entry, expected_seq, prev_hash, key)
        try:
            body = json.loads(entry.body_json)
            if body.get("kind") == "certificate_issued":
                certified.add(body["certificate_sha256"])
        except (json.JSONDecodeError, KeyError, AttributeError):
            errors.append(f"entry {entry.seq}: body is not a Lethe audit record")
        expected_seq, prev_hash = entry.seq + 1, entry.entry_hash
        if len(errors) >= max_errors:
            break
    certificate_rows = db.all_certificates(conn)
    for row in certificate_rows:
        check = check_certificate(key, row.body_json, row.signature)
        if not check.valid:
            errors.append(f"certificate {row.certificate_id} (request {row.request_id}): {check.reason}")
        elif sha256_hex(row.body_json) not in certified:
            errors.append(f"certificate {row.certificate_id} (request {row.request_id}) is not recorded in the chain")
    return AuditReport(not errors, count, len(certificate_rows), prev_hash, errors[:max_errors])


def _entry_errors(entry, expected_seq: int, prev_hash: str, key: bytes) -> list[str]:
    """What is wrong with one chain entry, given the sequence and hash its predecessor left."""
    errors = []
    if entry.seq != expected_seq:
        errors.append(f"entry {entry.seq}: expected sequence {expected_seq} (entries missing or reordered)")
    if entry.prev_hash != prev_hash:
        errors.append(f"entry {entry.seq}: previous hash does not match entry {entry.seq - 1}")
    recomputed = _entry_hash(entry.seq, entry.prev_hash, entry.body_json)
    if recomputed != entry.entry_hash:
        errors.append(f"entry {entry.seq}: body does not match its hash (altered)")
    if not hmac.compare_digest(_sign(key, entry.entry_hash), entry.signature):
        errors.append(f"entry {entry.seq}: bad signature")
    return errors


class ChainMonitor:
    """Re-verifies the hash chain all the time, in bounded slices, for the metrics scrape.

    Each :meth:`check` verifies at most ``batch`` entries after the ones the previous call verified; at the
    tail (or after a failure) the next call starts again from entry 1. So an altered entry, old or new, is
    found within one pass, a scrape never walks an unbounded chain, and a broken chain keeps failing pass
    after pass (``lethe_audit_chain_verification_failures_total`` keeps rising) until it is repaired or the
    process restarts. Certificates are not re-checked here: ``lethe audit verify`` does the full audit.
    """

    def __init__(self, key: bytes, batch: int = 2000):
        self.key, self.batch = key, batch
        self.failures = 0  # passes that found an inconsistency
        self.verified_seq = 0  # last entry of the last pass that verified cleanly to the tail
        self._next_seq, self._prev_hash = 1, GENESIS_HASH
        self._lock = threading.Lock()

    def check(self, conn: Connection) -> list[str]:
        """Verify the next slice; returns the inconsistencies found in it (empty when it is sound)."""
        with self._lock:
            entries = db.audit_entries_from(conn, self._next_seq, self.batch)
            errors: list[str] = []
            for entry in entries:
                errors = _entry_errors(entry, self._next_seq, self._prev_hash, self.key)
                if errors:
                    break
                self._next_seq, self._prev_hash = entry.seq + 1, entry.entry_hash
            if errors:
                self.failures += 1
            elif len(entries) < self.batch:  # reached the tail: the whole chain verified
                self.verified_seq = self._next_seq - 1
            else:
                return []
            self._next_seq, self._prev_hash = 1, GENESIS_HASH
            return errors


def verify_audit(state_dir_or_store_url: str | Path, key: bytes | None = None) -> AuditReport:
    """Offline verification of a Lethe store: a state directory (embedded) or a SQLAlchemy URL.

    ``key`` defaults to the embedded key file ``<state_dir>/keys/audit.key``; with a URL it is required.
    Opens the store read-only in spirit: nothing is written.
    """
    target = str(state_dir_or_store_url)
    if "://" in target:
        url = target
        if key is None:
            raise ValueError("verifying a store URL needs the audit key")
    else:
        state_dir = Path(target)
        url = f"sqlite:///{(state_dir / 'lethe.db').absolute()}"
        if not (state_dir / "lethe.db").exists():
            raise FileNotFoundError(f"no Lethe job store at {state_dir / 'lethe.db'}")
        if key is None:
            key = bytes.fromhex((state_dir / "keys" / "audit.key").read_text().strip())
    store = db.Store(url, migrate=False)
    try:
        with store.read() as conn:
            return verify_chain(conn, key)
    finally:
        store.dispose()


def main(argv: list[str] | None = None) -> int:
    """``python -m service.audit verify [--state-dir DIR | --store-url URL --key-file F] [--certificate F]``."""
    parser = argparse.ArgumentParser(prog="python -m service.audit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check the audit chain and every certificate offline")
    verify.add_argument("--state-dir", default=".lethe", help="embedded state directory (default .lethe)")
    verify.add_argument("--store-url", help="SQLAlchemy URL of the job store (instead of --state-dir)")
    verify.add_argument("--key-file", help="hex audit key file (default LETHE_AUDIT_KEY, else <state-dir>/keys/audit.key)")
    verify.add_argument("--certificate", help="also check one certificate: a JSON file with body_json and signature")
    args = parser.parse_args(argv)
    key = bytes.fromhex(Path(args.key_file).read_text().strip()) if args.key_file else None
    if key is None and os.environ.get("LETHE_AUDIT_KEY"):  # a pod gets the key as the server does, from a Secret
        key = bytes.fromhex(os.environ["LETHE_AUDIT_KEY"].strip())
    if key is None and not args.store_url:
        key_path = Path(args.state_dir) / "keys" / "audit.key"
        key = bytes.fromhex(key_path.read_text().strip()) if key_path.exists() else None
    report = verify_audit(args.store_url or args.state_dir, key)
    result: dict[str, Any] = {"chain": report.as_dict()}
    ok = report.valid
    if args.certificate:
        document = json.loads(Path(args.certificate).read_text())
        check = check_certificate(key or b"", document["body_json"], document["signature"])
        result["certificate"] = asdict(check)
        ok = ok and check.valid
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
