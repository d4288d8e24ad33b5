"""Scale-out with real processes: two ``lethe serve`` API replicas (executor ``external``) and ``lethe worker``
processes on ONE PostgreSQL job store and ONE ``mlflow server`` (artifacts proxied through it), each process
with its own state directory (workers reach datasets and models through MLflow only).

- Workers are killed with SIGKILL at three different points of one job (``LETHE_FAULT_KILL_AT``: the start
  of apply, right after MLflow registered the version, the start of the audit stage); each time the lease
  expires and another worker takes the job over; every request is still certified exactly once, no job
  registers two model versions, the audit chain verifies, and purged dataset copies are gone from the
  MLflow server's artifact store.
- An API replica is killed with SIGKILL mid-stream; the client's channel fails over to the other replica
  and the session resumes by seq: every request settles, certified once.
- ``soak`` (``make soak``): 200 erasures over both replicas, the same checks.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import mlflow
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import store as db
from service.api.client import Client, run_session
from service.api.pb import types_pb2
from service.audit import verify_audit
from service.engine import Engine
from service.settings import Settings
from tests.service.scaleout_fixtures import free_port

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.long]  # API replicas and workers as processes
ROOT = Path(__file__).resolve().parents[2]
KEY_HEX = "5a" * 32
SUBJECT_KEY_HEX = "c3" * 32
START_TIMEOUT_S = 300  # a process imports torch and MLflow: slow on 2 loaded cores
KILL_POINTS = ("stage:apply", "registered", "stage:audit")
WAVE_GAP_S = 2.5  # between the killed-workers test's waves of erasures: more than the coalescing window (1 s)


class Cluster:
    """The processes of one scale-out deployment, with their logs under ``root``."""

    def __init__(self, root: Path, store_url: str, mlflow_url: str, model: str):
        self.root, self.store_url, self.mlflow_url, self.model = root, store_url, mlflow_url, model
        self.processes: dict[str, subprocess.Popen] = {}
        self.api_ports: dict[str, int] = {}

    def env(self, name: str, **extra: str) -> dict[str, str]:
        state = self.root / name
        state.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "LETHE_STATE_DIR": str(state), "LETHE_JOB_STORE_URL": self.store_url,
                "LETHE_MLFLOW_TRACKING_URI": self.mlflow_url, "LETHE_AUDIT_KEY": KEY_HEX,
                "LETHE_SUBJECT_HASH_KEY": SUBJECT_KEY_HEX, "LETHE_METRICS_PORT": "0", "LETHE_DEVICE": "cpu",
                "LETHE_COALESCING_WINDOW_S": "1.0", "LETHE_JOB_LEASE_S": "10", "LETHE_JOB_MAX_ATTEMPTS": "6",
                "LETHE_WORKER_ID": name, "OMP_NUM_THREADS": "1", **extra}

    def start(self, name: str, command: list[str], **extra: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        process = subprocess.Popen([sys.executable, "-m", "service.cli", *command], env=self.env(name, **extra),
                                   stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.processes[name] = process
        return process

    def start_api(self, name: str) -> int:
        port = free_port()
        self.api_ports[name] = port
        self.start(name, ["serve", "--grace-s", "1"], LETHE_GRPC_PORT=str(port), LETHE_EXECUTOR="external")
        return port

    def start_worker(self, name: str, kill_at: str | None = None) -> subprocess.Popen:
        extra = {"LETHE_FAULT_KILL_AT": kill_at} if kill_at else {}
        return self.start(name, ["worker", "--grace-s", "1"], **extra)

    def wait_serving(self, name: str) -> None:
        with Client(f"127.0.0.1:{self.api_ports[name]}") as client:
            health = health_pb2_grpc.HealthStub(client.channel)
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                self.check_alive(name)
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    time.sleep(0.5)
        raise AssertionError(f"{name} not serving after {START_TIMEOUT_S} s:\n{self.log(name)}")

    def check_alive(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is not None:
            raise AssertionError(f"{name} exited with {process.returncode}:\n{self.log(name)}")

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, postgres_server, mlflow_server):
    root = tmp_path_factory.mktemp("scaleout")
    store_url = postgres_server.create_database("scaleout")
    model = f"digits-{uuid.uuid4().hex[:8]}"
    settings = Settings(state_dir=root / "registrar", job_store_url=store_url, mlflow_tracking_uri=mlflow_server.url,
                        audit_key=KEY_HEX, subject_hash_key=SUBJECT_KEY_HEX, metrics_port=0, device="cpu")
    from lethe_demo.data import build_digits_demo

    registrar = Engine(settings)  # registers the model (through MLflow, into the shared store); never started
    build_digits_demo(settings, registrar, model_name=model)
    registrar.store.dispose()
    deployment = Cluster(root, store_url, mlflow_server.url, model)
    deployment.start_api("api-1")
    deployment.start_api("api-2")
    try:
        deployment.wait_serving("api-1")
        deployment.wait_serving("api-2")
        yield deployment
    finally:
        deployment.stop_all()


def erasures(prefix: str, subjects: range, model: str) -> list[types_pb2.Erasure]:
    return [types_pb2.Erasure(request_id=f"{prefix}-{index}", subject_ids=[f"subject-{index:04d}"],
                              model_names=[model]) for index in subjects]


def stream_over_both(cluster: Cluster, batch: list[types_pb2.Erasure], timeout_s: float) -> list:
    """Half the erasures on a Session to each replica, concurrently; returns both SessionResults."""
    halves = [batch[0::2], batch[1::2]]
    results: list = [None, None]
    errors: list[BaseException] = []

    def drive(index: int) -> None:
        try:
            with Client(f"127.0.0.1:{cluster.api_ports[f'api-{index + 1}']}") as client:
                results[index] = run_session(client, halves[index], timeout_s=timeout_s, max_reconnects=30)
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=drive, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def assert_exactly_once(cluster: Cluster, request_ids: list[str], mlflow_url: str) -> None:
    store = db.Store(cluster.store_url, migrate=False)
    try:
        with store.read() as conn:
            per_request = collections.Counter(row.request_id for row in db.all_certificates(conn))
            jobs = db.list_jobs(conn, [], cluster.model, None, 10_000)
            live = db.live_dataset_versions(conn, cluster.model)
    finally:
        store.dispose()
    for request_id in request_ids:
        assert per_request[request_id] == 1, f"{request_id}: {per_request[request_id]} certificates"
    assert all(job.state == "SUCCEEDED" for job in jobs), [(j.job_id, j.state, j.message) for j in jobs]
    client = mlflow.MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    versions = client.search_model_versions(f"name='{cluster.model}'")
    by_job = collections.Counter(v.tags.get("lethe.job_id") for v in versions if v.tags.get("lethe.job_id"))
    assert all(count == 1 for count in by_job.values()), f"a job registered twice: {by_job}"
    assert set(by_job) == {job.job_id for job in jobs if job.result_version}
    report = verify_audit(cluster.store_url, bytes.fromhex(KEY_HEX))
    assert report.valid, report.errors
    assert len(live) == 1, "every older dataset copy of the lineage was purged"


def test_killed_workers_leases_expire_and_every_request_is_certified_once(cluster, mlflow_server):
    doomed = {point: cluster.start_worker(f"doomed-{index}", kill_at=point) for index, point in enumerate(KILL_POINTS)}
    batch = erasures("kill", range(10, 26), cluster.model)
    # One job per kill point at least, whoever claims first: a doomed worker that resumes a job past its point
    # finishes it, so each needs a job of its own to reach. The waves are a coalescing window apart; in one
    # wave, intake takes the requests into one job (fast intake coalesces the whole batch into one).
    waves = [batch[index::len(KILL_POINTS)] for index in range(len(KILL_POINTS))]
    outcome: dict = {"results": []}

    def stream_in_waves() -> None:
        threads = []
        for wave in waves:
            threads.append(threading.Thread(target=lambda wave=wave: outcome["results"].extend(
                stream_over_both(cluster, wave, 1500))))
            threads[-1].start()
            time.sleep(WAVE_GAP_S)
        for thread in threads:
            thread.join()

    streams = threading.Thread(target=stream_in_waves)
    streams.start()
    deadline = time.monotonic() + 1200
    while any(process.poll() is None for process in doomed.values()):  # each dies at its point, one job
        assert time.monotonic() < deadline, {p: cluster.log(f"doomed-{i}") for i, p in enumerate(KILL_POINTS)}
        time.sleep(1)
    assert {point: process.returncode for point, process in doomed.items()} == \
        {point: -signal.SIGKILL for point in KILL_POINTS}, "every doomed worker died by SIGKILL at its point"
    cluster.start_worker("worker-1")
    cluster.start_worker("worker-2")
    streams.join()
    for result in outcome["results"]:
        assert all(entry.settled and entry.rejected is None for entry in result.requests.values())
    assert_exactly_once(cluster, [e.request_id for e in batch], mlflow_server.url)
    store = db.Store(cluster.store_url, migrate=False)
    with store.read() as conn:
        taken_over = [e for e in db.events_after(conn, 0, [], [], limit=100_000) if "lease of" in e.message]
    store.dispose()
    assert len(taken_over) >= len(KILL_POINTS), "each killed worker's job was reclaimed after its lease expired"
    parquet = list(mlflow_server.artifacts.rglob(f"*.parquet"))
    assert parquet, "dataset copies live in the MLflow server's artifact store"


def test_a_killed_api_replica_stream_resumes_on_the_other_by_seq(cluster, mlflow_server):
    for name in ("worker-1", "worker-2"):
        if name not in cluster.processes or cluster.processes[name].poll() is not None:
            cluster.start_worker(name)
    batch = erasures("failover", range(40, 46), cluster.model)
    seen_events = threading.Event()

    def on_response(response, entry):
        if response.WhichOneof("message") == "event" and response.event.kind == 2:  # PROGRESS: mid-job
            seen_events.set()

    # One channel over both replicas (pick_first: api-1 until it fails), as a client behind a Service.
    target = f"ipv4:127.0.0.1:{cluster.api_ports['api-1']},127.0.0.1:{cluster.api_ports['api-2']}"
    outcome: dict = {}

    def drive() -> None:
        with Client(target) as client:
            outcome["result"] = run_session(client, batch, on_response, timeout_s=1200, max_reconnects=30)

    streaming = threading.Thread(target=drive)
    streaming.start()
    assert seen_events.wait(900), cluster.log("api-1")
    cluster.processes["api-1"].send_signal(signal.SIGKILL)
    streaming.join()
    result = outcome["result"]
    assert result.reconnects >= 1, "the stream broke with its replica and was resumed"
    assert all(entry.settled and entry.rejected is None for entry in result.requests.values())
    assert_exactly_once(cluster, [e.request_id for e in batch], mlflow_server.url)


@pytest.mark.soak
@pytest.mark.skipif(not os.environ.get("LETHE_SOAK"), reason="200-erasure soak: run with `make soak` (LETHE_SOAK=1)")
def test_soak_200_erasures_over_both_replicas(cluster, mlflow_server):
    if cluster.processes["api-1"].poll() is not None:
        cluster.start_api("api-1")
        cluster.wait_serving("api-1")
    for name in ("worker-1", "worker-2"):
        if name not in cluster.processes or cluster.processes[name].poll() is not None:
            cluster.start_worker(name)
    batch = erasures("soak", range(60, 260), cluster.model)
    for result in stream_over_both(cluster, batch, 3000):
        assert all(entry.settled and entry.rejected is None for entry in result.requests.values())
    assert_exactly_once(cluster, [e.request_id for e in batch], mlflow_server.url)
