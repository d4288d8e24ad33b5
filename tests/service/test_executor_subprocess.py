"""The ``subprocess`` executor end to end: each job runs in a fresh ``lethe worker --once --job-id ID
--attempt N`` process (the Kubernetes Job contract), which takes over the executor's lease, runs the job,
and exits 0; the request is certified exactly once. Also ``lethe worker --once`` on its own: exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service import store as db
from service.domain import ErasureRequest, JobState
from service.worker import EXIT_OK, EXIT_USAGE
from tests.service.conftest import fresh_subjects, make_engine, wait_for_jobs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_each_job_runs_in_a_fresh_worker_process(tmp_path):
    engine, model = make_engine(tmp_path / "state", executor="subprocess", coalescing_window_s=0.2)
    try:
        outcome = engine.submit_erasure(ErasureRequest(request_id="sub-1", subject_ids=fresh_subjects(2),
                                                       model_names=(model,)))
        (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=600)
        assert job.state is JobState.SUCCEEDED, job.message
        messages = [event.message for event in engine.events(job_ids=outcome.job_ids)]
        assert any("took over attempt 1" in message for message in messages), messages
        assert len(engine.get_certificate("sub-1")) == 1
        logs = list((tmp_path / "state" / "worker-logs").glob(f"{job.job_id}-a1.log"))
        assert logs, "the worker process wrote its own log"
        with engine.store.read() as conn:
            assert db.get_job(conn, job.job_id).lease_owner.count("/") == 1  # a worker's lease, not dispatch:
    finally:
        engine.stop(10)
        engine.store.dispose()


def test_worker_once_exit_codes_for_unknown_jobs_and_usage(tmp_path):
    env_state = tmp_path / "state"
    command = [sys.executable, "-m", "service.cli", "worker"]
    env = {"LETHE_STATE_DIR": str(env_state), "LETHE_METRICS_PORT": "0", "PATH": "/usr/bin:/bin"}
    usage = subprocess.run([*command, "--once"], env=env, cwd=ROOT, capture_output=True, timeout=600)
    assert usage.returncode == EXIT_USAGE
    unknown = subprocess.run([*command, "--once", "--job-id", "job-nope"], env=env, cwd=ROOT, capture_output=True,
                             timeout=600)
    assert unknown.returncode == EXIT_USAGE, unknown.stderr.decode()[-2000:]
    helped = subprocess.run([*command, "--help"], env=env, cwd=ROOT, capture_output=True, timeout=600)
    assert helped.returncode == EXIT_OK and b"--job-id" in helped.stdout
