"""Restart recovery at engine level: a job interrupted after MLflow registration is resumed by the next
engine on the same state directory, completes exactly once, and no acknowledged request is lost. Also:
event waits block on a condition and wake on new events."""

from __future__ import annotations

import threading
import time

import pytest

from service.domain import ErasureRequest, JobState
from service.engine import Engine
from tests.service.conftest import make_engine, make_settings, wait_for_jobs


class SimulatedCrash(BaseException):
    """Escapes the worker's ``except Exception`` like a kill would: the job stays RUNNING."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_crash_after_registration_resumes_exactly_once(tmp_path):
    engine, model = make_engine(tmp_path, coalescing_window_s=0.0)
    crashed = threading.Event()
    original = engine.registry.set_serving

    def crash_once(name, version, alias=None):  # MLflow already holds the job's version; the store does not know yet
        crashed.set()
        raise SimulatedCrash

    engine.registry.set_serving = crash_once
    outcome = engine.submit_erasure(ErasureRequest(request_id="crash-1", subject_ids=("subject-0001",)))
    queued = engine.submit_erasure(ErasureRequest(request_id="crash-2", subject_ids=("subject-0002",)))
    assert crashed.wait(120)
    time.sleep(0.2)
    assert engine.get_job(outcome.job_ids[0]).state is JobState.RUNNING
    engine.registry.set_serving = original
    engine.stop(1)
    engine.store.dispose()

    restarted = Engine(make_settings(tmp_path, coalescing_window_s=0.0))
    restarted.start()
    try:
        first, second = wait_for_jobs(restarted, outcome.job_ids + queued.job_ids)
        assert first.state is JobState.SUCCEEDED and second.state is JobState.SUCCEEDED, (first.message, second.message)
        versions = restarted.registry.client.search_model_versions(f"name='{model}'")
        tagged = [v for v in versions if v.tags.get("lethe.job_id") == first.job_id]
        assert len(tagged) == 1, "the interrupted job registered exactly one version"
        assert first.result_version == str(tagged[0].version)
        assert second.base_version == first.result_version, "the next job starts from the version before it"
        assert restarted.registry.serving_version(model) == second.result_version
        assert len(restarted.get_certificate("crash-1")) == 1 and len(restarted.get_certificate("crash-2")) == 1
        assert restarted.pending_requests() == []
    finally:
        restarted.stop(10)
        restarted.store.dispose()


def test_events_wait_on_a_condition(lethe_engine):
    engine = lethe_engine
    started = time.monotonic()
    assert engine.events(after_seq=10**9, wait_s=0.3) == []
    assert 0.25 <= time.monotonic() - started < 2.0
    timer = threading.Timer(0.3, lambda: engine.submit_erasure(
        ErasureRequest(request_id="wake-1", subject_ids=("nobody-at-all",))))
    timer.start()
    started = time.monotonic()
    woken = engine.events(after_seq=_last_seq(engine), request_ids=("wake-1",), wait_s=10)
    timer.join()
    assert woken and time.monotonic() - started < 5
    assert woken[0].request_ids == ("wake-1",)


def _last_seq(engine) -> int:
    from service import store as db

    with engine.store.read() as conn:
        return db.last_event_seq(conn)
