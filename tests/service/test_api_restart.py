"""Crash safety through the API: ``lethe serve`` as a separate process, killed with SIGKILL while a job is
registering its model version and another acknowledged job is queued, then restarted on the same state
directory. Every acknowledged request must complete exactly once: one new MLflow version per job, one
certificate per request, nothing pending, an intact audit chain."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import mlflow
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.client import Client, run_session
from service.api.pb import service_pb2, types_pb2
from service.audit import verify_audit
from tests.service.conftest import fresh_subjects, make_engine

START_TIMEOUT_S = 90
KILL_AT_STAGE = "register"  # the MLflow version may or may not exist yet: the exactly-once window


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--grace-s", "2"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])


def _wait_serving(client: Client, server: subprocess.Popen, log_path: Path) -> None:
    health = health_pb2_grpc.HealthStub(client.channel)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            time.sleep(0.2)
    raise AssertionError(f"server not serving after {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


@pytest.mark.slow
@pytest.mark.long  # over a minute: make test-all (the crash matrix covers kill -9 in make test)
def test_sigkill_mid_job_then_restart_completes_every_acknowledged_request_exactly_once(tmp_path):
    state = tmp_path / "state"
    engine, model_name = make_engine(state, start=False)  # trained + registered, then closed
    engine.store.dispose()
    port = _free_port()
    env = {**os.environ, "LETHE_STATE_DIR": str(state), "LETHE_GRPC_HOST": "127.0.0.1", "LETHE_GRPC_PORT": str(port),
           "LETHE_METRICS_PORT": "0", "LETHE_COALESCING_WINDOW_S": "0.3", "LETHE_DEVICE": "cpu"}
    log_path = tmp_path / "server.log"
    subjects = fresh_subjects(4)
    first_batch = [types_pb2.Erasure(request_id=f"restart-{i}", subject_ids=[subjects[i]], model_names=[model_name])
                   for i in range(3)]
    late = types_pb2.Erasure(request_id="restart-late", subject_ids=[subjects[3]], model_names=[model_name])

    server = _start_server(env, log_path)
    client = Client(f"127.0.0.1:{port}")
    try:
        _wait_serving(client, server, log_path)
        outgoing: queue.Queue = queue.Queue()
        for erasure in first_batch:
            outgoing.put(service_pb2.SessionRequest(erasure=erasure))

        def requests():
            while (message := outgoing.get()) is not None:
                yield message

        acks: dict[str, types_pb2.SubmissionAccepted] = {}
        last_seq: dict[str, int] = {}
        call = client.stub.Session(requests(), timeout=120)
        killed = False
        for response in call:
            kind = response.WhichOneof("message")
            if kind == "accepted":
                acks[response.accepted.request_id] = response.accepted
            elif kind == "event":
                event = response.event
                for request_id in event.request_ids:
                    last_seq[request_id] = event.seq
                started = event.kind == types_pb2.EVENT_KIND_PROGRESS and event.stage == "resolve"
                if started and "restart-late" not in acks:
                    # The first job has started (its window closed): this one gets a job of its own, queued.
                    outgoing.put(service_pb2.SessionRequest(erasure=late))
                if event.stage == KILL_AT_STAGE and "restart-late" in acks:
                    server.send_signal(signal.SIGKILL)
                    server.wait(10)
                    killed = True
                    break
        call.cancel()
        outgoing.put(None)
        assert killed, "the job ended before it could be killed"
        assert set(acks) == {e.request_id for e in first_batch} | {"restart-late"}
        assert len({a.job_ids[0] for a in acks.values()}) == 2  # the batch coalesced; the late one queued alone

        server = _start_server(env, log_path)
        _wait_serving(client, server, log_path)
        result = run_session(client, [], resume=[(rid, last_seq.get(rid, ack.first_event_seq - 1))
                                                 for rid, ack in acks.items()], timeout_s=240)
        for request_id, progress in result.requests.items():
            assert progress.states == [types_pb2.JOB_STATE_SUCCEEDED], (request_id, progress.states)
            assert len(progress.certificates) == 1
        pending = client.stub.ListPendingRequests(service_pb2.ListPendingRequestsRequest())
        assert not pending.pending_requests
        certificates = {rid: client.stub.GetCertificate(service_pb2.GetCertificateRequest(request_id=rid)).certificates
                        for rid in acks}
    finally:
        client.close()
        _stop(server)

    # Exactly once: the registered version plus one version per job, each job id on exactly one version.
    uri = f"sqlite:///{state / 'mlflow.db'}"  # registry URI explicit: never the process-global one
    versions = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(f"name='{model_name}'")
    job_tags = sorted(v.tags.get("lethe.job_id") for v in versions if v.tags.get("lethe.job_id"))
    job_ids = sorted({ack.job_ids[0] for ack in acks.values()})
    assert job_tags == job_ids, f"versions per job: {job_tags}"
    assert len(versions) == 1 + len(job_ids)
    for request_id, (certificate,) in certificates.items():
        assert request_id in certificate.body_json
    report = verify_audit(state)
    assert report.valid, report.errors
