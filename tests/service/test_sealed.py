"""Sealed verification sets of erasures and their crypto-shredding (:mod:`service.sealed`, issue 13).

Most tests seal sets of stand-in jobs (a job row in the session engine's store, requests as plain objects) on a
copy of the digits data, under model names of their own, so they cost no unlearning and leave the shared
lineages alone. One test runs a class erasure end to end through the engine on a model of its own and then
re-checks it the way the update gate will: the version that still knows the class fails, the unlearned one
passes, and after the retention window (a fake clock) the check reports "not checkable".
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from lethe_demo.data import DEMO_POLICY, build_digits_demo, digits_frame
from service import store as db
from service.api import converters
from service.api.pb import types_pb2
from service.audit import verify_chain
from service.domain import ErasureRequest, JobState, VerificationPolicy
from service.sealed import (
    OpenedSet,
    SealedSetError,
    decrypt_set,
    erasure_rechecks,
    open_sealed,
    seal_erasure,
    shred_expired,
)
from service.task_support import task_support
from service.context import ModelInfo
from service.verification import policy_violations
from tests.service.conftest import make_engine, wait_for_jobs
from unlearn.splits import audit_mask

POLICY = VerificationPolicy()  # 30 days


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def lethe_engine(tmp_path_factory):
    """This module's own started engine: other modules' erasures tombstone digits records, which would refuse
    this module's registration of the digits data on the session engine."""
    engine, _ = make_engine(tmp_path_factory.mktemp("sealed") / "state")
    yield engine
    engine.stop(30)
    engine.store.dispose()


@pytest.fixture(scope="module")
def digits(lethe_engine, tmp_path_factory):
    """The digits data as a dataset file of this module (a stand-in base version) and its loaded form."""
    path = tmp_path_factory.mktemp("sealed-data") / "digits.parquet"
    frame = digits_frame()
    frame.to_parquet(path, index=False)
    return frame, lethe_engine.catalog.from_frame(frame, str(path), "stand-in")


def _stand_in_job(engine, model_name: str, state: str = "SUCCEEDED", registered: bool = True):
    job_id = f"sealed-{uuid.uuid4().hex[:12]}"
    with engine.store.write() as conn:
        db.insert_job(conn, job_id=job_id, model_name=model_name, coalesce_key="k", selector="records", state=state,
                      stage="done", progress=1.0, method="ssd", method_params={}, policy_overrides={}, records=1,
                      message="", evidence={}, attempts=1, window_closes_at=db.utcnow(),
                      result_version="2" if registered else None)
    return SimpleNamespace(job_id=job_id, model_name=model_name)


def _requests(frame: pd.DataFrame, **subjects_by_request):
    """Request rows (request id -> its subjects) and their matched masks over the digits data."""
    rows = [SimpleNamespace(request_id=request_id, classes=()) for request_id in subjects_by_request]
    matched = {request_id: frame["subject_id"].isin(subjects).to_numpy()
               for request_id, subjects in subjects_by_request.items()}
    return rows, matched


def _trained_subjects(frame: pd.DataFrame) -> list[str]:
    return sorted(frame.loc[frame["split"] == "train", "subject_id"].unique())


def _audit_entries(engine, kind: str) -> list[dict]:
    with engine.store.read() as conn:
        bodies = [json.loads(entry.body_json) for entry in db.audit_entries(conn)]
    return [body for body in bodies if body["kind"] == kind]


def _row(engine, job_id: str, request_id: str):
    with engine.store.read() as conn:
        return db.sealed_set(conn, job_id, request_id)


# ----------------------------------------------------------------------------------------------- tests
def test_each_request_is_sealed_under_its_own_key_and_opens_to_its_records(lethe_engine, digits):
    engine, (frame, data) = lethe_engine, digits
    model = f"sealed-unit-{uuid.uuid4().hex[:6]}"
    job = _stand_in_job(engine, model)
    subjects = _trained_subjects(frame)[200:202]
    rows, matched = _requests(frame, **{"seal-a": [subjects[0]], "seal-b": [subjects[1]]})
    train = data.split_mask("train")
    forget = (matched["seal-a"] | matched["seal-b"]) & train

    summary = seal_erasure(engine.context, job, rows, data, matched, forget, POLICY)

    assert summary["sets"] == 2 and summary["retention_days"] == 30.0
    assert summary["rows"] == int(forget.sum())
    stored = {r.request_id: _row(engine, job.job_id, r.request_id) for r in rows}
    assert len({row.wrapped_key for row in stored.values()}) == 2, "one key per request"
    assert len({row.key_fingerprint for row in stored.values()}) == 2
    for request_id, row in stored.items():
        assert db.as_utc(row.expires_at) - db.as_utc(row.created_at) == timedelta(days=30)
        assert row.kind == "records" and row.artifact_uri
        blob = Path(row.path).read_bytes()
        ids = frame.loc[matched[request_id], ["record_id", "subject_id"]].to_numpy().ravel()
        assert not [value for value in ids if value.encode() in blob], "clear ids in the ciphertext"
        assert b"subject-" not in blob and b"PAR1" not in blob  # no Parquet in clear either

    opened, unavailable = open_sealed(engine.context, model)
    assert not unavailable
    assert {s.request_id for s in opened} == {"seal-a", "seal-b"}
    for sealed in opened:  # exactly the request's training records, in the dataset's schema
        expected = frame[matched[sealed.request_id] & train].reset_index(drop=True)
        assert list(sealed.frame.columns) == ["record_id", "subject_id", "split", "features", "label"]
        pd.testing.assert_frame_equal(sealed.frame[["record_id", "subject_id", "split", "label"]],
                                      expected[["record_id", "subject_id", "split", "label"]])
        np.testing.assert_allclose(np.stack(sealed.frame["features"]), np.stack(expected["features"]), rtol=1e-6)
        assert set(sealed.frame["split"]) == {"train"}

    # The audit chain names each key by fingerprint only; neither the evidence nor the chain holds a key.
    created = [e for e in _audit_entries(engine, "sealed_set_created") if e["job_id"] == job.job_id]
    assert {e["key_fingerprint"] for e in created} == {row.key_fingerprint for row in stored.values()}
    text = json.dumps(created) + json.dumps(summary)
    assert not [row for row in stored.values() if row.wrapped_key in text]

    # A resumed job seals again: same rows, same keys, no second audit entry, still opens.
    again = seal_erasure(engine.context, job, rows, data, matched, forget, POLICY)
    assert {k: v["key_fingerprint"] for k, v in again["requests"].items()} == \
        {k: v["key_fingerprint"] for k, v in summary["requests"].items()}
    assert len([e for e in _audit_entries(engine, "sealed_set_created") if e["job_id"] == job.job_id]) == 2
    assert len(open_sealed(engine.context, model)[0]) == 2
    with engine.store.read() as conn:
        assert verify_chain(conn, engine.settings.audit_key_bytes).valid


def test_a_tampered_or_moved_ciphertext_fails_loudly_and_a_lost_local_copy_comes_from_mlflow(lethe_engine, digits):
    engine, (frame, data) = lethe_engine, digits
    model = f"sealed-tamper-{uuid.uuid4().hex[:6]}"
    job = _stand_in_job(engine, model)
    subjects = _trained_subjects(frame)[210:212]
    rows, matched = _requests(frame, **{"tamper-a": [subjects[0]], "tamper-b": [subjects[1]]})
    seal_erasure(engine.context, job, rows, data, matched, (matched["tamper-a"] | matched["tamper-b"]) &
                 data.split_mask("train"), POLICY)
    row_a, row_b = _row(engine, job.job_id, "tamper-a"), _row(engine, job.job_id, "tamper-b")

    # A host without the file (a worker pod) reads the MLflow copy.
    Path(row_a.path).unlink()
    assert len(decrypt_set(engine.context, row_a)) == int((matched["tamper-a"] & data.split_mask("train")).sum())

    # One flipped bit: authentication fails, loudly, and open_sealed reports it with the reason.
    blob = bytearray(Path(row_a.path).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    Path(row_a.path).write_bytes(bytes(blob))
    with pytest.raises(SealedSetError, match="fails authentication"):
        decrypt_set(engine.context, row_a)
    # Another set's intact file under this set's name fails too (the ids are associated data).
    Path(row_a.path).write_bytes(Path(row_b.path).read_bytes())
    with pytest.raises(SealedSetError, match="fails authentication"):
        decrypt_set(engine.context, row_a)
    opened, unavailable = open_sealed(engine.context, model)
    assert [s.request_id for s in opened] == ["tamper-b"]
    (broken,) = unavailable
    assert (broken.request_id, broken.status) == ("tamper-a", "corrupt") and "fails authentication" in broken.reason
    # A set that should be readable and is not fails the re-check (fail closed), it is not "not checkable".
    (check,) = erasure_rechecks(engine.catalog, None, None, None, None, POLICY, [], unavailable).checks
    assert check.passed is False and "unreadable" in check.reason

    # Gone everywhere: reported as missing, with the reason.
    engine.registry.delete_artifact(row_b.artifact_uri)
    Path(row_b.path).unlink()
    _, unavailable = open_sealed(engine.context, model)
    assert {(u.request_id, u.status) for u in unavailable} == {("tamper-a", "corrupt"), ("tamper-b", "missing")}
    assert "ciphertext missing" in next(u.reason for u in unavailable if u.status == "missing")


def test_retention_zero_keeps_nothing_and_says_so(lethe_engine, digits):
    engine, (frame, data) = lethe_engine, digits
    model = f"sealed-zero-{uuid.uuid4().hex[:6]}"
    job = _stand_in_job(engine, model)
    rows, matched = _requests(frame, **{"zero-a": [_trained_subjects(frame)[220]]})
    summary = seal_erasure(engine.context, job, rows, data, matched, matched["zero-a"] & data.split_mask("train"),
                           replace(POLICY, sealed_retention_days=0))
    assert summary["sets"] == 0 and "no verification set was kept" in summary["note"]
    assert summary["requests"]["zero-a"]["kept"] is False
    row = _row(engine, job.job_id, "zero-a")
    assert row.path is None and row.wrapped_key is None and row.key_fingerprint is None
    sealed_dir = engine.settings.state_dir / "sealed"
    assert not [p for p in sealed_dir.rglob("*") if job.job_id in p.name]
    assert [e for e in _audit_entries(engine, "sealed_set_not_kept") if e["job_id"] == job.job_id]
    opened, (unavailable,) = open_sealed(engine.context, model)
    assert not opened and unavailable.status == "not_kept" and "retention 0: nothing was kept" in unavailable.reason
    (check,) = erasure_rechecks(engine.catalog, None, None, None, None, POLICY, opened, [unavailable]).checks
    assert check.passed is None and check.reason.startswith("not checkable: retention 0")


def test_after_the_window_the_key_is_destroyed_audited_and_the_set_is_not_checkable(lethe_engine, digits):
    engine, (frame, data) = lethe_engine, digits
    model = f"sealed-shred-{uuid.uuid4().hex[:6]}"
    job = _stand_in_job(engine, model)
    failed = _stand_in_job(engine, model, state="FAILED", registered=False)
    subject = _trained_subjects(frame)[230]
    rows, matched = _requests(frame, **{"shred-a": [subject]})
    forget = matched["shred-a"] & data.split_mask("train")
    seal_erasure(engine.context, job, rows, data, matched, forget, POLICY)
    seal_erasure(engine.context, failed, rows, data, matched, forget, POLICY)
    row = _row(engine, job.job_id, "shred-a")
    now = db.utcnow()

    # A set whose job ended without registering a version attests nothing: destroyed at the next pass.
    assert shred_expired(engine.context, now + timedelta(days=29), model_name=model) == 1
    assert _row(engine, failed.job_id, "shred-a").wrapped_key is None
    assert _row(engine, job.job_id, "shred-a").wrapped_key == row.wrapped_key  # inside its window: kept
    assert len(open_sealed(engine.context, model, now + timedelta(days=29))[0]) == 1
    # Past the window, the set is no longer used even before the key is destroyed.
    _, (expired,) = open_sealed(engine.context, model, now + timedelta(days=31))
    assert expired.status == "expired"

    later = now + timedelta(days=31)
    assert shred_expired(engine.context, later, model_name=model) == 1
    assert shred_expired(engine.context, later, model_name=model) == 0, "each key is destroyed once"
    gone = _row(engine, job.job_id, "shred-a")
    assert gone.wrapped_key is None and db.as_utc(gone.destroyed_at) == later
    assert not Path(row.path).exists() and not Path(row.artifact_uri.removeprefix("file://")).exists()
    (entry,) = [e for e in _audit_entries(engine, "sealed_key_destroyed") if e["job_id"] == job.job_id]
    assert entry["key_fingerprint"] == row.key_fingerprint and entry["request_id"] == "shred-a"
    assert "retention window" in entry["reason"]

    opened, (unavailable,) = open_sealed(engine.context, model, later)
    assert not opened and unavailable.status == "destroyed"
    assert unavailable.reason.startswith(f"key destroyed on {later.date().isoformat()}")
    assert "after the retention window of 30 day(s)" in unavailable.reason
    (check,) = erasure_rechecks(engine.catalog, None, None, None, None, POLICY, opened, [unavailable]).checks
    assert check.passed is None and check.reason.startswith("not checkable: key destroyed on")
    with engine.store.read() as conn:
        report = verify_chain(conn, engine.settings.audit_key_bytes)
    assert report.valid, report.errors


def test_retention_is_a_bounded_policy_value_carried_in_the_proto():
    assert VerificationPolicy().sealed_retention_days == 30.0
    for bad in (-1.0, 3651.0, float("nan")):
        (violation,) = policy_violations(replace(POLICY, sealed_retention_days=bad))
        assert violation.field == "policy.sealed_retention_days"
    assert not policy_violations(replace(POLICY, sealed_retention_days=0.0))
    assert converters.policy_from_proto(types_pb2.VerificationPolicy()).sealed_retention_days == 30.0
    assert converters.policy_from_proto(
        types_pb2.VerificationPolicy(sealed_retention_days=0)).sealed_retention_days == 0.0


def test_a_class_erasure_is_sealed_end_to_end_and_rechecked(lethe_engine):
    """Through the engine: the evidence and certificate record the sealed set (never the key); the version
    that still knows the erased class fails the re-check, the unlearned version passes; after the window the
    re-check reports "not checkable"."""
    engine = lethe_engine
    model = build_digits_demo(engine.settings, engine, model_name="digits-sealed", policy=DEMO_POLICY)
    with engine.store.read() as conn:
        info = ModelInfo.from_row(db.get_model(conn, model))
    support = task_support(info)
    before = support.load(engine.context, model, info.serving_version)

    outcome = engine.submit_erasure(ErasureRequest(request_id="sealed-class-3", classes=(3,), model_names=(model,)))
    (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=300)
    assert job.state is JobState.SUCCEEDED, job.message
    with engine.store.read() as conn:
        evidence = db.get_job(conn, job.job_id).evidence
    sealed = evidence["sealed"]
    assert sealed["sets"] == 1 and sealed["retention_days"] == 30.0
    assert sealed["requests"]["sealed-class-3"]["kind"] == "classes"
    body = json.loads(engine.get_certificate("sealed-class-3")[0].body_json)
    assert body["sealed"] == {"retention_days": 30.0, "sets": 1, "rows": sealed["rows"],
                              "expires_at": sealed["expires_at"]}
    row = _row(engine, job.job_id, "sealed-class-3")
    assert row.wrapped_key not in json.dumps(evidence) + json.dumps(body)

    opened, unavailable = open_sealed(engine.context, model)
    assert not unavailable and [(s.kind, s.classes) for s in opened] == [("classes", (3,))]
    assert (opened[0].frame["label"] == 3).all() and len(opened[0].frame) == sealed["rows"]
    after = support.load(engine.context, model, job.result_version)
    task = support.task()
    current = engine.catalog.load(*_serving_dataset(engine, model, job.result_version))
    audit = current.examples(current.split_mask("holdout") & audit_mask(
        current.record_ids.astype(str), engine.settings.split_key_bytes))

    (knows,) = erasure_rechecks(engine.catalog, support, task, before, audit, POLICY, opened, unavailable).checks
    assert knows.name == "erased_stays_erased[sealed-class-3]" and knows.passed is False and knows.value > 0.5
    result = erasure_rechecks(engine.catalog, support, task, after, audit, POLICY, opened, unavailable)
    (forgot,) = result.checks
    assert forgot.passed is True and forgot.value <= POLICY.class_forget_max_accuracy
    assert result.evidence["erasure_rechecks"]["sealed-class-3"]["records"] == sealed["rows"]

    # Three record erasures re-checked together (training records of three subjects, still in this model):
    # each at the family level, min_forget_p / 3; the class erasure is no member of that family.
    frame = engine.catalog.frame(_serving_dataset(engine, model, job.result_version)[0])
    trained = frame[frame["split"] == "train"]
    subjects = sorted(trained["subject_id"].unique())[:3]
    records = [OpenedSet(f"subject-{i}", "job-x", "records", (), trained[trained["subject_id"] == subject])
               for i, subject in enumerate(subjects)]
    result = erasure_rechecks(engine.catalog, support, task, after, audit, POLICY, opened + records, unavailable)
    checks = {check.name: check for check in result.checks}
    for i in range(3):
        check, found = checks[f"erased_stays_erased[subject-{i}]"], result.evidence["erasure_rechecks"][f"subject-{i}"]
        assert found["family"] == 3 and check.limit == pytest.approx(POLICY.min_forget_p / 3) == found["ks_floor"]
        assert "one of 3 record erasure(s)" in check.rule and check.passed is (
            found["membership"]["ks_p_value"] >= POLICY.min_forget_p / 3
            and abs(found["membership"]["auc"] - 0.5) <= found["auc_slack"] + 1e-12)
    assert checks["erased_stays_erased[sealed-class-3]"].limit == POLICY.class_forget_max_accuracy

    later = db.utcnow() + timedelta(days=31)
    assert shred_expired(engine.context, later, model_name=model) == 1
    opened, unavailable = open_sealed(engine.context, model, later)
    (check,) = erasure_rechecks(engine.catalog, support, task, after, audit, POLICY, opened, unavailable).checks
    assert check.passed is None and "not checkable: key destroyed on" in check.reason


def _serving_dataset(engine, model: str, version: str) -> tuple[str, str]:
    with engine.store.read() as conn:
        row = db.dataset_for_model_version(conn, model, version)
    return row.path, row.digest
