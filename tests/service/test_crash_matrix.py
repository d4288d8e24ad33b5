"""The crash matrix (issue 15; docs/reliability.md): ``lethe serve`` killed with SIGKILL at every fault point
(:data:`service.faults.POINTS`: the intake points, every stage boundary, inside every stage, and the
registration and audit windows) while it carries a subject erasure, a class erasure or an update, then
restarted on the same state directory.

One deployment (the digits demo model, embedded SQLite job store and MLflow) serves every cell. Its server
runs with ``LETHE_FAULT_KILL_AT=@<arm file>``: a cell writes the point's name into the arm file, submits its
request, sees the server die at that point (the ``.fired`` file names it), and restarts the server on the
same environment, now disarmed; so one process start per cell, and the restarted server serves the next
cell. After every cell, for EVERYTHING the deployment has acknowledged so far:

- every acknowledged request is COMPLETED with exactly one certificate per model, nothing is pending (an
  intake kill before the commit leaves nothing stored and no ack; the client's retry with the same request
  id is then acknowledged once);
- MLflow holds one version per succeeded job (none doubled, none without its job), and no run an attempt
  logged without registering keeps any artifact (an orphan run's dataset copy would escape later purges);
- no dataset version is half written: no ``*.partial`` file, every live recorded version's file present
  with the recorded content digest, every removed one gone;
- the audit chain verifies (:func:`service.audit.verify_chain` through :func:`service.audit.verify_audit`);
- no erased subject id is in clear anywhere under the state directory (Parquet by column values, every other
  file by bytes), in the server's log or on its metrics page.

Cells are marked ``crash``; those over ~20 s each (a restart plus a job on a shared 2-core machine) also
``long``. Five subject cells measured under 20 s (:data:`FAST`) are not ``long``, so ``make test`` runs them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.client import Client
from service.api.pb import service_pb2, types_pb2
from service.faults import JOB_POINTS
from tests.service.conftest import make_engine

pytestmark = [pytest.mark.crash]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420
INTAKE_POINTS = ("intake.before_commit", "intake.after_commit")
# Class erasures: six of the digits' ten classes, one per cell (each erases a class for good on the lineage).
CLASS_POINTS = ("stage:resolve:inside", "stage:apply:inside", "stage:verify:inside", "mlflow.run_logged",
                "registered", "stage:audit:inside")
CLASSES = (9, 8, 7, 6, 5, 4)
UPDATE_LABELS = (0, 1, 2, 3)  # never a class the class cells erase (an update of an erased class is refused)
# Not long (make test, CI's 15-minute budget): one subject cell, the registration window (registered: the
# version the store does not know yet). Every other cell is long:
# `make crash` runs the whole matrix (docs/reliability.md).
FAST = {("subject", "registered")}


def _cells():
    cells = [("subject", point) for point in (*INTAKE_POINTS, *JOB_POINTS)]
    cells += [("update", point) for point in JOB_POINTS]
    cells += [("class", point) for point in CLASS_POINTS]
    for kind, point in cells:
        marks = [] if (kind, point) in FAST else [pytest.mark.long]
        yield pytest.param(kind, point, marks=marks, id=f"{kind}-{point}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Deployment:
    root: Path
    state: Path
    model: str
    env: dict[str, str]
    port: int
    metrics_port: int
    arm: Path
    log_path: Path
    server: subprocess.Popen | None = None
    client: Client | None = None
    acked: dict[str, str] = field(default_factory=dict)  # request id -> kind, every request ever acknowledged
    erased_subjects: list[str] = field(default_factory=list)
    starts: int = 0

    # ------------------------------------------------------------------------------------ the process
    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--grace-s", "1"],
                                       env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        self.starts += 1
        if self.client is None:
            self.client = Client(f"127.0.0.1:{self.port}")
        health = health_pb2_grpc.HealthStub(self.client.channel)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise AssertionError(f"server exited with {self.server.returncode}:\n{self.log_tail()}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
        raise AssertionError(f"server not serving after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def ensure_running(self) -> None:
        if self.server is None or self.server.poll() is not None:
            self.start()

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(10)
        if self.client is not None:
            self.client.close()
            self.client = None

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_killed(self, point: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
        """The server dies at ``point`` (SIGKILL by its own fault point) within ``timeout_s``."""
        try:
            code = self.server.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not die at {point} within {timeout_s} s:\n{self.log_tail()}")
        fired = self.arm.with_name(self.arm.name + ".fired")
        assert code == -signal.SIGKILL, (code, self.log_tail())
        assert fired.read_text() == point, f"killed at {fired.read_text()!r}, armed {point!r}"
        fired.unlink()

    @property
    def stub(self):
        return self.client.stub

    # --------------------------------------------------------------------------------------- waiting
    def wait_completed(self, request_id: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.stub.GetRequest(service_pb2.GetRequestRequest(request_id=request_id), timeout=10).request
            if status.state == types_pb2.REQUEST_STATE_COMPLETED:
                return
            assert status.state == types_pb2.REQUEST_STATE_PENDING, status
            jobs = [self.stub.GetJob(service_pb2.GetJobRequest(job_id=job_id), timeout=10).job for job_id in status.job_ids]
            failed = [job for job in jobs if job.state in (types_pb2.JOB_STATE_FAILED,
                                                           types_pb2.JOB_STATE_REJECTED_BY_VERIFICATION)]
            assert not failed, f"{request_id}: {[(j.job_id, j.state, j.message) for j in failed]}"
            time.sleep(0.5)
        raise AssertionError(f"{request_id} not completed within {timeout_s} s:\n{self.log_tail()}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-matrix")
    state = root / "state"
    engine, model = make_engine(state, start=False)  # the digits model trained and registered, then closed
    settings = engine.settings
    engine.store.dispose()
    port, metrics_port = _free_port(), _free_port()
    arm = root / "arm"
    env = {**os.environ, "LETHE_STATE_DIR": str(state), "LETHE_GRPC_HOST": "127.0.0.1", "LETHE_GRPC_PORT": str(port),
           "LETHE_METRICS_HOST": "127.0.0.1", "LETHE_METRICS_PORT": str(metrics_port),
           "LETHE_COALESCING_WINDOW_S": "0.3", "LETHE_DEVICE": "cpu", "LETHE_FAULT_KILL_AT": f"@{arm}",
           "LETHE_DATASET_ROOTS": f'["{settings.dataset_roots[0]}"]', "OMP_NUM_THREADS": "1"}
    env.pop("LETHE_SOAK", None)
    dep = Deployment(root, state, model, env, port, metrics_port, arm, root / "server.log")
    dep.start()
    try:
        yield dep
    finally:
        dep.stop()


# ------------------------------------------------------------------------------------------- requests
def _subjects():
    """Digits subjects no other cell uses, far from the ones conftest's fresh_subjects hands out."""
    from lethe_demo.data import digits_frame

    subjects = sorted(digits_frame()["subject_id"].unique())
    return iter(subjects[150:])


_SUBJECTS = None


def _next_subject() -> str:
    global _SUBJECTS
    if _SUBJECTS is None:
        _SUBJECTS = _subjects()
    return next(_SUBJECTS)


def _update_records(tag: str, count: int = 40) -> list[types_pb2.Record]:
    """``count`` train digits of the update labels shifted one pixel right, as new records with new ids."""
    from lethe_demo.data import digits_frame

    frame = digits_frame()
    rows = frame[(frame["split"] == "train") & frame["label"].isin(UPDATE_LABELS)]
    offset = (sum(map(ord, tag)) * 7) % max(1, len(rows) - count)
    rows = rows.iloc[offset:offset + count]
    records = []
    for index, (features, digit) in enumerate(zip(rows["features"], rows["label"])):
        image = np.roll(np.asarray(features, dtype=np.float32).reshape(8, 8), 1, axis=1)
        image[:, 0] = 0.0
        columns = struct_pb2.Struct()
        columns.update({"features": image.ravel().tolist(), "label": int(digit)})
        records.append(types_pb2.Record(record_id=f"{tag}-{index:04d}", subject_id=f"{tag}-subject-{index // 5:03d}",
                                        columns=columns))
    return records


def _submit(dep: Deployment, kind: str, request_id: str, payload) -> types_pb2.SubmissionAccepted:
    if kind == "update":
        return dep.stub.SubmitUpdate(service_pb2.SubmitUpdateRequest(update=payload), timeout=120).accepted
    return dep.stub.SubmitErasure(service_pb2.SubmitErasureRequest(erasure=payload), timeout=120).accepted


_CLASS_INDEX = iter(range(len(CLASSES)))


def _request(dep: Deployment, kind: str, request_id: str):
    if kind == "subject":
        subject = _next_subject()
        dep.erased_subjects.append(subject)
        return types_pb2.Erasure(request_id=request_id, subject_ids=[subject], model_names=[dep.model])
    if kind == "class":
        return types_pb2.Erasure(request_id=request_id, classes=[CLASSES[next(_CLASS_INDEX)]], model_names=[dep.model])
    return types_pb2.Update(request_id=request_id, model_name=dep.model, records=_update_records(request_id))


# ----------------------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("kind, point", list(_cells()))
def test_kill_9_at_a_fault_point_then_restart_keeps_every_invariant(deployment, kind, point):
    dep = deployment
    dep.ensure_running()
    request_id = f"crash-{kind}-{point.replace(':', '-').replace('.', '-')}"
    payload = _request(dep, kind, request_id)
    dep.arm.write_text(point)
    try:
        if point in INTAKE_POINTS:
            with pytest.raises(grpc.RpcError) as lost:  # the process dies before any ack leaves it
                _submit(dep, kind, request_id, payload)
            assert lost.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                                         grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED), lost.value
            dep.wait_killed(point, 30)
            dep.start()
            stored = _stored(dep, request_id)
            assert stored == (point == "intake.after_commit"), f"stored after a kill at {point}: {stored}"
            accepted = _submit(dep, kind, request_id, payload)  # the client's retry, same request id
            assert accepted.created == (point == "intake.before_commit")  # after the commit: a replay
        else:
            accepted = _submit(dep, kind, request_id, payload)
            assert accepted.created and accepted.request_id == request_id
            dep.acked[request_id] = kind
            dep.wait_killed(point)
            dep.start()
    finally:
        dep.arm.unlink(missing_ok=True)
    dep.acked[request_id] = kind
    dep.wait_completed(request_id)
    check_invariants(dep)
    # A client whose ack was lost retries with the same request id and payload, possibly after the job ended:
    # it must get the same request back (same job), and nothing new may be created.
    replay = _submit(dep, kind, request_id, payload)
    assert not replay.created and list(replay.job_ids) == list(accepted.job_ids)
    check_invariants(dep)


def _stored(dep: Deployment, request_id: str) -> bool:
    try:
        dep.stub.GetRequest(service_pb2.GetRequestRequest(request_id=request_id), timeout=10)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND, error
        return False
    return True


# ------------------------------------------------------------------------------------------ invariants
def check_invariants(dep: Deployment) -> None:
    from service import store as db
    from service.audit import verify_audit

    store = db.Store(f"sqlite:///{dep.state / 'lethe.db'}", migrate=False)
    try:
        with store.read() as conn:
            _check_certified_once(dep, conn, db)
            jobs = conn.execute(db.jobs.select()).all()
            datasets = conn.execute(db.dataset_versions.select()).all()
    finally:
        store.dispose()
    _check_versions(dep, jobs)
    _check_datasets(dep, datasets)
    report = verify_audit(dep.state)
    assert report.valid, report.errors
    _check_privacy(dep)


def _check_certified_once(dep: Deployment, conn, db) -> None:
    import sqlalchemy as sa

    assert not db.pending_requests(conn), "acknowledged requests still pending"
    for request_id in dep.acked:
        row = db.get_request(conn, request_id)
        assert row is not None and row.state == "COMPLETED", (request_id, row and row.state)
        models = [c.model_name for c in db.certificates_for(conn, request_id)]
        assert len(models) == len(set(models)) == 1, f"{request_id}: certificates {models}"
    counts = conn.execute(sa.select(db.certificates.c.request_id, sa.func.count())
                          .group_by(db.certificates.c.request_id, db.certificates.c.model_name)).all()
    assert all(count == 1 for _, count in counts)


def _check_versions(dep: Deployment, jobs) -> None:
    """One MLflow version per succeeded job, none doubled or orphaned; no unregistered run keeps artifacts."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    uri = f"sqlite:///{dep.state / 'mlflow.db'}"
    # The registry URI too: without it MLflow takes the process-global one, which a shared engine of an earlier
    # test on this pytest worker may have set to its own store (this test then read another deployment's versions).
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{dep.model}'")
    by_job: dict[str, list[str]] = {}
    for version in versions:
        by_job.setdefault(version.tags.get("lethe.job_id", ""), []).append(str(version.version))
    assert len(by_job.pop("", [])) == 1, "the registered version is the only one without a job"
    succeeded = {job.job_id: job.result_version for job in jobs if job.state == "SUCCEEDED" and job.result_version}
    assert {job_id: vs for job_id, vs in by_job.items() if len(vs) != 1} == {}, "a job registered twice"
    assert {job_id: vs[0] for job_id, vs in by_job.items()} == succeeded, "versions and succeeded jobs differ"
    registered_runs = {version.run_id for version in versions}
    experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    for run in client.search_runs(experiment_ids, "", run_view_type=ViewType.ALL, max_results=5000):
        job_id = run.data.tags.get("lethe.job_id")
        if not job_id or run.info.run_id in registered_runs:
            continue
        leftover = client.list_artifacts(run.info.run_id)
        assert not leftover, f"job {job_id}: run {run.info.run_id} registered no version but keeps {leftover}"
        assert run.info.lifecycle_stage == "deleted", f"job {job_id}: orphan run {run.info.run_id} still active"


def _check_datasets(dep: Deployment, rows) -> None:
    from service.datasets import content_digest

    partial = [str(p) for p in dep.state.rglob("*.partial")]
    assert not partial, f"half-written dataset versions: {partial}"
    for row in rows:
        path = Path(row.path) if Path(row.path).is_absolute() else dep.state / row.path
        if row.removed_at is not None:
            assert not path.exists(), f"dataset version {row.version} removed but still on disk: {path}"
            continue
        assert path.exists(), f"dataset version {row.version} recorded but missing: {path}"
        assert content_digest(pq.read_table(path).to_pandas()) == row.digest, f"dataset version {row.version}"


def _check_privacy(dep: Deployment) -> None:
    """No erased subject id in clear: under the state directory, in the server's log, on the metrics page."""
    wanted = [s.encode() for s in dep.erased_subjects]
    if not wanted:
        return
    hits = []
    for path in [*sorted(p for p in dep.state.rglob("*") if p.is_file()), dep.log_path]:
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            values = {str(v) for name in table.column_names if str(table.schema.field(name).type) == "string"
                      for v in table.column(name).to_pylist()}
            hits += [(str(path), s) for s in dep.erased_subjects if s in values]
            continue
        try:
            content = path.read_bytes()
        except FileNotFoundError:  # a WAL or a cache file the server removed meanwhile
            continue
        hits += [(str(path), s.decode()) for s in wanted if s in content]
    page = urllib.request.urlopen(f"http://127.0.0.1:{dep.metrics_port}/metrics", timeout=10).read()
    assert b"lethe_" in page, "the metrics page was not read"
    hits += [("metrics", s.decode()) for s in wanted if s in page]
    assert not hits, f"erased subject ids in clear: {hits}"
