"""Fixtures for the scale-out tests: a real PostgreSQL (the ``pgserver`` wheel, started by the suite itself),
a fresh database per test, the job store parametrized over SQLite and PostgreSQL, and a real ``mlflow
server`` on a free port.

PostgreSQL tests carry the ``postgres`` marker. When pgserver cannot start here (no wheel for the platform,
no shared memory), they are skipped with the reason printed, never silently.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

_DATABASES = itertools.count(1)
MLFLOW_START_TIMEOUT_S = 300  # importing MLflow's server app takes minutes on 2 loaded cores


class PostgresServer:
    """A pgserver instance: ``url(database)`` is a SQLAlchemy URL over its Unix socket."""

    def __init__(self, server, directory: Path):
        self.server, self.directory = server, directory

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres:@/{database}?host={self.directory}"

    def create_database(self, prefix: str = "lethe") -> str:
        name = f"{prefix}_{os.getpid()}_{next(_DATABASES)}"
        self.server.psql(f"CREATE DATABASE {name};")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    # A short directory: the Unix socket path must stay under the kernel's 107 characters.
    directory = Path(tempfile.mkdtemp(prefix="lethe-pg-", dir="/tmp"))
    try:
        import pgserver

        server = pgserver.get_server(directory, cleanup_mode="stop")
    except Exception as error:  # no wheel for this platform, no shared memory, ...
        reason = f"PostgreSQL (pgserver) could not start here: {type(error).__name__}: {error}"
        print(f"\nSKIPPING PostgreSQL tests: {reason}", file=sys.stderr)
        shutil.rmtree(directory, ignore_errors=True)
        pytest.skip(reason)
    yield PostgresServer(server, directory)
    try:
        server.cleanup()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path) -> str:
    """The same test on an embedded SQLite store and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lethe.db'}"
    return request.getfixturevalue("postgres_server").create_database()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    def __init__(self, process: subprocess.Popen, url: str, artifacts: Path, log_path: Path):
        self.process, self.url, self.artifacts, self.log_path = process, url, artifacts, log_path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """``mlflow server`` with a SQLite backend and proxied artifacts (``--serve-artifacts``) in a local
    directory: clients write, read and delete artifacts through it over HTTP."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log_path = root / "server.log"
    artifacts = root / "artifacts"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # MLflow's job runner: not used
    with open(log_path, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--serve-artifacts", "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"], stdout=output, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + MLFLOW_START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                raise AssertionError(f"mlflow server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow server not up after {MLFLOW_START_TIMEOUT_S} s:\n"
                                     f"{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield MlflowServer(process, url, artifacts, log_path)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
