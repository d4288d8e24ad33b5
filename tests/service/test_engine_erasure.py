"""Engine-level erasure behaviour on the shared digits model: happy path with coalescing, idempotency,
ALREADY_EXISTS, unknown subjects, the rejection path, and class erasure."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from datetime import datetime, timedelta, timezone
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from lethe_demo.data import DEMO_POLICY, build_digits_demo
from service import store as db
from service.domain import AlreadyExists, ErasureRequest, EventKind, JobState, MethodStep, NotFound
from service.engine import Engine
from tests.service.conftest import fresh_subjects, make_settings, wait_for_jobs
from unlearn.digits import load_digits_records


def _body(certificate) -> dict:
    return json.loads(certificate.body_json)


def test_erasure_happy_path_coalesces_registers_purges_and_certifies(lethe_engine, digits_model):
    engine = lethe_engine
    serving_before = engine.registry.serving_version(digits_model)
    with engine.store.read() as conn:
        old_dataset = db.dataset_for_model_version(conn, digits_model, serving_before)
    subjects = fresh_subjects(3)
    outcomes = [engine.submit_erasure(ErasureRequest(request_id=f"happy-{i}", subject_ids=(subject,)))
                for i, subject in enumerate(subjects)]
    assert all(o.created for o in outcomes)
    assert len({o.job_ids for o in outcomes}) == 1, "requests inside one window share one job"
    (job,) = wait_for_jobs(engine, outcomes[0].job_ids)
    assert job.state is JobState.SUCCEEDED, job.message
    assert job.request_ids == tuple(sorted(o.request_id for o in outcomes))

    # Registered, and the serving alias moved to the new version.
    assert job.result_version == engine.registry.serving_version(digits_model) != serving_before
    version = engine.registry.resolve(digits_model, job.result_version)
    assert version.tags["lethe.job_id"] == job.job_id
    assert version.tags["lethe.parent_version"] == serving_before
    assert "subject-" not in json.dumps(version.tags), "no subject id in clear in MLflow"

    # Purged: the new dataset version lacks the subjects' records; the old copies are gone everywhere.
    with engine.store.read() as conn:
        new_dataset = db.dataset_for_model_version(conn, digits_model, job.result_version)
        old_row = conn.execute(db.dataset_versions.select().where(
            db.dataset_versions.c.id == old_dataset.id)).first()
    frame = pd.read_parquet(new_dataset.path)
    assert not frame["subject_id"].isin(subjects).any()
    assert not Path(old_dataset.path).exists()
    assert old_row.removed_at is not None
    assert not Path(old_dataset.mlflow_artifact_uri.removeprefix("file://")).exists()

    # One certificate per request, pointing at the shared job, verifiable, with the evidence.
    digits = load_digits_records()
    for subject, outcome in zip(subjects, outcomes):
        (certificate,) = engine.get_certificate(outcome.request_id)
        body = _body(certificate)
        assert body["job_id"] == job.job_id and body["coalesced_requests"] == 3
        # The certificate names exactly the subject's records (by hash), all splits included.
        owned = sorted(digits.record_ids[digits.subject_ids == subject].tolist())
        assert body["records"]["matched"] == len(owned)
        assert body["records"]["record_ids_sha256"] == hashlib.sha256("\n".join(owned).encode()).hexdigest()
        # The label follows the method that passed (after other tests' erasures on this shared lineage the chain
        # has been seen to escalate to the exact retrain; every attempt's verdict is in the certificate).
        assert body["label"] == ("exact" if body["method"]["name"] == "retrain" else "approximate"), \
            [(a["method"], a["failures"]) for a in body["attempts"]]
        assert body["attempts"][-1]["gate_passed"] is True and body["records"]["matched"] > 0
        assert body["model"]["result_version"] == job.result_version
        assert body["deadline"] is None  # the request set no deadline
        # The claim matches what happened to the weights (ssd-auto may find nothing to dampen).
        assert ("left the model's weights unchanged" in body["statement"]) is not body["model"]["weights_changed"]
        assert {c["name"] for c in body["verification"]["checks"]} == {
            "utility", "membership_ks", "membership_auc", "forget_accuracy", "onnx_parity", "onnx_utility"}
        assert body["verification"]["onnx"]["providers"] == ["CPUExecutionProvider"]
        assert body["verification"]["membership_after"]["reference_size"] == body["verification"]["sizes"]["audit"]
        assert [a["method"] for a in body["attempts"]][-1] == body["method"]["name"]
        assert body["attempts"][-1]["gate_passed"] is True
        assert not any(s in certificate.body_json for s in subjects)
        assert engine.verify_certificate(certificate.body_json, certificate.signature).valid
    assert not {o.request_id for o in outcomes} & {p.request_id for p in engine.pending_requests()}

    # Events: every stage in order, one terminal event per request with its certificate.
    events = engine.events(after_seq=0, job_ids=outcomes[0].job_ids)
    stages = [e.stage for e in events if e.kind is EventKind.PROGRESS]
    for stage in ("resolve", "measure", "apply", "verify", "register", "purge", "audit"):
        assert stage in stages
    terminal = [e for e in events if e.kind is EventKind.TERMINAL]
    assert sorted(e.request_ids[0] for e in terminal) == sorted(o.request_id for o in outcomes)
    assert all(e.certificate is not None for e in terminal)
    assert [e.seq for e in events] == sorted(e.seq for e in events)

    # Metrics.
    registry = engine.metrics.registry
    assert registry.get_sample_value("lethe_requests_total", {"kind": "erase", "outcome": "accepted"}) >= 3
    assert registry.get_sample_value("lethe_records_erased_total") >= job.records
    assert registry.get_sample_value("lethe_verification_total", {"outcome": "passed"}) >= 1


def test_idempotent_replay_and_already_exists(lethe_engine):
    engine = lethe_engine
    (subject,) = fresh_subjects(1)
    request = ErasureRequest(request_id="idem-1", subject_ids=(subject,))
    first = engine.submit_erasure(request)
    replay = engine.submit_erasure(request)
    assert replay.created is False
    assert (replay.job_ids, replay.first_event_seq) == (first.job_ids, first.first_event_seq)
    with engine.store.read() as conn:
        before = (db.last_event_seq(conn), db.audit_tail(conn))
    with pytest.raises(AlreadyExists) as raised:
        engine.submit_erasure(ErasureRequest(request_id="idem-1", subject_ids=(subject, "someone-else")))
    assert raised.value.violations[0].field == "request_id"
    with engine.store.read() as conn:
        assert (db.last_event_seq(conn), db.audit_tail(conn)) == before, "nothing written"
    wait_for_jobs(engine, first.job_ids)
    after = engine.submit_erasure(request)  # same outcome once the job is over, too
    assert (after.created, after.job_ids) == (False, first.job_ids)


def test_unknown_subject_gets_a_no_records_certificate_at_once(lethe_engine):
    engine = lethe_engine
    outcome = engine.submit_erasure(ErasureRequest(request_id="nobody-1", subject_ids=("no-such-person",)))
    assert outcome.job_ids == ()
    (certificate,) = engine.get_certificate("nobody-1")
    body = _body(certificate)
    assert body["label"] == "no records found" and body["records"]["matched"] == 0
    assert "no-such-person" not in certificate.body_json
    assert "nobody-1" not in {p.request_id for p in engine.pending_requests()}
    kinds = [e.kind for e in engine.events(after_seq=outcome.first_event_seq - 1, request_ids=("nobody-1",))]
    assert kinds == [EventKind.ACCEPTED, EventKind.TERMINAL]


def test_a_rejected_method_escalates_along_the_policy_chain(lethe_engine, digits_model):
    engine = lethe_engine
    (subject,) = fresh_subjects(1)
    # alpha and lambda this small dampen almost every weight to near zero: utility collapses, the gate rejects
    # it, and the next method of the model's chain starts again from the same base version.
    outcome = engine.submit_erasure(ErasureRequest(request_id="escalate-1", subject_ids=(subject,), method="ssd",
                                                   method_params={"alpha": 1e-6, "lam": 1e-6}))
    (job,) = wait_for_jobs(engine, outcome.job_ids)
    assert job.state is JobState.SUCCEEDED, job.message
    body = _body(engine.get_certificate("escalate-1")[0])
    first, *rest = body["attempts"]
    assert first["method"] == "ssd" and first["gate_passed"] is False and "utility" in first["failures"]
    assert rest and rest[-1]["gate_passed"] is True and body["method"]["name"] == rest[-1]["method"] != "ssd"
    assert body["method"]["attempt"] == len(body["attempts"])


def test_rejection_by_every_method_keeps_alias_and_request_pending(tmp_path):
    # A model whose chain is one method that collapses utility: nothing can pass the gate.
    engine = Engine(make_settings(tmp_path))
    strict = build_digits_demo(engine.settings, engine, model_name="digits-one-method", policy=replace(
        DEMO_POLICY, method_chain=(MethodStep("ssd", {"alpha": 1e-6, "lam": 1e-6}),)))
    engine.start()
    serving_before = engine.registry.serving_version(strict)
    outcome = engine.submit_erasure(ErasureRequest(request_id="reject-1", subject_ids=("subject-0007",),
                                                   model_names=(strict,)))
    (job,) = wait_for_jobs(engine, outcome.job_ids)
    assert job.state is JobState.REJECTED_BY_VERIFICATION, job.message
    assert "utility" in job.message and job.result_version is None
    (attempt,) = job.evidence["attempts"]
    checks = {c["name"]: c for c in attempt["verification"]["checks"]}
    assert checks["utility"]["passed"] is False
    assert attempt["verification"]["onnx"] == {"skipped": "the library checks failed; the model was not exported"}
    assert engine.registry.serving_version(strict) == serving_before
    assert engine.registry.version_for_job(strict, job.job_id) is None
    assert "reject-1" in {p.request_id for p in engine.pending_requests()}
    with pytest.raises(NotFound):
        engine.get_certificate("reject-1")
    assert engine.metrics.registry.get_sample_value("lethe_oldest_pending_request_age_seconds") > 0
    engine.stop(10)
    engine.store.dispose()


def test_class_erasure_forgets_the_class(lethe_engine, digits_model):
    engine = lethe_engine
    # Class 4: no other test erases it from the shared model (test_engine_updates erases 7; a class already
    # erased by an earlier test on this worker would make this one's outcome depend on the order).
    outcome = engine.submit_erasure(ErasureRequest(request_id="class-4", classes=(4,), model_names=(digits_model,)))
    (job,) = wait_for_jobs(engine, outcome.job_ids)
    assert job.state is JobState.SUCCEEDED, job.message
    body = _body(engine.get_certificate("class-4")[0])
    assert body["verification"]["scenario"] == "class"
    assert body["verification"]["forget_acc_after"] <= 0.05
    assert body["model"]["weights_changed"] is True
    assert "influence was removed" in body["statement"] and "unchanged" not in body["statement"]


@contextlib.contextmanager
def workers_paused(engine):
    """Stop the shared engine's workers (no job can start) and start them again on exit."""
    assert engine.stop(60), "a job of an earlier test is still running"
    try:
        yield
    finally:
        engine.start()


def test_a_request_past_its_deadline_is_overdue_then_completes_and_is_certified_late(lethe_engine):
    """A deadline is honoured honestly: while the request waits past it, the pending view and the gauge say
    overdue; the job still runs (the erasure is owed), and the certificate, the TERMINAL event and the
    counter say late. A request in the same job whose deadline is far off is certified on time."""
    engine = lethe_engine
    late_subject, on_time_subject = fresh_subjects(2)
    gauge = "lethe_overdue_pending_requests"
    counter = "lethe_certificates_late_total"
    overdue_before = engine.metrics.registry.get_sample_value(gauge)
    late_before = engine.metrics.registry.get_sample_value(counter)
    with workers_paused(engine):
        deadline = datetime.now(timezone.utc) + timedelta(seconds=3)  # slack for a loaded machine
        far = deadline + timedelta(days=30)
        late = engine.submit_erasure(ErasureRequest(request_id="late-1", subject_ids=(late_subject,),
                                                    deadline=deadline))
        on_time = engine.submit_erasure(ErasureRequest(request_id="on-time-1", subject_ids=(on_time_subject,),
                                                       deadline=far))
        assert late.job_ids == on_time.job_ids, "one window, one job"
        pending = {p.request_id: p for p in engine.pending_requests()}
        assert (pending["late-1"].deadline, pending["late-1"].overdue) == (deadline, False)
        time.sleep(max(0.0, (deadline - datetime.now(timezone.utc)).total_seconds()) + 0.05)
        pending = {p.request_id: p for p in engine.pending_requests()}
        assert pending["late-1"].overdue and not pending["on-time-1"].overdue
        assert engine.metrics.registry.get_sample_value(gauge) == overdue_before + 1

    (job,) = wait_for_jobs(engine, late.job_ids)
    assert job.state is JobState.SUCCEEDED, job.message  # late, but done
    late_body, on_time_body = (_body(engine.get_certificate(r)[0]) for r in ("late-1", "on-time-1"))
    assert late_body["deadline"]["at"] == deadline.isoformat() and late_body["deadline"]["late"] is True
    assert late_body["deadline"]["late_by_s"] > 0
    assert on_time_body["deadline"] == {"at": far.isoformat(), "late": False, "late_by_s": 0.0}
    assert engine.verify_certificate(engine.get_certificate("late-1")[0].body_json,
                                     engine.get_certificate("late-1")[0].signature).valid
    terminal = {e.request_ids[0]: e.message for e in engine.events(after_seq=late.first_event_seq - 1,
                                                                  job_ids=late.job_ids)
                if e.kind is EventKind.TERMINAL}
    assert "LATE" in terminal["late-1"] and "LATE" not in terminal["on-time-1"]
    assert not {"late-1", "on-time-1"} & {p.request_id for p in engine.pending_requests()}
    assert engine.metrics.registry.get_sample_value(gauge) == overdue_before
    assert engine.metrics.registry.get_sample_value(counter) == late_before + 1
