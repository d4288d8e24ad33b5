"""Bad input is refused with a clear typed error and field violations, and nothing is written."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import pydantic

from service import store as db
from lethe_demo.data import DEMO_POLICY, digits_frame
from service.domain import (
    MethodStep,
    DeadlineExceeded,
    ErasureRequest,
    FailedPrecondition,
    InvalidArgument,
    ModelRegistration,
    NotFound,
    TaskType,
)
from service.settings import RESERVED_GRPC_WORKERS, Settings
from tests.service.conftest import assert_erasure_paths, fresh_subjects, wait_for_jobs
from unlearn.models import tiny_mlp


def _snapshot(engine):
    with engine.store.read() as conn:
        return (db.last_event_seq(conn), db.audit_tail(conn), len(db.pending_requests(conn)),
                len(db.list_models(conn)), len(db.live_dataset_versions(conn)))


LONG = "x" * 257
BAD_REQUESTS = {
    "empty selectors": (ErasureRequest(request_id="bad-1"), InvalidArgument, "subject_ids"),
    "empty request id": (ErasureRequest(request_id="", subject_ids=("a",)), InvalidArgument, "request_id"),
    "oversize request id": (ErasureRequest(request_id=LONG, subject_ids=("a",)), InvalidArgument, "request_id"),
    "empty subject id": (ErasureRequest(request_id="bad-2", subject_ids=("a", "")), InvalidArgument,
                         "subject_ids[1]"),
    "oversize subject id": (ErasureRequest(request_id="bad-3", subject_ids=(LONG,)), InvalidArgument,
                            "subject_ids[0]"),
    "too many ids": (ErasureRequest(request_id="bad-4", record_ids=tuple(f"r{i}" for i in range(10001))),
                     InvalidArgument, "record_ids"),
    "duplicate ids": (ErasureRequest(request_id="bad-5", subject_ids=("a", "b", "a")), InvalidArgument,
                      "subject_ids[2]"),
    "unknown model": (ErasureRequest(request_id="bad-6", subject_ids=("a",), model_names=("no-such-model",)),
                      NotFound, "model_names[0]"),
    "unknown method": (ErasureRequest(request_id="bad-7", subject_ids=("a",), method="no-such-method"),
                       InvalidArgument, "method"),
    "unknown parameter": (ErasureRequest(request_id="bad-8", subject_ids=("a",), method="ssd",
                                         method_params={"alpah": 1.0}), InvalidArgument, "method_params.alpah"),
    "parameter out of range": (ErasureRequest(request_id="bad-9", subject_ids=("a",), method="ssd",
                                              method_params={"alpha": -1.0}), InvalidArgument, "method_params.alpha"),
    "ill-typed parameter": (ErasureRequest(request_id="bad-10", subject_ids=("a",), method="ssd",
                                           method_params={"batch_size": "big"}), InvalidArgument,
                            "method_params.batch_size"),
    "policy override beyond limits": (ErasureRequest(request_id="bad-11", subject_ids=("a",),
                                                     policy_overrides={"max_utility_drop": 0.5}), InvalidArgument,
                                      "policy_overrides.max_utility_drop"),
    "deadline passed": (ErasureRequest(request_id="bad-12", subject_ids=("a",),
                                       deadline=datetime.now(timezone.utc) - timedelta(seconds=1)),
                        DeadlineExceeded, "deadline"),
    "class erasure without models": (ErasureRequest(request_id="bad-13", classes=(1,)), InvalidArgument,
                                     "model_names"),
    "class out of range": (ErasureRequest(request_id="bad-14", classes=(12,), model_names=("digits-cnn",)),
                           InvalidArgument, "classes[0]"),
    "second model unknown": (ErasureRequest(request_id="bad-15", subject_ids=("a",),
                                            model_names=("digits-cnn", "no-such-model")), NotFound, "model_names[1]"),
    "ids mixed with classes": (ErasureRequest(request_id="bad-16", subject_ids=("a",), classes=(1,),
                                              model_names=("digits-cnn",)), InvalidArgument, "classes"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_erasure_requests_write_nothing(lethe_engine, case):
    request, error_type, field = BAD_REQUESTS[case]
    before = _snapshot(lethe_engine)
    with pytest.raises(error_type) as raised:
        lethe_engine.submit_erasure(request)
    if field is not None:
        assert field in {v.field for v in raised.value.violations}, raised.value.violations
    assert_erasure_paths(raised.value.violations)
    assert _snapshot(lethe_engine) == before



def test_model_not_registered_as_unlearnable(lethe_engine):
    engine = lethe_engine
    engine.registry.log_initial_model(tiny_mlp(0), "plain-model", run_name="plain")
    before = _snapshot(engine)
    with pytest.raises(FailedPrecondition) as raised:
        engine.submit_erasure(ErasureRequest(request_id="bad-plain", subject_ids=("a",), model_names=("plain-model",)))
    assert [v.field for v in raised.value.violations] == ["model_names[0]"]
    assert _snapshot(engine) == before


def _registration(tmp_path, frame: pd.DataFrame, name="digits-cnn") -> ModelRegistration:
    """A registration of the head of the lineage (the serving alias): older versions hold subjects other tests
    erased and are refused before their dataset is read (tests/service/test_engine_lineage.py)."""
    path = tmp_path / "data.parquet"
    frame.to_parquet(path, index=False)
    return ModelRegistration(model_name=name, version=None, alias="serving", task_type=TaskType.CLASSIFICATION,
                             dataset_uri=str(path), policy=DEMO_POLICY, num_classes=10)


def _nan_features(frame):
    frame = frame.copy()
    frame.at[3, "features"] = [float("nan")] * 64
    return frame


BAD_DATASETS = {
    "missing column": (lambda f: f.drop(columns=["subject_id"]), "dataset.columns"),
    "duplicate record ids": (lambda f: pd.concat([f, f.head(2)], ignore_index=True), "dataset.record_id"),
    "empty holdout": (lambda f: f[f["split"] != "holdout"], "dataset.split"),
    "nan features": (_nan_features, "dataset.features"),
    "label out of range": (lambda f: f.assign(label=f["label"] + 5), "dataset.label"),
    "features that do not fit the model": (lambda f: f.assign(features=[v[:10] for v in f["features"]]),
                                           "dataset.features"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_malformed_datasets_are_refused(lethe_engine, tmp_path, case):
    mutate, field = BAD_DATASETS[case]
    before = _snapshot(lethe_engine)
    with pytest.raises(InvalidArgument) as raised:
        lethe_engine.register_model(_registration(tmp_path, mutate(digits_frame())))
    assert field in {v.field for v in raised.value.violations}, raised.value.violations
    assert _snapshot(lethe_engine) == before


def test_registration_bad_policy_and_unknown_model(lethe_engine, tmp_path):
    registration = _registration(tmp_path, digits_frame().head(50))
    with pytest.raises(InvalidArgument) as raised:
        lethe_engine.register_model(replace(registration, policy=replace(
            DEMO_POLICY, method_chain=(MethodStep("ssd-auto"), MethodStep("nope")))))
    assert "policy.method_chain[1].name" in {v.field for v in raised.value.violations}
    # The gate cannot be configured away: every policy value is bounded, and the refusal names the field.
    before = _snapshot(lethe_engine)
    with pytest.raises(InvalidArgument) as raised:
        lethe_engine.register_model(replace(registration, policy=replace(
            DEMO_POLICY, max_utility_drop=1.0, min_forget_p=0.0, mia_auc_margin=0.5, class_forget_max_accuracy=1.0,
            onnx_tolerance=1.0)))
    assert {v.field for v in raised.value.violations} == {
        "policy.max_utility_drop", "policy.min_forget_p", "policy.mia_auc_margin",
        "policy.class_forget_max_accuracy", "policy.onnx_tolerance"}
    assert _snapshot(lethe_engine) == before
    with pytest.raises(NotFound):
        lethe_engine.register_model(replace(registration, model_name="never-logged"))


def test_tombstones_refuse_reingestion(lethe_engine, tmp_path):
    engine = lethe_engine
    (subject,) = fresh_subjects(1)
    outcome = engine.submit_erasure(ErasureRequest(request_id="tomb-1", subject_ids=(subject,)))
    wait_for_jobs(engine, outcome.job_ids)
    before = _snapshot(engine)
    with pytest.raises(InvalidArgument) as raised:  # the original data still holds the erased records
        engine.register_model(_registration(tmp_path, digits_frame()))
    violation = {v.field: v.description for v in raised.value.violations}["dataset.record_id"]
    assert "erased earlier" in violation
    assert _snapshot(engine) == before


def test_settings_defaults_keys_and_unknown_fields(tmp_path, monkeypatch):
    monkeypatch.setenv("LETHE_GRPC_PORT", "6000")
    monkeypatch.setenv("LETHE_GRPC_MAX_WORKERS", "48")
    monkeypatch.setenv("LETHE_NOT_A_SETTING", "ignored")
    settings = Settings(state_dir=tmp_path / "state")
    assert settings.grpc_port == 6000 and settings.grpc_max_workers == 48
    with pytest.raises(pydantic.ValidationError):  # no thread left for a single stream beside the reserve
        Settings(state_dir=tmp_path, grpc_max_workers=RESERVED_GRPC_WORKERS)
    assert settings.job_store_url == f"sqlite:///{tmp_path / 'state' / 'lethe.db'}"
    assert settings.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"
    key = settings.audit_key_bytes
    assert len(key) == 32 and key == Settings(state_dir=tmp_path / "state").audit_key_bytes
    mode = stat.S_IMODE(os.stat(tmp_path / "state" / "keys" / "audit.key").st_mode)
    assert mode == 0o600
    assert settings.subject_hash_key_bytes != key
    with pytest.raises(pydantic.ValidationError):
        Settings(state_dir=tmp_path, coalescing_window=1.0)
    assert Settings(state_dir=tmp_path, audit_key="00" * 32).audit_key_bytes == bytes(32)
