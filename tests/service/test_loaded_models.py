"""A worker keeps the model objects of the versions it used or registered last (service.loaded_models): the
next job on a lineage starts from the object in memory instead of loading it from MLflow, and an object
whose weights changed in place is never handed out again."""

from __future__ import annotations

import threading

import torch

from service.domain import ErasureRequest, JobState
from service.loaded_models import LoadedModels
from service.task_support import ClassifierSupport
from tests.service.conftest import fresh_subjects, wait_for_jobs
from unlearn.importance import weights_digest
from unlearn.models import tiny_mlp


def test_held_objects_come_back_least_recently_used_go_first():
    models = LoadedModels(2)
    a, b, c = tiny_mlp(0), tiny_mlp(1), tiny_mlp(2)
    models.put("m", "1", a)
    models.put("m", "2", b, tokenizer="tok", digest=weights_digest(b))
    assert models.get("m", "1") == (a, None)  # now the most recently used
    models.put("n", "1", c)
    assert models.get("m", "2") is None and models.get("m", "1")[0] is a and models.get("n", "1")[0] is c
    assert models.digest("m", "2") is None and models.digest("m", "1") == weights_digest(a)
    models.forget("m")
    assert models.get("m", "1") is None and len(models) == 1
    off = LoadedModels(0)
    off.put("m", "1", a)
    assert off.get("m", "1") is None


def test_an_object_changed_in_place_is_dropped_instead_of_handed_out(caplog):
    models = LoadedModels(4)
    model = tiny_mlp(0)
    models.put("m", "3", model)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a bug in some method: the caller's model changed
    assert models.get("m", "3") is None
    assert "changed in place" in caplog.text and len(models) == 0


def test_the_next_job_starts_from_the_version_the_last_one_registered(lethe_engine, digits_model, monkeypatch):
    engine = lethe_engine
    loads: list[tuple[str, str]] = []
    original_load = ClassifierSupport.load

    def counting_load(self, ctx, model_name, version):
        if threading.current_thread().name.startswith("lethe-worker-"):  # the job workers, not the prefetcher
            loads.append((model_name, version))
        return original_load(self, ctx, model_name, version)

    monkeypatch.setattr(ClassifierSupport, "load", counting_load)
    first, second = fresh_subjects(2)
    (job,) = wait_for_jobs(engine, engine.submit_erasure(ErasureRequest("held-1", subject_ids=(first,))).job_ids)
    assert job.state is JobState.SUCCEEDED, job.message
    held = engine.context.models.get(digits_model, job.result_version)
    assert held is not None and weights_digest(held[0]) == job.evidence["weights"]["after"]

    loads.clear()
    (next_job,) = wait_for_jobs(engine, engine.submit_erasure(ErasureRequest("held-2", subject_ids=(second,))).job_ids)
    assert next_job.state is JobState.SUCCEEDED, next_job.message
    assert next_job.base_version == job.result_version
    assert (digits_model, job.result_version) not in loads  # taken from memory, not from MLflow
    assert next_job.evidence["weights"]["before"] == job.evidence["weights"]["after"]  # its kept digest
    assert engine.context.models.get(digits_model, job.base_version) is None  # superseded: not kept either
