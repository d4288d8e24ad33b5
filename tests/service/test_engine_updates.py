"""Updates and rectifications through the engine (issue 13): new records learned by the policy's continual
strategy from the serving version, the update gate (learned, utility, erased stays erased), the guards
against erased data, the rectification's erase-then-learn, and every bad input refused with its field and
nothing written.

The module runs its own engine: its erasures and rectifications tombstone digits records, which would refuse
other modules' registrations of the digits data on the session engine. New records are digits of the train split shifted one pixel right (a scan from
another device): data the model never saw, of known classes.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from continual import registry as strategies
from lethe_demo.data import DEMO_POLICY, digits_frame
from service import store as db
from service.domain import (
    AlreadyExists,
    ErasureRequest,
    FailedPrecondition,
    InvalidArgument,
    JobState,
    NewRecord,
    NotFound,
    RectificationSubmission,
    UpdateSubmission,
)
from service.lineage_state import load_buffer
from tests.service.conftest import make_engine, wait_for_jobs

@pytest.fixture(scope="module")
def lethe_engine(tmp_path_factory):
    """This module's own started engine, with the digits demo model registered (the fixed test key of
    :func:`tests.service.conftest.make_settings`)."""
    engine, _ = make_engine(tmp_path_factory.mktemp("updates") / "state")
    yield engine
    engine.stop(30)
    engine.store.dispose()


@pytest.fixture(scope="module")
def model(lethe_engine) -> str:
    return "digits-cnn"


@pytest.fixture(scope="module")
def frame():
    return digits_frame()


def shifted(frame, count: int, prefix: str, start: int = 0, subjects_of: int = 5, label=None,
            without=None) -> tuple[NewRecord, ...]:
    """``count`` train digits shifted one pixel right, as new records with new ids (``subjects_of`` records
    per new subject)."""
    rows = frame[frame["split"] == "train"]
    if label is not None:
        rows = rows[rows["label"] == label]
    if without is not None:
        rows = rows[rows["label"] != without]
    rows = rows.iloc[start:start + count]
    records = []
    for index, (features, digit) in enumerate(zip(rows["features"], rows["label"])):
        image = np.roll(np.asarray(features, dtype=np.float32).reshape(8, 8), 1, axis=1)
        image[:, 0] = 0.0
        records.append(NewRecord(f"{prefix}-{index:04d}", f"{prefix}-subject-{index // subjects_of:03d}",
                                 {"features": image.ravel().tolist(), "label": int(digit)}))
    return tuple(records)


def _requests_stored(engine) -> int:
    with engine.store.read() as conn:
        return conn.execute(db.sa.select(db.sa.func.count()).select_from(db.requests)).scalar_one()


def _certificate(engine, request_id: str) -> dict:
    return json.loads(engine.get_certificate(request_id)[0].body_json)


# ------------------------------------------------------------------------------------------- bad input
def test_every_bad_update_is_refused_with_its_field_and_nothing_is_written(lethe_engine, model, frame):
    engine = lethe_engine
    good = shifted(frame, 3, "bad")
    before = _requests_stored(engine)

    def refused(error_type, submission, field: str):
        with pytest.raises(error_type) as caught:
            (engine.submit_update if isinstance(submission, UpdateSubmission)
             else engine.submit_rectification)(submission)
        fields = [v.field for v in caught.value.violations]
        assert any(f.startswith(field) for f in fields), (field, fields)

    refused(NotFound, UpdateSubmission("bad-1", "no-such-model", records=good), "model_name")
    refused(InvalidArgument, UpdateSubmission("bad-2", model), "records")  # neither records nor a URI
    wrong_schema = (NewRecord("bad-x", "s", {"prompt": "Q", "answer": "A"}),)
    refused(InvalidArgument, UpdateSubmission("bad-3", model, records=wrong_schema), "records[0]")
    strings = (NewRecord("bad-y", "s", {"features": ["a"] * 64, "label": 1}),)
    refused(InvalidArgument, UpdateSubmission("bad-4", model, records=strings), "records[0]")
    nan = list(good[0].columns["features"])
    nan[5] = math.nan
    refused(InvalidArgument, UpdateSubmission("bad-5", model, records=(NewRecord("bad-z", "s", {
        "features": nan, "label": 1}),)), "records[0]")
    short = (NewRecord("bad-w", "s", {"features": [0.0] * 10, "label": 1}),)
    refused(InvalidArgument, UpdateSubmission("bad-6", model, records=short), "records[0]")
    label = (NewRecord("bad-v", "s", {"features": good[0].columns["features"], "label": 42}),)
    refused(InvalidArgument, UpdateSubmission("bad-7", model, records=label), "records[0]")
    limit = engine.settings.max_inline_update_rows
    many = tuple(NewRecord(f"bad-m-{i}", "s", good[0].columns) for i in range(limit + 1))
    refused(InvalidArgument, UpdateSubmission("bad-8", model, records=many), "records")
    existing = frame[frame["split"] == "train"].iloc[0]
    refused(InvalidArgument, UpdateSubmission("bad-9", model, records=(NewRecord(
        str(existing["record_id"]), "s", good[0].columns),)), "records[0].record_id")
    refused(InvalidArgument, UpdateSubmission("bad-10", model, records=good, strategy="no-such-strategy"),
            "strategy")
    refused(InvalidArgument, UpdateSubmission("bad-11", model, records=good, strategy="replay",
                                              strategy_params={"alpha": -3}), "strategy_params")
    subject = str(existing["subject_id"])
    refused(NotFound, RectificationSubmission("bad-12", subject, (NewRecord("digits-99999", subject, {
        "features": good[0].columns["features"], "label": 1}),), (model,)), "corrected_records[0].record_id")
    other = frame[(frame["subject_id"] != subject) & (frame["split"] == "train")].iloc[0]
    refused(NotFound, RectificationSubmission("bad-13", subject, (NewRecord(str(other["record_id"]), subject, {
        "features": good[0].columns["features"], "label": 1}),), (model,)), "corrected_records[0].record_id")
    refused(InvalidArgument, RectificationSubmission("bad-14", subject, (), (model,)), "corrected_records")
    assert _requests_stored(engine) == before, "a refused request wrote something"


# ---------------------------------------------------------------------------------------- update flow
@pytest.mark.slow
def test_update_learns_new_records_registers_a_version_and_certifies(lethe_engine, model, frame):
    engine = lethe_engine
    with engine.store.read() as conn:
        base_version = db.get_model(conn, model).serving_version
    records = shifted(frame, 100, "upd")
    outcome = engine.submit_update(UpdateSubmission("upd-100", model, records=records))
    replay = engine.submit_update(UpdateSubmission("upd-100", model, records=records))
    assert replay.job_ids == outcome.job_ids and not replay.created  # idempotent
    (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=600)
    assert job.state is JobState.SUCCEEDED, job.message
    assert int(job.result_version) > int(base_version)
    after = engine.submit_update(UpdateSubmission("upd-100", model, records=records))  # a lost ack, retried late
    assert after.job_ids == outcome.job_ids and not after.created
    with pytest.raises(AlreadyExists):  # the same id with another payload changes nothing
        engine.submit_update(UpdateSubmission("upd-100", model, records=records[:-1]))

    body = _certificate(engine, "upd-100")
    assert body["label"] == "update" and body["kind"] == "update"
    assert body["update"]["records_learned"] == 100 and body["update"]["strategy"] == "replay"
    assert body["dataset"]["records_after"] == body["dataset"]["records_before"] + 100
    checks = {c["name"]: c for c in body["verification"]["checks"]}
    assert checks["learned"]["passed"] and checks["learned"]["value"] >= DEMO_POLICY.min_update_fit
    assert checks["utility"]["passed"] and checks["onnx_parity"]["passed"]
    assert body["update"]["stability"]["checks_during"] > 0
    assert engine.verify_certificate(*_signed(engine, "upd-100")).valid

    with engine.store.read() as conn:
        dataset = db.dataset_for_model_version(conn, model, job.result_version)
    data = engine.catalog.frame(dataset.path)
    assert set(r.record_id for r in records) <= set(data["record_id"])  # learned records are now training data
    registry = engine.metrics.registry
    assert registry.get_sample_value("lethe_updates_total", {"kind": "update", "outcome": "succeeded"}) >= 1
    assert registry.get_sample_value("lethe_records_learned_total") >= 100


@pytest.mark.slow
def test_an_erased_subject_is_refused_in_an_update_and_its_buffer_rows_are_purged(lethe_engine, model, frame):
    engine = lethe_engine
    records = shifted(frame, 20, "guard", start=200)
    first = engine.submit_update(UpdateSubmission("guard-learn", model, records=records))
    (job,) = wait_for_jobs(engine, first.job_ids, timeout_s=600)
    assert job.state is JobState.SUCCEEDED, job.message
    subject = records[0].subject_id
    subject_hash = engine.catalog.subject_hash(subject)
    buffer = load_buffer(engine.context, model)
    assert buffer is not None

    erased = engine.submit_erasure(ErasureRequest("guard-erase", subject_ids=(subject,), model_names=(model,)))
    (job,) = wait_for_jobs(engine, erased.job_ids, timeout_s=600)
    assert job.state is JobState.SUCCEEDED, job.message
    buffer = load_buffer(engine.context, model)
    assert subject_hash not in set(buffer.subject_hashes), "a buffer row of the erased subject survived"
    on_disk = b"".join(p.read_bytes() for p in (engine.settings.state_dir / "continual").rglob("*") if p.is_file())
    assert subject.encode() not in on_disk and subject_hash.encode() not in on_disk

    before = _requests_stored(engine)
    again = shifted(frame, 5, "guard2", start=300)
    again = (NewRecord("guard2-x", subject, records[1].columns), *again)
    with pytest.raises(FailedPrecondition) as refused:
        engine.submit_update(UpdateSubmission("guard-again", model, records=again))
    assert [v.field for v in refused.value.violations] == ["records[0].subject_id"]
    assert subject not in str(refused.value) and _requests_stored(engine) == before
    ok = engine.submit_update(UpdateSubmission("guard-again", model, records=again[1:]))  # resent without it
    (job,) = wait_for_jobs(engine, ok.job_ids, timeout_s=600)
    assert job.state is JobState.SUCCEEDED, job.message


@pytest.mark.slow
def test_rectification_forgets_the_old_values_learns_the_corrected_ones_and_tombstones(lethe_engine, model, frame):
    engine = lethe_engine
    subject = sorted(frame.loc[frame["split"] == "train", "subject_id"].unique())[40]
    rows = frame[(frame["subject_id"] == subject) & (frame["split"] == "train")]
    corrected = []
    for record_id, features, digit in zip(rows["record_id"], rows["features"], rows["label"]):
        image = np.roll(np.asarray(features, dtype=np.float32).reshape(8, 8), 1, axis=1)
        image[:, 0] = 0.0  # the corrected scan
        corrected.append(NewRecord(str(record_id), subject, {"features": image.ravel().tolist(), "label": int(digit)}))
    outcome = engine.submit_rectification(RectificationSubmission("rect-1", subject, tuple(corrected), (model,)))
    (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=600)
    assert job.state is JobState.SUCCEEDED, job.message
    body = _certificate(engine, "rect-1")
    assert body["label"] == "rectification"
    assert body["dataset"]["tombstones_added"] == len(rows)  # the old values, as for an erasure
    assert body["update"]["records_learned"] == len(rows)
    names = {c["name"] for c in body["verification"]["checks"]}
    assert {"learned", "utility", "rectified_membership_ks", "rectified_membership_auc"} <= names
    with engine.store.read() as conn:
        dataset = db.dataset_for_model_version(conn, model, job.result_version)
    data = engine.catalog.frame(dataset.path)
    assert not set(rows["record_id"]) & set(data["record_id"])  # the old values are purged
    mine = data[data["subject_id"] == subject]
    assert mine["record_id"].str.contains("#r").sum() == len(rows)  # the corrected ones are there (new ids)


@pytest.mark.slow
def test_an_update_that_brings_back_an_erased_class_fails_the_gate_with_evidence(tmp_path, frame, monkeypatch):
    """A strategy that (wrongly) restores the erased class: the gate's erased-stays-erased re-check on the
    class's sealed set fails, the re-erasure escalation runs, and the evidence records both.

    On an engine of its own: on this module's engine the lineage also holds the other tests' subject
    erasures, and whether the class's repair leaves a 5-record subject's membership test above p 0.005 is
    then a property of that subject, not of the class escalation tested here."""
    engine, model = make_engine(tmp_path / "state")
    with engine.store.read() as conn:  # the registered version: knows class 7
        original = engine.registry.load_model(model, db.get_model(conn, model).serving_version)
    try:
        _update_restoring_class_7(engine, model, original, frame, monkeypatch)
    finally:
        engine.stop(30)
        engine.store.dispose()


def _update_restoring_class_7(engine, model, original, frame, monkeypatch):
    outcome = engine.submit_erasure(ErasureRequest("class-7-gone", classes=(7,), model_names=(model,)))
    (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=600)
    assert job.state is JobState.SUCCEEDED, job.message

    with pytest.raises(FailedPrecondition) as refused:  # records of the erased class: refused at submission
        engine.submit_update(UpdateSubmission("class-7-back", model, records=shifted(frame, 4, "c7", label=7)))
    assert refused.value.violations[0].field.startswith("records[0]")

    spec = strategies.get("replay")

    def restores(model_, request, config):  # a broken strategy: fine-tunes the PRE-erasure weights
        return spec.run(copy.deepcopy(original), request, config)

    monkeypatch.setitem(strategies._REGISTRY, "replay", replace(spec, run=restores))
    update = engine.submit_update(UpdateSubmission("class-7-regress", model,
                                                   records=shifted(frame, 30, "reg", start=400, without=7)))
    (job,) = wait_for_jobs(engine, update.job_ids, timeout_s=600)
    with engine.store.read() as conn:
        evidence = db.get_job(conn, job.job_id).evidence
    escalation = evidence["update"]["escalation"]
    assert escalation is not None, evidence["verification"]["failures"]
    (recheck,) = [c for c in escalation["first_gate"]["checks"] if c["name"] == "erased_stays_erased[class-7-gone]"]
    assert recheck["passed"] is False and recheck["value"] > DEMO_POLICY.class_forget_max_accuracy
    assert escalation["first_gate"]["failures"] == ["erased_stays_erased[class-7-gone]"]
    assert escalation["method"]["sets"] == ["class-7-gone"]
    assert escalation["method"]["attempts"], "the escalation ran the lineage's chain"
    # the chain judged its attempts against the floor the update gate applies, at least (never a lower one)
    assert escalation["method"]["groups"][0]["utility_reference"] >= escalation["first_gate"]["utility_acc_before"]
    if escalation["repaired"]:  # re-erased on the updated model: the final gate passes on the sealed set
        assert job.state is JobState.SUCCEEDED, job.message
        final = {c["name"]: c for c in evidence["verification"]["checks"]}
        assert final["erased_stays_erased[class-7-gone]"]["passed"] is True
    else:  # no method of the chain repaired it: refused, nothing registered, the request stays pending
        assert job.state is JobState.REJECTED_BY_VERIFICATION and job.result_version is None
        assert "erased_stays_erased[class-7-gone]" in evidence["verification"]["failures"]
        assert all(a["gate_passed"] is False for a in escalation["method"]["attempts"])
    assert engine.metrics.registry.get_sample_value("lethe_update_regressions_total") >= 1


def _signed(engine, request_id: str):
    certificate = engine.get_certificate(request_id)[0]
    return certificate.body_json, certificate.signature

