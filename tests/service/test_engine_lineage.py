"""Aliases and superseded versions (issue 10): the alias given at registration is the one Lethe moves; older
versions trained on erased data leave the serving path (weights purged by default) and may never be
registered again; each new version loads in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from lethe_demo.data import DEMO_POLICY, digits_frame
from service.domain import ErasureRequest, FailedPrecondition, JobState, ModelRegistration, TaskType
from service.engine import Engine
from tests.service.conftest import make_settings, wait_for_jobs
from unlearn.bench import DIGITS_RECIPE
from unlearn.models import digits_cnn


@pytest.mark.slow
def test_registration_alias_moves_old_versions_are_purged_and_cannot_come_back(tmp_path):
    engine = Engine(make_settings(tmp_path / "state"))
    model = digits_cnn(0)  # untrained weights are enough: the lineage, not the accuracy, is under test
    version = engine.registry.log_initial_model(model.eval(), "lineage-cnn", run_name="lineage")
    engine.registry.set_serving("lineage-cnn", version, "champion")
    dataset = engine.settings.dataset_import_dir / "digits.parquet"  # inside the dataset roots
    dataset.parent.mkdir(parents=True, exist_ok=True)
    digits_frame().to_parquet(dataset, index=False)
    registration = ModelRegistration(model_name="lineage-cnn", version=None, alias="champion",
                                     task_type=TaskType.CLASSIFICATION, dataset_uri=str(dataset), policy=DEMO_POLICY,
                                     num_classes=10, model_factory="unlearn.models:digits_cnn",
                                     train_recipe={**vars(DIGITS_RECIPE), "epochs": 1})
    registered = engine.register_model(registration)
    assert registered.version == version and registered.serving_alias == "champion"
    engine.start()
    try:
        outcome = engine.submit_erasure(ErasureRequest(request_id="lineage-1", subject_ids=("subject-0007",),
                                                       model_names=("lineage-cnn",)))
        (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=600)
        assert job.state is JobState.SUCCEEDED, job.message
        new = job.result_version
        assert engine.registry.serving_version("lineage-cnn", "champion") == new  # the registration's alias
        assert engine.registry.serving_version("lineage-cnn") is None  # the settings' default was never used

        old = engine.registry.resolve("lineage-cnn", version)
        assert old.tags["lethe.superseded_by"] == new and old.tags["lethe.superseded_action"] == "purge"
        with pytest.raises((MlflowException, OSError)):  # its weights are gone; the registry entry stays
            engine.registry.load_model("lineage-cnn", version)
        body = json.loads(engine.get_certificate("lineage-1")[0].body_json)
        assert body["model"]["superseded_versions"] == [{"version": version, "action": "purge", "superseded_by": new}]
        assert body["model"]["serving_alias"] == "champion"

        # The version trained on the erased subject may not come back (the alias now names the new version).
        with pytest.raises(FailedPrecondition) as refused:
            engine.register_model(ModelRegistration(**{**vars(registration), "alias": None, "version": version}))
        assert refused.value.violations[0].field == "version"
        assert "1 erased subject(s)" in refused.value.violations[0].description
        assert engine.registry.serving_version("lineage-cnn", "champion") == new

        # The new version loads in a fresh process (what a serving platform does).
        code = ("import mlflow, torch; m = mlflow.pytorch.load_model('models:/lineage-cnn/%s'); "
                "print(tuple(m(torch.zeros(2, 64)).shape))" % new)
        env = {**os.environ, "MLFLOW_TRACKING_URI": engine.settings.mlflow_tracking_uri}
        with tempfile.TemporaryDirectory() as elsewhere:  # not the repository: nothing importable by accident
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                 cwd=elsewhere, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip().endswith("(2, 10)")
    finally:
        engine.stop(10)
        engine.store.dispose()
    assert Path(tmp_path / "state").exists()
