"""The durable job store: requests, jobs, events, audit entries, certificates, tombstones, dataset versions.

SQLAlchemy Core over SQLite in WAL mode by default (DESIGN.md, "Embedded default"); nothing in the schema
is SQLite-only (portable types, JSON columns, no triggers), so the same tables run on PostgreSQL for
scale-out. An acknowledgement is only sent after :meth:`Store.write` has committed, and SQLite runs with
``synchronous=FULL`` so that a committed transaction survives power loss, not only a process kill.

Subject and record ids never reach this module in clear: requests keep keyed hashes (HMAC-SHA256 with the
subject hash key) of both, tombstones keep the same keyed hashes of record ids.

Writers are serialised: in one process by a lock, across processes by SQLite's ``BEGIN IMMEDIATE`` (a
deferred transaction that upgrades from read to write can fail with SQLITE_BUSY at once instead of
waiting). Every committed write wakes :meth:`Store.wait_for_change`, so event streams wait on a condition
instead of polling.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

metadata = sa.MetaData()
_ID = 256  # longest id column; the front caps ids at settings.max_id_length (<= this)


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


models = sa.Table(
    "models", metadata,
    sa.Column("model_name", sa.String(_ID), primary_key=True),
    sa.Column("registered_version", sa.String(32), nullable=False),
    sa.Column("task_type", sa.String(32), nullable=False),
    sa.Column("num_classes", sa.Integer),
    sa.Column("policy", sa.JSON, nullable=False),
    sa.Column("training", sa.JSON, nullable=False),  # model factory + recipe, for exact retraining
    sa.Column("serving_version", sa.String(32), nullable=False),  # head of Lethe's lineage of this model
    sa.Column("serving_alias", sa.String(_ID)),  # the MLflow alias Lethe moves (None: settings.serving_alias)
    _ts("registered_at"),
)

dataset_versions = sa.Table(
    "dataset_versions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(_ID), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("records", sa.Integer, nullable=False),
    sa.Column("model_version", sa.String(32)),  # the model version trained / unlearned on this data
    sa.Column("job_id", sa.String(64)),  # the purge that wrote it (None: registration)
    sa.Column("mlflow_artifact_uri", sa.Text),  # the copy logged to MLflow, removed with the local one
    _ts("created_at"),
    _ts("removed_at", nullable=True),  # set once every copy of it is deleted
    sa.UniqueConstraint("model_name", "version"),
)

requests = sa.Table(
    "requests", metadata,
    sa.Column("request_id", sa.String(_ID), primary_key=True),
    sa.Column("payload_digest", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("subject_hashes", sa.JSON, nullable=False),  # keyed hashes, never clear ids
    sa.Column("record_hashes", sa.JSON, nullable=False),  # keyed hashes (the tombstone hash), never clear ids
    sa.Column("classes", sa.JSON, nullable=False),
    sa.Column("model_names", sa.JSON, nullable=False),
    sa.Column("method", sa.String(64)),
    sa.Column("method_params", sa.JSON, nullable=False),
    sa.Column("policy_overrides", sa.JSON, nullable=False),
    _ts("deadline", nullable=True),
    _ts("received_at"),
    sa.Column("state", sa.String(16), nullable=False, index=True),  # PENDING | COMPLETED
    sa.Column("first_event_seq", sa.Integer, nullable=False),
    sa.Column("outcome_job_ids", sa.JSON, nullable=False),
    _ts("completed_at", nullable=True),
    # Keyed hash of the authenticated identity that submitted the request: a submitter reads only its own.
    sa.Column("submitter_hash", sa.String(64), nullable=True, index=True),
)

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("model_name", sa.String(_ID), nullable=False, index=True),
    sa.Column("coalesce_key", sa.String(64), nullable=False),
    sa.Column("selector", sa.String(16), nullable=False),  # records | classes
    sa.Column("state", sa.String(32), nullable=False, index=True),
    sa.Column("stage", sa.String(32), nullable=False),
    sa.Column("progress", sa.Float, nullable=False),
    sa.Column("method", sa.String(64), nullable=False),
    sa.Column("method_params", sa.JSON, nullable=False),
    sa.Column("policy_overrides", sa.JSON, nullable=False),
    sa.Column("base_version", sa.String(32)),
    sa.Column("result_version", sa.String(32)),
    sa.Column("records", sa.Integer, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("evidence", sa.JSON, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    _ts("window_closes_at"),
    _ts("created_at"),
    _ts("updated_at"),
)

job_requests = sa.Table(
    "job_requests", metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("request_id", sa.String(_ID), primary_key=True, index=True),
)

events = sa.Table(
    "events", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), nullable=False, index=True),
    sa.Column("request_ids", sa.JSON, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("stage", sa.String(32), nullable=False),
    sa.Column("fraction", sa.Float, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("certificate_id", sa.String(64)),
    _ts("time"),
)

event_requests = sa.Table(  # lets a client watch by request id without scanning JSON
    "event_requests", metadata,
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("request_id", sa.String(_ID), primary_key=True, index=True),
)

certificates = sa.Table(
    "certificates", metadata,
    sa.Column("certificate_id", sa.String(64), primary_key=True),
    sa.Column("request_id", sa.String(_ID), nullable=False, index=True),
    sa.Column("model_name", sa.String(_ID), nullable=False),
    sa.Column("job_id", sa.String(64)),
    sa.Column("body_json", sa.Text, nullable=False),
    sa.Column("signature", sa.String(64), nullable=False),
    _ts("issued_at"),
    sa.UniqueConstraint("request_id", "model_name"),
)

audit_log = sa.Table(
    "audit_log", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("body_json", sa.Text, nullable=False),
    sa.Column("entry_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("signature", sa.String(64), nullable=False),
)

tombstones = sa.Table(
    "tombstones", metadata,
    sa.Column("record_hash", sa.String(64), primary_key=True),
    sa.Column("model_name", sa.String(_ID), nullable=False),
    sa.Column("job_id", sa.String(64), nullable=False),
    _ts("created_at"),
)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite drops the zone of stored datetimes; everything Lethe stores is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


class Store:
    """Connection handling, the write lock and the change condition; queries are functions below."""

    def __init__(self, url: str):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._write_lock = threading.RLock()
        self._changed = threading.Condition()
        self._generation = 0
        if self.is_sqlite:
            self.engine = sa.create_engine(url, connect_args={"timeout": 30})
            sa.event.listen(self.engine, "connect", self._sqlite_connect)
            sa.event.listen(self.engine, "begin", self._sqlite_begin)
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True)
        metadata.create_all(self.engine)

    @staticmethod
    def _sqlite_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's begin listener issues BEGIN itself
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @staticmethod
    def _sqlite_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.info.get("lethe_write") else "BEGIN")

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One serialised read-write transaction, committed on exit; wakes event waiters afterwards."""
        with self._write_lock, self.engine.connect() as connection:
            connection.info["lethe_write"] = True
            try:
                with connection.begin():
                    yield connection
            finally:
                connection.info.pop("lethe_write", None)
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A consistent read snapshot."""
        with self.engine.connect() as connection, connection.begin():
            yield connection

    def wake(self) -> None:
        """Wake every waiter (used on shutdown so workers notice at once)."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def generation(self) -> int:
        with self._changed:
            return self._generation

    def wait_for_change(self, since_generation: int, timeout_s: float) -> bool:
        """Block until a write commits after ``since_generation`` or the timeout passes."""
        with self._changed:
            return self._changed.wait_for(lambda: self._generation != since_generation, timeout=timeout_s)

    def dispose(self) -> None:
        self.engine.dispose()


# ------------------------------------------------------------------------------------------------ models
def upsert_model(conn: Connection, model_name: str, version: str, task_type: str, num_classes: int | None,
                 policy: dict[str, Any], training: dict[str, Any], serving_alias: str | None = None) -> None:
    conn.execute(sa.delete(models).where(models.c.model_name == model_name))
    conn.execute(sa.insert(models).values(model_name=model_name, registered_version=version, task_type=task_type,
                                          num_classes=num_classes, policy=policy, training=training,
                                          serving_version=version, serving_alias=serving_alias,
                                          registered_at=utcnow()))


def set_serving_version(conn: Connection, model_name: str, version: str) -> None:
    conn.execute(sa.update(models).where(models.c.model_name == model_name).values(serving_version=version))


def get_model(conn: Connection, model_name: str) -> Row | None:
    return conn.execute(sa.select(models).where(models.c.model_name == model_name)).first()


def list_models(conn: Connection) -> list[Row]:
    return list(conn.execute(sa.select(models).order_by(models.c.model_name)))


# -------------------------------------------------------------------------------------- dataset versions
def insert_dataset_version(conn: Connection, model_name: str, digest: str, path: str, records: int,
                           model_version: str | None, job_id: str | None, artifact_uri: str | None) -> int:
    latest = conn.execute(sa.select(sa.func.max(dataset_versions.c.version))
                          .where(dataset_versions.c.model_name == model_name)).scalar()
    version = (latest or 0) + 1
    conn.execute(sa.insert(dataset_versions).values(
        model_name=model_name, version=version, digest=digest, path=path, records=records,
        model_version=model_version, job_id=job_id, mlflow_artifact_uri=artifact_uri, created_at=utcnow()))
    return version


def dataset_for_model_version(conn: Connection, model_name: str, model_version: str) -> Row | None:
    return conn.execute(sa.select(dataset_versions).where(
        dataset_versions.c.model_name == model_name, dataset_versions.c.model_version == model_version)
        .order_by(dataset_versions.c.version.desc())).first()


def dataset_written_by_job(conn: Connection, job_id: str) -> Row | None:
    return conn.execute(sa.select(dataset_versions).where(dataset_versions.c.job_id == job_id)).first()


def live_dataset_versions(conn: Connection, model_name: str | None = None) -> list[Row]:
    query = sa.select(dataset_versions).where(dataset_versions.c.removed_at.is_(None))
    if model_name is not None:
        query = query.where(dataset_versions.c.model_name == model_name)
    return list(conn.execute(query.order_by(dataset_versions.c.id)))


def lineage_dataset_versions(conn: Connection, model_name: str) -> list[Row]:
    """Every dataset version of a model's lineage, removed ones included (their model versions are the lineage)."""
    return list(conn.execute(sa.select(dataset_versions).where(dataset_versions.c.model_name == model_name)
                             .order_by(dataset_versions.c.id)))


def erasures_since(conn: Connection, model_name: str, versions: Sequence[str]) -> tuple[int, int, int]:
    """(jobs, distinct subjects, records) erased by succeeded jobs of ``model_name`` that started from one of
    ``versions``: what those versions' weights still carry."""
    job_ids = list(conn.execute(sa.select(jobs.c.job_id).where(
        jobs.c.model_name == model_name, jobs.c.state == "SUCCEEDED", jobs.c.base_version.in_(list(versions)),
        jobs.c.records > 0)).scalars())
    if not job_ids:
        return 0, 0, 0
    request_ids = list(conn.execute(sa.select(job_requests.c.request_id).where(
        job_requests.c.job_id.in_(job_ids))).scalars())
    subjects: set[str] = set()
    for row in conn.execute(sa.select(requests.c.subject_hashes).where(requests.c.request_id.in_(request_ids))):
        subjects.update(row.subject_hashes or ())
    records = conn.execute(sa.select(sa.func.count()).select_from(tombstones).where(
        tombstones.c.job_id.in_(job_ids))).scalar_one()
    return len(job_ids), len(subjects), int(records)


def mark_dataset_removed(conn: Connection, dataset_id: int) -> None:
    conn.execute(sa.update(dataset_versions).where(dataset_versions.c.id == dataset_id).values(removed_at=utcnow()))


def set_dataset_artifact(conn: Connection, dataset_id: int, artifact_uri: str) -> None:
    conn.execute(sa.update(dataset_versions).where(dataset_versions.c.id == dataset_id)
                 .values(mlflow_artifact_uri=artifact_uri))


# ---------------------------------------------------------------------------------------------- requests
def get_request(conn: Connection, request_id: str) -> Row | None:
    return conn.execute(sa.select(requests).where(requests.c.request_id == request_id)).first()


def insert_request(conn: Connection, **values: Any) -> None:
    conn.execute(sa.insert(requests).values(**values))


def request_owners(conn: Connection, request_ids: Sequence[str]) -> dict[str, str | None]:
    """request id -> submitter_hash for the known ones among ``request_ids``."""
    found: dict[str, str | None] = {}
    ids = list(dict.fromkeys(request_ids))
    for start in range(0, len(ids), 500):  # stay below every backend's bound-parameter limit
        rows = conn.execute(sa.select(requests.c.request_id, requests.c.submitter_hash)
                            .where(requests.c.request_id.in_(ids[start:start + 500])))
        found.update({row.request_id: row.submitter_hash for row in rows})
    return found


def set_request_jobs(conn: Connection, request_id: str, job_ids: Sequence[str]) -> None:
    conn.execute(sa.update(requests).where(requests.c.request_id == request_id)
                 .values(outcome_job_ids=list(job_ids)))


def complete_request(conn: Connection, request_id: str) -> None:
    conn.execute(sa.update(requests).where(requests.c.request_id == request_id, requests.c.state == "PENDING")
                 .values(state="COMPLETED", completed_at=utcnow()))


def pending_requests(conn: Connection) -> list[tuple[str, datetime, datetime | None]]:
    """(request_id, received_at, deadline) of every PENDING request, oldest first."""
    rows = conn.execute(sa.select(requests.c.request_id, requests.c.received_at, requests.c.deadline)
                        .where(requests.c.state == "PENDING").order_by(requests.c.received_at))
    return [(row.request_id, as_utc(row.received_at), as_utc(row.deadline)) for row in rows]


def overdue_pending_count(conn: Connection, now: datetime) -> int:
    """PENDING requests whose deadline lies before ``now`` (an indexed state filter, then a small scan)."""
    return int(conn.execute(sa.select(sa.func.count()).select_from(requests).where(
        requests.c.state == "PENDING", requests.c.deadline.is_not(None), requests.c.deadline < now)).scalar())


def oldest_pending_received_at(conn: Connection) -> datetime | None:
    return as_utc(conn.execute(sa.select(sa.func.min(requests.c.received_at))
                               .where(requests.c.state == "PENDING")).scalar())


# -------------------------------------------------------------------------------------------------- jobs
def insert_job(conn: Connection, **values: Any) -> None:
    now = utcnow()
    conn.execute(sa.insert(jobs).values(created_at=now, updated_at=now, **values))


def link_request(conn: Connection, job_id: str, request_id: str) -> None:
    conn.execute(sa.insert(job_requests).values(job_id=job_id, request_id=request_id))


def open_job_for(conn: Connection, model_name: str, coalesce_key: str, now: datetime) -> str | None:
    """A QUEUED job of this model and key whose coalescing window is still open, if any."""
    return conn.execute(sa.select(jobs.c.job_id).where(
        jobs.c.model_name == model_name, jobs.c.coalesce_key == coalesce_key, jobs.c.state == "QUEUED",
        jobs.c.window_closes_at > now).order_by(jobs.c.created_at)).scalar()


def update_job(conn: Connection, job_id: str, **values: Any) -> None:
    conn.execute(sa.update(jobs).where(jobs.c.job_id == job_id).values(updated_at=utcnow(), **values))


def get_job(conn: Connection, job_id: str) -> Row | None:
    return conn.execute(sa.select(jobs).where(jobs.c.job_id == job_id)).first()


def job_request_ids(conn: Connection, job_id: str) -> tuple[str, ...]:
    rows = conn.execute(sa.select(job_requests.c.request_id).where(job_requests.c.job_id == job_id)
                        .order_by(job_requests.c.request_id))
    return tuple(row.request_id for row in rows)


def request_job_ids(conn: Connection, request_id: str) -> tuple[str, ...]:
    rows = conn.execute(sa.select(job_requests.c.job_id).where(job_requests.c.request_id == request_id))
    return tuple(sorted(row.job_id for row in rows))


def list_jobs(conn: Connection, states: Sequence[str], model_name: str | None, created_before: datetime | None,
              limit: int) -> list[Row]:
    query = sa.select(jobs)
    if states:
        query = query.where(jobs.c.state.in_(list(states)))
    if model_name:
        query = query.where(jobs.c.model_name == model_name)
    if created_before is not None:
        query = query.where(jobs.c.created_at <= created_before)
    return list(conn.execute(query.order_by(jobs.c.created_at.desc()).limit(limit)))


def next_runnable_job(conn: Connection, now: datetime, busy_models: Sequence[str]) -> Row | None:
    """The oldest QUEUED job whose window has closed and whose model lineage has nothing RUNNING."""
    running = sa.select(jobs.c.model_name).where(jobs.c.state == "RUNNING")
    query = sa.select(jobs).where(jobs.c.state == "QUEUED", jobs.c.window_closes_at <= now,
                                  jobs.c.model_name.not_in(running))
    if busy_models:
        query = query.where(jobs.c.model_name.not_in(list(busy_models)))
    return conn.execute(query.order_by(jobs.c.created_at).limit(1)).first()


def next_window_close(conn: Connection) -> datetime | None:
    return as_utc(conn.execute(sa.select(sa.func.min(jobs.c.window_closes_at))
                               .where(jobs.c.state == "QUEUED")).scalar())


def running_jobs(conn: Connection) -> list[Row]:
    return list(conn.execute(sa.select(jobs).where(jobs.c.state == "RUNNING")))


def count_jobs(conn: Connection, states: Sequence[str]) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(jobs)
                            .where(jobs.c.state.in_(list(states)))).scalar() or 0)


def job_counts_by_state(conn: Connection) -> dict[str, int]:
    """Jobs per state, store-wide (one indexed GROUP BY; for the ``lethe_jobs`` gauge)."""
    rows = conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state))
    return {state: int(count) for state, count in rows}


def running_job_last_progress(conn: Connection) -> list[tuple[str, datetime]]:
    """(stage, time of the last progress write) of every RUNNING job: how long each has been silent."""
    rows = conn.execute(sa.select(jobs.c.stage, jobs.c.updated_at).where(jobs.c.state == "RUNNING"))
    return [(row.stage, as_utc(row.updated_at)) for row in rows]


# ------------------------------------------------------------------------------------------------ events
def add_event(conn: Connection, job_id: str, request_ids: Sequence[str], kind: str, state: str, stage: str,
              fraction: float, message: str, certificate_id: str | None = None) -> int:
    seq = conn.execute(sa.insert(events).values(
        job_id=job_id, request_ids=list(request_ids), kind=kind, state=state, stage=stage, fraction=fraction,
        message=message, certificate_id=certificate_id, time=utcnow())).inserted_primary_key[0]
    if request_ids:
        conn.execute(sa.insert(event_requests), [{"seq": seq, "request_id": r} for r in request_ids])
    return int(seq)


def events_after(conn: Connection, after_seq: int, job_ids: Sequence[str], request_ids: Sequence[str],
                 limit: int = 1000) -> list[Row]:
    query = sa.select(events).where(events.c.seq > after_seq)
    selectors = []
    if job_ids:
        selectors.append(events.c.job_id.in_(list(job_ids)))
    if request_ids:
        selectors.append(events.c.seq.in_(sa.select(event_requests.c.seq)
                                          .where(event_requests.c.request_id.in_(list(request_ids)))))
    if selectors:
        query = query.where(sa.or_(*selectors))
    return list(conn.execute(query.order_by(events.c.seq).limit(limit)))


def last_event_seq(conn: Connection) -> int:
    return int(conn.execute(sa.select(sa.func.max(events.c.seq))).scalar() or 0)


# ------------------------------------------------------------------------------------------ certificates
def insert_certificate(conn: Connection, certificate_id: str, request_id: str, model_name: str,
                       job_id: str | None, body_json: str, signature: str) -> None:
    conn.execute(sa.insert(certificates).values(
        certificate_id=certificate_id, request_id=request_id, model_name=model_name, job_id=job_id,
        body_json=body_json, signature=signature, issued_at=utcnow()))


def certificates_for(conn: Connection, request_id: str) -> list[Row]:
    return list(conn.execute(sa.select(certificates).where(certificates.c.request_id == request_id)
                             .order_by(certificates.c.model_name)))


def get_certificate(conn: Connection, certificate_id: str) -> Row | None:
    return conn.execute(sa.select(certificates).where(certificates.c.certificate_id == certificate_id)).first()


def all_certificates(conn: Connection) -> list[Row]:
    return list(conn.execute(sa.select(certificates).order_by(certificates.c.issued_at)))


# ----------------------------------------------------------------------------------------------- audit
def audit_tail(conn: Connection) -> tuple[int, str] | None:
    row = conn.execute(sa.select(audit_log.c.seq, audit_log.c.entry_hash)
                       .order_by(audit_log.c.seq.desc()).limit(1)).first()
    return (row.seq, row.entry_hash) if row else None


def insert_audit(conn: Connection, seq: int, prev_hash: str, body_json: str, entry_hash: str,
                 signature: str) -> None:
    conn.execute(sa.insert(audit_log).values(seq=seq, prev_hash=prev_hash, body_json=body_json,
                                             entry_hash=entry_hash, signature=signature))


def audit_entries(conn: Connection) -> Iterator[Row]:
    yield from conn.execute(sa.select(audit_log).order_by(audit_log.c.seq))


def audit_entries_from(conn: Connection, first_seq: int, limit: int) -> list[Row]:
    """At most ``limit`` chain entries from ``first_seq`` on, in order (a bounded slice of the chain)."""
    return list(conn.execute(sa.select(audit_log).where(audit_log.c.seq >= first_seq)
                             .order_by(audit_log.c.seq).limit(limit)))


# -------------------------------------------------------------------------------------------- tombstones
def add_tombstones(conn: Connection, record_hashes: Sequence[str], model_name: str, job_id: str) -> None:
    known = tombstoned(conn, record_hashes)
    fresh = sorted(set(record_hashes) - known)
    if fresh:
        now = utcnow()
        conn.execute(sa.insert(tombstones), [{"record_hash": h, "model_name": model_name, "job_id": job_id,
                                              "created_at": now} for h in fresh])


def tombstoned(conn: Connection, record_hashes: Sequence[str]) -> set[str]:
    found: set[str] = set()
    hashes = list(record_hashes)
    for start in range(0, len(hashes), 500):  # stay below every backend's bound-parameter limit
        chunk = hashes[start:start + 500]
        found.update(conn.execute(sa.select(tombstones.c.record_hash)
                                  .where(tombstones.c.record_hash.in_(chunk))).scalars())
    return found


def seconds_ago(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)
