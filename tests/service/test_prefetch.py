"""The worker precomputes a new version's derived state in the background (service.prefetch): I_D and the
unchanged model's scores on its never-trained tune records, which the next job's ``ssd-auto`` reads instead
of a pass over ``tune``."""

from __future__ import annotations

import time

import numpy as np
import torch

from service import store as db
from service.context import ModelInfo
from service.domain import ErasureRequest, JobState
from service.task_support import task_support
from service.version_cache import never_trained_sides, tune_scores
from tests.service.conftest import fresh_subjects, wait_for_jobs
from unlearn.heldout import score
from unlearn.registry import copy_model


def _precomputed(engine, model_name: str, timeout_s: float = 120) -> str:
    """The serving version, once this engine's prefetcher has precomputed it (scheduled here too, in case the
    version was registered by another engine on the shared state)."""
    version = engine.registry.serving_version(model_name)
    engine.prefetcher.schedule(model_name)
    deadline = time.monotonic() + timeout_s
    while (model_name, version) not in engine.prefetcher.completed:
        assert time.monotonic() < deadline, f"version {version} of {model_name} was never precomputed"
        time.sleep(0.2)
    return version


def test_precomputed_tune_scores_are_the_versions_own_and_refused_for_other_weights(lethe_engine, digits_model):
    engine = lethe_engine
    version = _precomputed(engine, digits_model)
    ctx = engine.context
    with engine.store.read() as conn:
        info = ModelInfo.from_row(db.get_model(conn, digits_model))
        dataset = db.dataset_for_model_version(conn, digits_model, version)
    support = task_support(info)
    model = support.load(ctx, digits_model, version)
    data = ctx.catalog.load(dataset.path, dataset.digest)
    tune, audit = never_trained_sides(ctx, data)
    assert tune.any() and audit.any() and not (tune & audit).any()
    job_tune = tune.copy()
    job_tune[np.flatnonzero(tune)[:5]] = False  # a job's own never-trained records leave its tune split
    held = tune_scores(ctx, digits_model, version, model, data, dataset.digest, job_tune)
    assert held is not None and len(held) == int(job_tune.sum())
    expected = score(support.task(), model, data.examples(job_tune), data.record_hashes[job_tune])
    assert np.array_equal(held.keys, expected.keys)
    assert np.allclose(held.losses, expected.losses, atol=1e-6) and np.array_equal(held.correct, expected.correct)
    # Records the version's pool does not hold (audit records): not served, computed by the method instead.
    assert tune_scores(ctx, digits_model, version, model, data, dataset.digest, job_tune | audit) is None
    other = copy_model(model)
    with torch.no_grad():
        next(other.parameters()).mul_(1.01)
    assert tune_scores(ctx, digits_model, version, other, data, dataset.digest, job_tune) is None


def test_the_next_job_reads_the_precomputed_scores(lethe_engine, digits_model):
    engine = lethe_engine
    _precomputed(engine, digits_model)
    (subject,) = fresh_subjects(1)
    outcome = engine.submit_erasure(ErasureRequest(request_id="prefetch-1", subject_ids=(subject,)))
    (job,) = wait_for_jobs(engine, outcome.job_ids)
    assert job.state is JobState.SUCCEEDED, job.message
    first = job.evidence["attempts"][0]
    assert first["method"] == "ssd-auto"
    assert first["details"]["tune_scores"] == "precomputed for the model version", first["details"]


def test_an_idle_worker_waits_instead_of_spinning(lethe_engine):
    """An idle in-process worker once woke itself with its own (empty) claim transaction: ~290 transactions a
    second and a full core while nothing ran. Idle, it claims about once a second (IDLE_WAIT_S)."""
    engine = lethe_engine
    deadline = time.monotonic() + 120
    while True:  # idle: no job queued or running (earlier tests' jobs have ended)
        with engine.store.read() as conn:
            if db.count_jobs(conn, ["QUEUED", "RUNNING"]) == 0:
                break
        assert time.monotonic() < deadline, "jobs still queued or running"
        time.sleep(0.2)
    before, cpu_before = engine.store.generation(), time.process_time()
    time.sleep(2.0)
    writes = engine.store.generation() - before
    assert writes <= 8, f"{writes} write transactions in 2 s of idleness"
    assert time.process_time() - cpu_before < 1.0  # the whole test process, prefetch included


def test_the_prefetcher_survives_an_engine_stop_and_start(lethe_engine, digits_model):
    """Stopping the engine stops its prefetcher; starting it again must start a new one (it once stayed dead,
    and every later version paid its importance in the request)."""
    engine = lethe_engine
    assert engine.stop(60)
    engine.start()
    assert engine.prefetcher._thread.is_alive()
    engine.prefetcher.completed.clear()
    _precomputed(engine, digits_model)
