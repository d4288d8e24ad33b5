"""Shared fixtures for service tests: one trained, registered digits model and a started engine per session.

Training, MLflow's database creation and the first importance pass are the expensive parts, so they happen
once; tests touch disjoint subjects (:func:`fresh_subjects`) so that their jobs do not interfere. Tests that
need a process-level event of their own (restart recovery) build a separate state directory with
:func:`make_engine`.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from lethe_demo.data import build_digits_demo
from service.domain import ErasureRequest, FieldViolation, JobView
from service.engine import Engine
from service.settings import Settings
from tests.service.scaleout_fixtures import mlflow_server, postgres_server, postgres_url, store_url  # noqa: F401

_SUBJECTS = itertools.count(0)


TEST_SUBJECT_KEY = "3c" * 32
"""The subject-hash key of every test state directory that does not set its own. The tune/audit split of
never-trained records derives from it, so the gate's membership tests on small subjects read the same numbers
on every run; with a fresh key per run, one 5-record subject's test read p 0.01-0.3 and CI failed on a draw."""


def make_settings(state_dir: Path, **overrides) -> Settings:
    """Embedded settings in ``state_dir`` with a short coalescing window and no metrics port. Datasets may
    be registered from anywhere under the state directory's parent (pytest's temporary directories).

    Unless ``subject_hash_key`` is passed, the state directory's key file is written with
    :data:`TEST_SUBJECT_KEY` (where a deployment's first start writes a random one), so processes started
    later on the directory read the same key."""
    if "subject_hash_key" not in overrides:
        key_file = Path(state_dir) / "keys" / "subject-hash.key"
        if not key_file.exists():
            key_file.parent.mkdir(parents=True, exist_ok=True)
            key_file.write_text(TEST_SUBJECT_KEY)
            key_file.chmod(0o600)
    overrides.setdefault("dataset_roots", [str(Path(state_dir).absolute().parent)])
    return Settings(state_dir=state_dir, coalescing_window_s=overrides.pop("coalescing_window_s", 0.3),
                    metrics_port=0, grpc_port=0, device="cpu", **overrides)


def make_engine(state_dir: Path, start: bool = True, **overrides) -> tuple[Engine, str]:
    """A new engine with the digits demo model registered in ``state_dir``; returns (engine, model name)."""
    settings = make_settings(state_dir, **overrides)
    engine = Engine(settings)
    model_name = build_digits_demo(settings, engine)
    if start:
        engine.start()
    return engine, model_name


def wait_for_jobs(engine: Engine, job_ids, timeout_s: float = 120.0) -> list[JobView]:
    """Block (on the engine's event condition) until every job is terminal."""
    deadline = time.monotonic() + timeout_s
    seq = 0
    while True:
        views = [engine.get_job(job_id) for job_id in job_ids]
        if all(view.state.terminal for view in views):
            return views
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs not finished: {[(v.job_id, v.state, v.stage) for v in views]}")
        events = engine.events(after_seq=seq, job_ids=tuple(job_ids), wait_s=1.0)
        if events:
            seq = events[-1].seq


# The domain request mirrors the Erasure message field for field (service.api.converters.erasure_from_proto).
ERASURE_FIELDS = frozenset(field.name for field in dataclasses.fields(ErasureRequest))


def assert_erasure_paths(violations: Iterable[FieldViolation]) -> None:
    """Every path is relative to the Erasure message: its first segment is one of the message's fields
    (never ``erasure.``), the one scheme of :class:`service.domain.FieldViolation`."""
    for violation in violations:
        head = violation.field.split(".")[0].split("[")[0]
        assert head in ERASURE_FIELDS, f"{violation.field!r} is not a path in the Erasure message"


def fresh_subjects(count: int) -> tuple[str, ...]:
    """Digits subjects no other test of this session has used (the dataset has about 300)."""
    return tuple(f"subject-{next(_SUBJECTS) * 3 + 7:04d}" for _ in range(count))


@pytest.fixture(scope="session")
def lethe_state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lethe-state")


@pytest.fixture(scope="session")
def lethe_engine(lethe_state) -> Iterator[Engine]:
    """A started engine on a state directory holding the registered digits model (session-wide)."""
    engine, _ = make_engine(lethe_state)
    yield engine
    engine.stop(30)
    engine.store.dispose()


@pytest.fixture(scope="session")
def digits_model(lethe_engine) -> str:
    return "digits-cnn"
