"""The job store under several processes, on SQLite and on PostgreSQL (the same tests, ``store_url``).

Migrations; claims that are exclusive and one per model lineage; leases that expire, are reclaimed with an
attempts counter and end in FAILED; fencing of a holder that lost its lease; the hand-over from an
executor's lease to its worker; an audit chain and an event sequence that stay linear with concurrent
appenders in separate processes; coalescing decisions that are race-free across replicas.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from service import migrations
from service import store as db
from service.audit import AuditLog, verify_chain
from service.context import ModelInfo, PipelineContext
from service.domain import ErasureRequest, JobState, TaskType, VerificationPolicy
from service.intake import Intake
from service.scheduler import DISPATCH_PREFIX, Heartbeat, LeaseLost, Scheduler
from service.settings import Settings
from tests.service import store_processes

KEY = bytes(range(32))


def make_context(url: str, tmp_path, **overrides) -> PipelineContext:
    settings = Settings(state_dir=tmp_path / "state", job_store_url=url, metrics_port=0, grpc_port=0,
                        audit_key=KEY.hex(), subject_hash_key=KEY.hex(), **overrides)
    return PipelineContext(settings, db.Store(url), None, None, AuditLog(KEY), None, None)


def add_model(ctx: PipelineContext, name: str) -> None:
    with ctx.store.write() as conn:
        db.upsert_model(conn, name, "1", "classification", 10, {"default_method": "ssd"}, {})


def add_job(ctx: PipelineContext, job_id: str, model: str, request_id: str | None = None) -> None:
    now = db.utcnow()
    with ctx.store.write() as conn:
        db.insert_job(conn, job_id=job_id, model_name=model, coalesce_key="k", selector="records",
                      state=JobState.QUEUED.value, stage="queued", progress=0.0, method="ssd", method_params={},
                      policy_overrides={}, base_version="1", records=1, message="", evidence={}, attempts=0,
                      window_closes_at=now - timedelta(seconds=1))
        if request_id:
            db.insert_request(conn, request_id=request_id, payload_digest="d", kind="erase", subject_hashes=[],
                              record_hashes=[], classes=[], model_names=[model], method=None, method_params={},
                              policy_overrides={}, deadline=None, received_at=now, state="PENDING",
                              first_event_seq=0, outcome_job_ids=[job_id])
            db.link_request(conn, job_id, request_id)


def finish(ctx: PipelineContext, scheduler: Scheduler, claim) -> None:
    with scheduler.fenced(claim).store.write() as conn:
        db.update_job(conn, claim.job_id, state=JobState.SUCCEEDED.value)


# ---------------------------------------------------------------------------------------------- migrations
def test_migrations_build_the_schema_of_the_code(store_url, tmp_path):
    store = db.Store(store_url)
    try:
        with store.read() as conn:
            assert migrations.current_revision(conn) == migrations.head_revision()
            differences = compare_metadata(MigrationContext.configure(conn), db.metadata)
        assert differences == [], differences
    finally:
        store.dispose()


def test_a_store_from_before_migrations_is_stamped_and_upgraded(store_url):
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:  # the pre-migration schema, as metadata.create_all left it
        config = migrations.alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, migrations.INITIAL_REVISION)
        conn.execute(sa.text("DROP TABLE alembic_version"))
    engine.dispose()
    store = db.Store(store_url)
    try:
        with store.read() as conn:
            assert migrations.current_revision(conn) == migrations.head_revision()
            assert "lease_owner" in {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    finally:
        store.dispose()


def test_processes_starting_at_once_migrate_once(store_url):
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        revisions = pool.map(store_processes.open_store, [store_url] * 3)
    assert revisions == [migrations.head_revision()] * 3


# ---------------------------------------------------------------------------------------------- claims
def test_claims_are_exclusive_and_one_job_per_lineage_runs_at_a_time(store_url, tmp_path):
    ctx = make_context(store_url, tmp_path)
    for model in ("m-a", "m-b"):
        add_model(ctx, model)
        for index in range(4):
            add_job(ctx, f"job-{model}-{index}", model)
    claimed: list[str] = []
    running: set[str] = set()
    overlap: list[str] = []
    guard = threading.Lock()

    def worker(number: int) -> None:
        scheduler = Scheduler(ctx, f"worker-{number}")
        idle_until = time.monotonic() + 3.0
        while time.monotonic() < idle_until:
            claim = scheduler.claim()
            if claim is None:
                time.sleep(0.02)
                continue
            with guard:
                if claim.model_name in running:
                    overlap.append(claim.model_name)
                running.add(claim.model_name)
                claimed.append(claim.job_id)
            time.sleep(0.05)
            with guard:
                running.discard(claim.model_name)
            finish(ctx, scheduler, claim)
            idle_until = time.monotonic() + 3.0

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(f"job-{m}-{i}" for m in ("m-a", "m-b") for i in range(4))
    assert overlap == [], "two jobs of one lineage ran at once"
    ctx.store.dispose()


def test_the_database_refuses_a_second_running_job_of_one_model(store_url, tmp_path):
    ctx = make_context(store_url, tmp_path)
    add_model(ctx, "m")
    add_job(ctx, "job-1", "m")
    add_job(ctx, "job-2", "m")
    with ctx.store.write() as conn:
        db.update_job(conn, "job-1", state=JobState.RUNNING.value)
    with pytest.raises(sa.exc.IntegrityError):
        with ctx.store.write() as conn:
            db.update_job(conn, "job-2", state=JobState.RUNNING.value)
    ctx.store.dispose()


def test_an_expired_lease_is_reclaimed_counted_and_fenced_then_failed(store_url, tmp_path, monkeypatch):
    # The store's clock is moved forward past the lease instead of sleeping through it: with a real 1 s lease, a
    # loaded CI machine once took longer than the lease between the first and second claim.
    real_utcnow, skew = db.utcnow, [timedelta(0)]
    monkeypatch.setattr(db, "utcnow", lambda: real_utcnow() + skew[0])
    ctx = make_context(store_url, tmp_path, job_lease_s=60.0, job_max_attempts=2)
    add_model(ctx, "m")
    add_job(ctx, "job-1", "m", request_id="r-1")
    first, second, third = Scheduler(ctx, "first"), Scheduler(ctx, "second"), Scheduler(ctx, "third")
    claim = first.claim()
    assert claim is not None and claim.attempt == 1
    assert second.claim() is None, "a live lease is not reclaimed"
    skew[0] += timedelta(seconds=61)
    reclaimed = second.claim()
    assert reclaimed is not None and (reclaimed.job_id, reclaimed.attempt) == ("job-1", 2)
    with pytest.raises(LeaseLost):  # the first holder can no longer write anything for the job
        with first.fenced(claim).store.write():
            pass
    assert first.fail(claim, RuntimeError("late")) is False
    assert first.renew(claim) is False
    skew[0] += timedelta(seconds=61)
    assert third.claim() is None  # attempts used up: FAILED instead of a third claim
    with ctx.store.read() as conn:
        job = db.get_job(conn, "job-1")
        terminal = [e for e in db.events_after(conn, 0, ["job-1"], []) if e.kind == "TERMINAL"]
        report = verify_chain(conn, KEY)
    assert job.state == JobState.FAILED.value and "2 attempts" in job.message
    assert len(terminal) == 1 and terminal[0].request_ids == ["r-1"]
    assert report.valid and report.entries == 1
    ctx.store.dispose()


def test_a_heartbeat_keeps_the_lease(store_url, tmp_path):
    ctx = make_context(store_url, tmp_path, job_lease_s=3.0)  # beats every 1 s; slack for a loaded machine
    add_model(ctx, "m")
    add_job(ctx, "job-1", "m")
    holder = Scheduler(ctx, "holder")
    claim = holder.claim()
    with Heartbeat(holder, claim) as heartbeat:
        time.sleep(4.0)  # past one lease: only the renewals keep it
        assert Scheduler(ctx, "other").claim() is None
        assert not heartbeat.lost.is_set()
    ctx.store.dispose()


def test_an_executor_hands_its_lease_to_the_worker_it_started(store_url, tmp_path):
    ctx = make_context(store_url, tmp_path)
    add_model(ctx, "m")
    add_job(ctx, "job-1", "m")
    dispatcher = Scheduler(ctx, "api-1")
    held = dispatcher.claim(owner=f"{DISPATCH_PREFIX}api-1")
    worker = Scheduler(ctx, "pod-1")
    assert worker.adopt("job-1", attempt=held.attempt + 1) is None, "only the attempt it was started for"
    adopted = worker.adopt("job-1", attempt=held.attempt)
    assert adopted is not None and adopted.owner == "pod-1"
    assert dispatcher.renew(held) is False, "the executor sees the hand-over"
    assert Scheduler(ctx, "pod-2").adopt("job-1", attempt=held.attempt) is None, "a worker's lease is not adoptable"
    ctx.store.dispose()


# ------------------------------------------------------------------------------------ the log: events, audit
def test_audit_chain_and_event_seq_stay_linear_with_concurrent_processes(store_url, tmp_path):
    db.Store(store_url).dispose()  # migrated once, before the writers start
    reader = db.Store(store_url, migrate=False)
    seen: list[int] = []
    cursor = 0
    processes = [multiprocessing.get_context("spawn").Process(target=store_processes.append_log,
                                                                  args=(store_url, KEY, w, 40))
                 for w in range(3)]
    for process in processes:
        process.start()
    while any(p.is_alive() for p in processes) or cursor < 120:
        with reader.read() as conn:  # a client following the feed by seq, as a Session does
            rows = db.events_after(conn, cursor, [], [])
        for row in rows:
            seen.append(row.seq)
            cursor = row.seq
        if not any(p.is_alive() for p in processes) and not rows:
            break
        time.sleep(0.005)
    for process in processes:
        process.join()
        assert process.exitcode == 0
    with reader.read() as conn:
        every = [row.seq for row in db.events_after(conn, 0, [], [], limit=10_000)]
        report = verify_chain(conn, KEY)
    reader.dispose()
    assert len(every) == 120 and seen == every, "a reader following by seq missed an event committed late"
    assert report.valid and report.entries == 120, report.errors


# ---------------------------------------------------------------------------------------------- coalescing
def _target(name: str) -> dict:
    info = ModelInfo(name, TaskType.CLASSIFICATION, 10, VerificationPolicy(), {}, "1")
    return {"info": info, "method": "ssd", "params": {}, "matched": 2}


def test_coalescing_is_race_free_across_replicas(store_url, tmp_path):
    from service.intake_commit import Submission as _Submission

    ctx = make_context(store_url, tmp_path, coalescing_window_s=0.15)
    add_model(ctx, "m")
    replicas = [Intake(ctx), Intake(ctx)]  # two intakes: two group commits, two connections
    claimed_with: dict[str, tuple[str, ...]] = {}
    stop = threading.Event()

    def submit(replica: int) -> None:
        for index in range(40):
            request = ErasureRequest(request_id=f"r-{replica}-{index}", subject_ids=(f"s-{index}",))
            replicas[replica]._group.submit(_Submission(request, [f"h-{index}"], [], f"d-{replica}-{index}", None,
                                                        [_target("m")]))
            time.sleep(0.01)

    def claimer() -> None:
        scheduler = Scheduler(ctx, "claimer")
        while not stop.is_set():
            claim = scheduler.claim()
            if claim is None:
                time.sleep(0.01)
                continue
            with ctx.store.read() as conn:
                claimed_with[claim.job_id] = db.job_request_ids(conn, claim.job_id)
            finish(ctx, scheduler, claim)

    threads = [threading.Thread(target=submit, args=(r,)) for r in (0, 1)] + [threading.Thread(target=claimer)]
    for thread in threads:
        thread.start()
    for thread in threads[:2]:
        thread.join()
    time.sleep(0.5)
    stop.set()
    threads[2].join()
    with ctx.store.read() as conn:
        jobs = db.list_jobs(conn, [], "m", None, 1000)
        links = {job.job_id: db.job_request_ids(conn, job.job_id) for job in jobs}
        report = verify_chain(conn, KEY)
    linked = sorted(r for requests in links.values() for r in requests)
    assert linked == sorted(f"r-{p}-{i}" for p in (0, 1) for i in range(40)), "every request in exactly one job"
    for job_id, requests in claimed_with.items():
        assert links[job_id] == requests, f"a request joined {job_id} after a worker had claimed it"
    assert len(jobs) < 80, "requests of one window were coalesced"
    assert report.valid, report.errors
    ctx.store.dispose()


# ---------------------------------------------------------------------------------------------- record index
def test_the_record_index_counts_what_the_dataset_matches(store_url, tmp_path):
    from lethe_demo.data import digits_frame
    from service.datasets import DatasetCatalog
    from service.record_index import ensure_indexed

    ctx = make_context(store_url, tmp_path)
    ctx.catalog = DatasetCatalog(tmp_path / "datasets", KEY)
    frame = digits_frame()
    path, digest = ctx.catalog.write_version("m", frame, "registered-v1")
    add_model(ctx, "m")
    with ctx.store.write() as conn:
        db.insert_dataset_version(conn, "m", digest, str(path), len(frame), "1", None, None)
        row = db.dataset_for_model_version(conn, "m", "1")
    ensure_indexed(ctx, row)
    ensure_indexed(ctx, row)  # a second (racing) indexer writes nothing
    data = ctx.catalog.load(path, digest)
    subjects = sorted(set(frame["subject_id"]))
    cases = [(subjects[:3], [], []), ([], list(frame["record_id"][:5]) + ["no-such-record"], []), ([], [], [3, 7]),
             (subjects[10:12], list(frame["record_id"][100:102]), []), (["nobody"], [], [])]
    for subject_ids, record_ids, classes in cases:
        hashes = [ctx.catalog.subject_hash(s) for s in subject_ids]
        expected = int(data.match(set(hashes), {ctx.catalog.tombstone(r) for r in record_ids}, set(classes)).sum())
        with ctx.store.read() as conn:
            counted = db.indexed_matches(conn, [row.id], hashes, [ctx.catalog.tombstone(r) for r in record_ids],
                                         classes)
        assert counted.get(row.id, 0) == expected, (subject_ids, record_ids, classes)
    with ctx.store.write() as conn:
        db.mark_dataset_removed(conn, row.id)
    with ctx.store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(db.record_index)).scalar() == 0, \
            "a removed version's keyed hashes go with it"
    ctx.store.dispose()


def test_group_commit_answers_each_caller_with_its_own_outcome(store_url, tmp_path):
    from service.domain import AlreadyExists
    from service.intake_commit import Submission as _Submission

    ctx = make_context(store_url, tmp_path, coalescing_window_s=60)
    add_model(ctx, "m")
    intake = Intake(ctx)
    outcomes: dict[int, object] = {}

    def submit(index: int) -> None:
        request_id = f"r-{index % 20}"  # every id twice: one of each pair replays (or refuses) the other
        digest = "same" if index < 30 else f"other-{index}"
        try:
            outcomes[index] = intake._group.submit(_Submission(
                ErasureRequest(request_id=request_id, subject_ids=("s",)), ["h"], [], f"{request_id}-{digest}", None,
                [_target("m")]))
        except AlreadyExists as error:
            outcomes[index] = error

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    created = [o for o in outcomes.values() if not isinstance(o, AlreadyExists) and o.created]
    assert len(created) == 20, "each request id stored once"
    with ctx.store.read() as conn:
        jobs = db.list_jobs(conn, [], "m", None, 100)
        assert len(jobs) == 1 and len(db.job_request_ids(conn, jobs[0].job_id)) == 20
        assert verify_chain(conn, KEY).valid
    ctx.store.dispose()


@pytest.mark.postgres
def test_a_connection_that_died_idle_in_the_pool_is_replaced_before_use(postgres_url, monkeypatch):
    store = db.Store(postgres_url)
    try:
        with store.read() as conn:
            backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        killer = sa.create_engine(postgres_url)
        with killer.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(backend)})")
        killer.dispose()
        monkeypatch.setattr(db, "PING_IDLE_S", 0.0)  # the pooled connection counts as idle: pinged, found dead
        with store.read() as conn:
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != backend
    finally:
        store.dispose()


def test_sqlite_writers_of_other_processes_queue_on_the_writer_lock(tmp_path):
    """A writer waits on the flock another process holds (woken when it is released), rather than polling
    SQLite's busy handler; the lock is the database's name plus ``.writer-lock``."""
    import fcntl
    import os

    store = db.Store(f"sqlite:///{tmp_path / 'lethe.db'}")
    other_process = os.open(tmp_path / "lethe.db.writer-lock", os.O_RDWR | os.O_CREAT)
    written = threading.Event()

    def write() -> None:
        with store.write() as conn:
            db.upsert_model(conn, "m", "1", "classification", 10, {}, {})
        written.set()

    try:
        fcntl.flock(other_process, fcntl.LOCK_EX)
        writer = threading.Thread(target=write)
        writer.start()
        assert not written.wait(0.5), "wrote while another process held the writer lock"
        fcntl.flock(other_process, fcntl.LOCK_UN)
        assert written.wait(10)
        writer.join()
    finally:
        os.close(other_process)
        store.dispose()
