"""The durable job store: requests, jobs, events, audit entries, certificates, tombstones, dataset versions.

SQLAlchemy Core over SQLite in WAL mode by default (DESIGN.md, "Embedded default"); nothing in the schema
is SQLite-only (portable types, JSON columns, no triggers), so the same tables run on PostgreSQL for
scale-out. An acknowledgement is only sent after :meth:`Store.write` has committed, and SQLite runs with
``synchronous=FULL`` so that a committed transaction survives power loss, not only a process kill.

Subject and record ids never reach this module in clear: requests keep keyed hashes (HMAC-SHA256 with the
subject hash key) of both, tombstones keep the same keyed hashes of record ids. (The sealed verification sets
of :mod:`service.sealed` hold erased records, but only as ciphertext outside the store; the store keeps
their wrapped keys until the retention window ends.)

The schema is created and upgraded by Alembic migrations (:mod:`service.migrations`) when a
:class:`Store` opens, on SQLite and PostgreSQL alike; ``metadata`` below mirrors the head revision.

Concurrency (several API replicas and workers on one store, issue 11):

- SQLite: writers are serialised, in one process by a lock, across processes by an ``flock`` on
  ``<database>.writer-lock`` (:class:`_SqliteWriteLock`) and by ``BEGIN IMMEDIATE`` (a deferred transaction
  that upgrades from read to write can fail with SQLITE_BUSY at once instead of waiting).
- PostgreSQL (READ COMMITTED): writers run concurrently; what must be serial is serialised by the
  database itself: claims lock job rows ``FOR UPDATE SKIP LOCKED`` and one RUNNING job per model is a
  partial unique index (:func:`claim_next`); a coalescing decision holds an advisory lock on its
  (model, key) (:func:`lock_coalescing`); and every transaction that appends events or audit entries takes
  the LOG lock (:func:`lock_log`, a transaction-scoped advisory lock) before its first append and keeps it
  to commit. The log lock makes event ``seq`` values commit in increasing order (a reader that saw seq n
  never later finds an n' < n committed) and the audit chain gap-free and linear. Deadlock freedom rests on
  one rule: within a transaction, row and coalescing locks come first, the log lock last.

Every committed write wakes :meth:`Store.wait_for_change` in this process, so event streams wait on a
condition instead of polling (writes of other processes are seen by the waiters' bounded re-reads).

The statements on the acknowledgement path (intake's reads, its group commit's bulk writes, the event feed)
are built once, as module constants with bind parameters: executing the same construct again skips
SQLAlchemy's statement construction and cache-key generation, which cost more CPU than SQLite's own work
(issue 11's profile). The group commit writes a batch of requests with one statement per table
(``executemany``), not one per request.
"""

from __future__ import annotations

import fcntl
import functools
import os
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
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
    _ts("indexed_at", nullable=True),  # set once record_index holds all its records
    sa.UniqueConstraint("model_name", "version"),
)

record_index = sa.Table(  # keyed hashes of a live dataset version's records: intake resolves requests here
    "record_index", metadata,
    sa.Column("dataset_id", sa.Integer, primary_key=True),
    sa.Column("record_hash", sa.String(64), primary_key=True),  # keyed hash of the record id (tombstone form)
    sa.Column("subject_hash", sa.String(64), nullable=False),  # keyed hash of the subject id
    sa.Column("label", sa.Integer, nullable=True),  # class of a classification record
    sa.Index("ix_record_index_subject", "subject_hash", "dataset_id"),
    sa.Index("ix_record_index_label", "dataset_id", "label"),
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
    sa.Column("state", sa.String(16), nullable=False, index=True),  # PENDING | COMPLETED | CANCELLED | CLOSED
    sa.Column("first_event_seq", sa.Integer, nullable=False),
    sa.Column("outcome_job_ids", sa.JSON, nullable=False),
    _ts("completed_at", nullable=True),
    # Keyed hash of the authenticated identity that submitted the request: a submitter reads only its own.
    sa.Column("submitter_hash", sa.String(64), nullable=True, index=True),
    sa.Column("state_reason", sa.Text),  # an operator's reason for a cancel or a close
    # Updates and rectifications: where their records are staged until a job learns them ({"path", "digest",
    # "rows", "artifact_uri"} per model); the records themselves (clear ids) are never in the job store.
    sa.Column("payload", sa.JSON),
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
    sa.Column("lease_owner", sa.String(160)),  # who holds the claim (a worker, or an executor dispatching it)
    _ts("lease_expires_at", nullable=True),  # renewed by the holder's heartbeat; past it, anyone may reclaim
    sa.Index("uq_jobs_one_running_per_model", "model_name", unique=True,
             sqlite_where=sa.text("state = 'RUNNING'"), postgresql_where=sa.text("state = 'RUNNING'")),
)

job_requests = sa.Table(
    "job_requests", metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("request_id", sa.String(_ID), primary_key=True, index=True),
    # Which attempt of the request this job is: 1 for the submission, N for the (N-1)th RetryRequest.
    sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
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


sealed_sets = sa.Table(  # one per (erasure job, request): the sealed verification set (service.sealed)
    "sealed_sets", metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("request_id", sa.String(_ID), primary_key=True),
    sa.Column("model_name", sa.String(_ID), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),  # records | classes
    sa.Column("classes", sa.JSON, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("path", sa.Text),  # the ciphertext as the sealing process wrote it (None: nothing was kept)
    sa.Column("artifact_uri", sa.Text),  # its MLflow copy, read by processes on other hosts
    # The per-request AES-256-GCM key, itself wrapped (AES-GCM) with a key derived from the subject hash key;
    # NULL once destroyed (crypto-shredding) or when nothing was kept.
    sa.Column("wrapped_key", sa.Text),
    sa.Column("key_fingerprint", sa.String(64)),  # what the audit chain names the key by
    sa.Column("retention_days", sa.Float, nullable=False),
    _ts("created_at"),
    _ts("expires_at"),
    _ts("destroyed_at", nullable=True),
    sa.Column("destroyed_reason", sa.Text),
)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite drops the zone of stored datetimes; everything Lethe stores is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


PING_IDLE_S = 1.0
"""A pooled PostgreSQL connection idle this long is pinged before use (:meth:`Store._ping_if_idle`)."""

POOL_SIZE = 20
"""Connections a :class:`Store` keeps open (a PostgreSQL server's default ``max_connections`` of 100 still
serves four processes' full pools)."""

LOG_LOCK_KEY = 7_304_119_002
"""pg_advisory_xact_lock key serialising event and audit appends (see the module docstring)."""


class Store:
    """Connection handling, migrations, the write discipline and the change condition; queries are
    functions below."""

    def __init__(self, url: str, migrate: bool = True):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.is_postgres = url.startswith("postgresql")
        # SQLite has one writer at a time anyway: a lock spares the others busy-waiting. PostgreSQL runs this
        # process's writers concurrently; the database serialises what must be serial.
        self._write_lock = _SqliteWriteLock(sa.engine.make_url(url).database) if self.is_sqlite else None
        self._changed = threading.Condition()
        self._generation = 0
        # Connections kept open: enough for every Session stream's reader and poller, the group commit, the
        # workers and heartbeats at once. A connection opened beyond the pool is closed when returned, and
        # opening one costs more than the statements it runs (SQLite's PRAGMAs; a PostgreSQL backend start).
        if self.is_sqlite:
            self.engine = sa.create_engine(url, connect_args={"timeout": 30}, pool_size=POOL_SIZE, max_overflow=20)
            sa.event.listen(self.engine, "connect", self._sqlite_connect)
            sa.event.listen(self.engine, "begin", self._sqlite_begin)
        else:
            self.engine = sa.create_engine(url, pool_size=POOL_SIZE, max_overflow=10)
            sa.event.listen(self.engine, "checkin", _note_checkin)
            sa.event.listen(self.engine, "checkout", self._ping_if_idle)
        if migrate:
            from service import migrations

            with self.write() as connection:
                migrations.upgrade(connection)

    @staticmethod
    def _sqlite_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's begin listener issues BEGIN itself
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    def _ping_if_idle(self, dbapi_connection, record, _proxy) -> None:
        """Pessimistic disconnect handling for connections that sat in the pool: one that was idle for
        PING_IDLE_S or more is pinged, and a dead one is replaced (the pool retries the checkout on
        DisconnectionError). SQLAlchemy's ``pool_pre_ping`` pinged on EVERY checkout: a round trip and a
        statement in the server per transaction, 60 us of this process's CPU each, under a load that checks
        connections out hundreds of times a second. A server that went away during the last PING_IDLE_S
        fails the statement instead; SQLAlchemy then invalidates the whole pool, so one transaction fails."""
        if time.monotonic() - record.info.get("lethe_checked_in_at", 0.0) < PING_IDLE_S:
            return
        try:
            alive = self.engine.dialect.do_ping(dbapi_connection)
        except self.engine.dialect.loaded_dbapi.Error as error:
            raise sa.exc.DisconnectionError(str(error)) from error
        if not alive:
            raise sa.exc.DisconnectionError("the connection did not answer a ping")

    @staticmethod
    def _sqlite_begin(connection: Connection) -> None:
        # On the driver's connection: through SQLAlchemy, this statement cost as much as a query (issue 11).
        connection.connection.dbapi_connection.execute(
            "BEGIN IMMEDIATE" if connection.info.get("lethe_write") else "BEGIN")

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One read-write transaction, committed on exit; wakes event waiters afterwards."""
        with self._process_write_lock(), self.engine.connect() as connection:
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
    def _process_write_lock(self) -> Iterator[None]:
        if self._write_lock is None:
            yield
            return
        with self._write_lock.hold():
            yield

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
        if self._write_lock is not None:
            self._write_lock.close()


class _SqliteWriteLock:
    """Serialises a SQLite store's writers: this process's threads by a lock, processes by an ``flock`` on
    ``<database>.writer-lock``. Both wake the next writer as soon as the holder lets go.

    ``BEGIN IMMEDIATE`` alone serialises processes too, but a writer that finds the database locked sleeps in
    SQLite's busy handler (1, 2, 5, 10, ... 100 ms between tries) while the other process's next transaction
    takes the lock at once: with two API replicas, acknowledgements waited up to 1.3 s (issue 11). The kernel
    releases an flock when its holder dies (kill -9): nothing to clean up. Re-entrant in a thread, as a
    transaction's code may open another. The lock file is opened at the first write (a read-only user, such as
    ``lethe audit verify``, never creates it)."""

    def __init__(self, database: str | None):
        self._path = f"{database}.writer-lock" if database and database != ":memory:" else None
        self._threads = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._threads:
            self._depth += 1
            outermost = self._depth == 1 and self._path is not None
            try:
                if outermost:
                    if self._fd is None:
                        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
                    fcntl.flock(self._fd, fcntl.LOCK_EX)
                yield
            finally:
                if outermost and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                self._depth -= 1

    def close(self) -> None:
        with self._threads:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _note_checkin(_dbapi_connection, record) -> None:
    record.info["lethe_checked_in_at"] = time.monotonic()


def _advisory_lock(conn: Connection, key: int) -> None:
    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({int(key)})")


def lock_log(conn: Connection) -> None:
    """Take the LOG lock before appending events or audit entries (held to commit; once per transaction).

    A no-op on SQLite, where ``BEGIN IMMEDIATE`` already makes the whole transaction the only writer.
    """
    if conn.dialect.name != "postgresql":
        return
    transaction = conn.get_transaction()
    if conn.info.get("lethe_log_locked") is transaction:
        return
    _advisory_lock(conn, LOG_LOCK_KEY)
    conn.info["lethe_log_locked"] = transaction


def lock_coalescing(conn: Connection, keys: Iterable[tuple[str, str]]) -> None:
    """Serialise coalescing decisions on (model, coalesce key) across replicas: two intakes can neither both
    open a job for one key nor join a job a claim is taking. Keys are locked in sorted order (no deadlock
    between two batches), and before any log lock (see the module docstring)."""
    if conn.dialect.name != "postgresql":
        return
    for model_name, key in sorted(set(keys)):
        digest = zlib.crc32(f"coalesce\n{model_name}\n{key}".encode())
        _advisory_lock(conn, (1 << 32) + digest)  # above the constant keys' range


def _insert_ignoring_duplicates(conn: Connection, table: sa.Table):
    """INSERT ... ON CONFLICT DO NOTHING for either database (concurrent writers may insert the same key)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


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


_LIST_MODELS = sa.select(models).order_by(models.c.model_name)


def get_model(conn: Connection, model_name: str) -> Row | None:
    return conn.execute(sa.select(models).where(models.c.model_name == model_name)).first()


def list_models(conn: Connection) -> list[Row]:
    return list(conn.execute(_LIST_MODELS))


def serving_matches(conn: Connection, subject_hashes: Sequence[str], record_hashes: Sequence[str],
                    classes: Sequence[int]) -> dict[str, Row]:
    """Every registered model (its ``models`` columns) with its serving version's dataset (``dataset_id``,
    ``dataset_indexed_at``; None when it has none) and how many of that dataset's records a request names
    (``matched``, counted on the record index as :func:`indexed_matches` does; 0 while it is unindexed), by
    model name: intake's resolution in one statement."""
    statement = _serving_matches_statement(bool(subject_hashes), bool(record_hashes), bool(classes))
    rows = conn.execute(statement, {"subject_hashes": list(subject_hashes), "record_hashes": list(record_hashes),
                                    "classes": list(classes)})
    return {row.model_name: row for row in rows}  # ordered by dataset version: the highest one wins


@functools.cache
def _serving_matches_statement(subjects: bool, records: bool, classes: bool) -> sa.Select:
    """:func:`serving_matches`'s query for one combination of selectors, built once."""
    serving = sa.and_(dataset_versions.c.model_name == models.c.model_name,
                      dataset_versions.c.model_version == models.c.serving_version)
    matched = (sa.select(sa.func.count()).select_from(record_index)
               .where(record_index.c.dataset_id == dataset_versions.c.id, _index_selector(subjects, records, classes))
               .scalar_subquery())
    return (sa.select(models, dataset_versions.c.id.label("dataset_id"),
                      dataset_versions.c.indexed_at.label("dataset_indexed_at"), matched.label("matched"))
            .select_from(models.outerjoin(dataset_versions, serving))
            .order_by(models.c.model_name, dataset_versions.c.version))


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


def dataset_by_path(conn: Connection, path: str) -> Row | None:
    return conn.execute(sa.select(dataset_versions).where(dataset_versions.c.path == path)
                        .order_by(dataset_versions.c.id.desc())).first()


def removed_dataset_versions(conn: Connection) -> list[Row]:
    return list(conn.execute(sa.select(dataset_versions).where(dataset_versions.c.removed_at.is_not(None))))


def dataset_written_by_job(conn: Connection, job_id: str) -> Row | None:
    return conn.execute(sa.select(dataset_versions).where(dataset_versions.c.job_id == job_id)).first()


def live_dataset_versions(conn: Connection, model_name: str | None = None) -> list[Row]:
    query = sa.select(dataset_versions).where(dataset_versions.c.removed_at.is_(None))
    if model_name is not None:
        query = query.where(dataset_versions.c.model_name == model_name)
    return list(conn.execute(query.order_by(dataset_versions.c.id)))


def staged_artifact_for(conn: Connection, path: str) -> str | None:
    """The MLflow copy of a staged update file recorded at ``path`` (for a worker on another host)."""
    for payload in conn.execute(sa.select(requests.c.payload).where(requests.c.payload.is_not(None),
                                                                    requests.c.state == "PENDING")).scalars():
        for staged in (payload or {}).values():
            if staged.get("path") == path:
                return staged.get("artifact_uri")
    return None


def erasure_selectors(conn: Connection, model_name: str) -> tuple[set[str], set[int]]:
    """What may never come back to ``model_name`` through an update: the subject hashes of every erasure
    request that targets it (pending or done), and the classes of its pending class erasures (done ones are
    on the lineage's ``lethe.erased_classes`` tag)."""
    subjects: set[str] = set()
    classes: set[int] = set()
    rows = conn.execute(sa.select(requests.c.model_names, requests.c.subject_hashes, requests.c.classes,
                                  requests.c.state)
                        .where(requests.c.kind == "erase", requests.c.state.in_(("PENDING", "COMPLETED"))))
    for row in rows:
        if model_name in (row.model_names or ()) or "*" in (row.model_names or ()):
            subjects.update(row.subject_hashes or ())
            if row.state == "PENDING":
                classes.update(row.classes or ())
    return subjects, classes


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
    """The version's copies are gone: so are its record index rows (no keyed hash outlives its data)."""
    conn.execute(sa.delete(record_index).where(record_index.c.dataset_id == dataset_id))
    conn.execute(sa.update(dataset_versions).where(dataset_versions.c.id == dataset_id).values(removed_at=utcnow()))


def set_dataset_artifact(conn: Connection, dataset_id: int, artifact_uri: str) -> None:
    conn.execute(sa.update(dataset_versions).where(dataset_versions.c.id == dataset_id)
                 .values(mlflow_artifact_uri=artifact_uri))


# ---------------------------------------------------------------------------------------------- requests
_REQUEST_BY_ID = sa.select(requests).where(requests.c.request_id == sa.bindparam("request_id"))
# What an idempotent retry needs of a stored request, and no more: every column a query returns costs the
# driver (psycopg builds a column description per column per execution) and SQLAlchemy.
_OUTCOME_COLUMNS = (requests.c.request_id, requests.c.payload_digest, requests.c.submitter_hash,
                    requests.c.outcome_job_ids, requests.c.first_event_seq)
_OUTCOME_BY_ID = sa.select(*_OUTCOME_COLUMNS).where(requests.c.request_id == sa.bindparam("request_id"))
_OUTCOMES_BY_IDS = sa.select(*_OUTCOME_COLUMNS).where(requests.c.request_id.in_(sa.bindparam("request_ids",
                                                                                             expanding=True)))
_INSERT_REQUEST = sa.insert(requests)
_SET_FIRST_EVENT_SEQ = (sa.update(requests).where(requests.c.request_id == sa.bindparam("the_request_id"))
                        .values(first_event_seq=sa.bindparam("the_seq")))


def get_request(conn: Connection, request_id: str) -> Row | None:
    return conn.execute(_REQUEST_BY_ID, {"request_id": request_id}).first()


def request_outcome(conn: Connection, request_id: str) -> Row | None:
    """A stored request's request_id, payload_digest, submitter_hash, outcome_job_ids and first_event_seq:
    what an idempotent retry is answered from (intake's idempotency check)."""
    return conn.execute(_OUTCOME_BY_ID, {"request_id": request_id}).first()


def request_outcomes(conn: Connection, request_ids: Sequence[str]) -> dict[str, Row]:
    """:func:`request_outcome` of the stored requests among ``request_ids`` (a group commit's idempotency
    check, one statement)."""
    found: dict[str, Row] = {}
    ids = list(dict.fromkeys(request_ids))
    for start in range(0, len(ids), 500):  # stay below every backend's bound-parameter limit
        found.update((row.request_id, row) for row in conn.execute(_OUTCOMES_BY_IDS,
                                                                   {"request_ids": ids[start:start + 500]}))
    return found


def insert_request(conn: Connection, **values: Any) -> None:
    conn.execute(sa.insert(requests).values(**values))


def insert_requests(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Many request rows, one ``executemany`` (each row names every column :func:`insert_request` takes)."""
    if rows:
        conn.execute(_INSERT_REQUEST, list(rows))


def set_first_event_seqs(conn: Connection, first_seqs: dict[str, int]) -> None:
    """Each request's first event seq (known only once its events are appended, under the log lock)."""
    if first_seqs:
        conn.execute(_SET_FIRST_EVENT_SEQ, [{"the_request_id": request_id, "the_seq": seq}
                                            for request_id, seq in first_seqs.items()])


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


def end_request(conn: Connection, request_id: str, state: str, reason: str) -> None:
    """An operator's cancel or close: the request leaves PENDING (the clock stops) with the reason."""
    conn.execute(sa.update(requests).where(requests.c.request_id == request_id, requests.c.state == "PENDING")
                 .values(state=state, completed_at=utcnow(), state_reason=reason))


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


_INSERT_JOB = sa.insert(jobs)
_INSERT_LINK = sa.insert(job_requests)
_OPEN_JOB = (sa.select(jobs.c.job_id).where(
    jobs.c.model_name == sa.bindparam("model_name"), jobs.c.coalesce_key == sa.bindparam("coalesce_key"),
    jobs.c.state == "QUEUED", jobs.c.window_closes_at > sa.bindparam("now"))
    .order_by(jobs.c.created_at).limit(1).with_for_update())
_ADD_JOB_RECORDS = (sa.update(jobs).where(jobs.c.job_id == sa.bindparam("the_job_id"))
                    .values(records=jobs.c.records + sa.bindparam("added", type_=sa.Integer),
                            updated_at=sa.bindparam("now")))


def insert_jobs(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Many job rows, one ``executemany`` (each row names every column :func:`insert_job` takes, and the
    times)."""
    if rows:
        conn.execute(_INSERT_JOB, list(rows))


def link_request(conn: Connection, job_id: str, request_id: str, attempt: int = 1) -> None:
    conn.execute(sa.insert(job_requests).values(job_id=job_id, request_id=request_id, attempt=attempt))


def link_requests(conn: Connection, links: Sequence[tuple[str, str]]) -> None:
    """(job id, request id) pairs of first attempts, one ``executemany``."""
    if links:
        conn.execute(_INSERT_LINK, [{"job_id": job_id, "request_id": request_id, "attempt": 1}
                                    for job_id, request_id in links])


def add_job_records(conn: Connection, added: dict[str, int], now: datetime) -> None:
    """Add to the matched-record count of jobs that requests just joined (the row is locked by
    :func:`open_job_for`, so the increment is the database's, not read-modify-write)."""
    if added:
        conn.execute(_ADD_JOB_RECORDS, [{"the_job_id": job_id, "added": count, "now": now}
                                        for job_id, count in added.items()])


def unlink_request(conn: Connection, job_id: str, request_id: str) -> None:
    conn.execute(sa.delete(job_requests).where(job_requests.c.job_id == job_id,
                                               job_requests.c.request_id == request_id))


def request_attempts(conn: Connection, request_id: str) -> list[tuple[str, int]]:
    """(job id, attempt) of every job that served the request, in attempt order."""
    rows = conn.execute(sa.select(job_requests.c.job_id, job_requests.c.attempt)
                        .where(job_requests.c.request_id == request_id)
                        .join(jobs, jobs.c.job_id == job_requests.c.job_id)
                        .order_by(job_requests.c.attempt, jobs.c.created_at))
    return [(row.job_id, int(row.attempt)) for row in rows]


def open_job_for(conn: Connection, model_name: str, coalesce_key: str, now: datetime) -> str | None:
    """A QUEUED job of this model and key whose coalescing window is still open, if any, locked for this
    transaction (``FOR UPDATE``: a claim taking it waits, or skips it, until the request is linked; a claim
    that took it first made it RUNNING, and READ COMMITTED's re-check then drops it from the result). Call
    under :func:`lock_coalescing` for the same key."""
    return conn.execute(_OPEN_JOB, {"model_name": model_name, "coalesce_key": coalesce_key, "now": now}).scalar()


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


def claim_candidates(conn: Connection, now: datetime, job_id: str | None = None, limit: int = 8) -> list[Row]:
    """Jobs a worker may claim now, oldest first, locked ``FOR UPDATE SKIP LOCKED`` (rows another claimer or
    an intake holds are skipped, not waited for):

    - QUEUED jobs whose coalescing window has closed, of a model with no RUNNING job and no older QUEUED job
      (a lineage runs its jobs in arrival order);
    - RUNNING jobs whose lease has expired (their holder died or lost contact): reclaimed.

    ``job_id`` restricts the search to one job (``lethe worker --once --job-id``).
    """
    running = sa.select(jobs.c.model_name).where(jobs.c.state == "RUNNING").scalar_subquery()
    # Arrival order per lineage (erasures, updates, rectifications alike): a job waits while an older job of
    # its model is still queued, whatever their coalescing windows.
    older = jobs.alias("older")
    older_queued = sa.exists().where(older.c.model_name == jobs.c.model_name, older.c.state == "QUEUED",
                                     older.c.created_at < jobs.c.created_at)
    runnable = sa.and_(jobs.c.state == "QUEUED", jobs.c.window_closes_at <= now, jobs.c.model_name.not_in(running),
                       ~older_queued)
    expired = sa.and_(jobs.c.state == "RUNNING",
                      sa.or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at <= now))
    query = sa.select(jobs).where(sa.or_(runnable, expired))
    if job_id is not None:
        query = query.where(jobs.c.job_id == job_id)
    query = query.order_by(jobs.c.created_at).limit(limit).with_for_update(skip_locked=True)
    return list(conn.execute(query))


def lock_lineage(conn: Connection, model_name: str) -> bool:
    """Lock the model's row for this transaction (the lineage lock a claim holds while it checks that no job
    of the model is RUNNING); False when another claimer holds it (skipped, never waited for)."""
    return conn.execute(sa.select(models.c.model_name).where(models.c.model_name == model_name)
                        .with_for_update(skip_locked=True)).first() is not None


def lineage_running(conn: Connection, model_name: str) -> bool:
    return conn.execute(sa.select(jobs.c.job_id).where(jobs.c.model_name == model_name,
                                                       jobs.c.state == "RUNNING").limit(1)).first() is not None


def lock_job(conn: Connection, job_id: str) -> Row | None:
    """The job's row, locked for this transaction (the fence of a lease holder's writes)."""
    return conn.execute(sa.select(jobs).where(jobs.c.job_id == job_id).with_for_update()).first()


def take_lease(conn: Connection, job_id: str, owner: str, expires_at: datetime, **values: Any) -> None:
    update_job(conn, job_id, lease_owner=owner, lease_expires_at=expires_at, **values)


def renew_lease(conn: Connection, job_id: str, owner: str, attempt: int, expires_at: datetime) -> bool:
    """Extend a lease its holder still has (same owner and attempt, job still RUNNING); False once lost."""
    result = conn.execute(sa.update(jobs).where(
        jobs.c.job_id == job_id, jobs.c.lease_owner == owner, jobs.c.attempts == attempt,
        jobs.c.state == "RUNNING").values(lease_expires_at=expires_at))
    return result.rowcount == 1


def hand_over_lease(conn: Connection, job_id: str, from_owner: str, attempt: int, to_owner: str,
                    expires_at: datetime) -> bool:
    """A worker takes over the lease an executor holds while it starts that worker (same attempt)."""
    result = conn.execute(sa.update(jobs).where(
        jobs.c.job_id == job_id, jobs.c.lease_owner == from_owner, jobs.c.attempts == attempt,
        jobs.c.state == "RUNNING").values(lease_owner=to_owner, lease_expires_at=expires_at, updated_at=utcnow()))
    return result.rowcount == 1


def expire_lease(conn: Connection, job_id: str, owner: str, attempt: int) -> bool:
    """Give a lease up at once (its holder is known to be gone): the job is reclaimable now."""
    result = conn.execute(sa.update(jobs).where(
        jobs.c.job_id == job_id, jobs.c.lease_owner == owner, jobs.c.attempts == attempt,
        jobs.c.state == "RUNNING").values(lease_expires_at=None))
    return result.rowcount == 1


def release_claim(conn: Connection, job_id: str, owner: str, attempt: int) -> bool:
    """Undo a claim whose worker never started (the executor could not launch it): QUEUED again, the
    attempt not counted, so an outage of the launcher does not use up the job's attempts."""
    result = conn.execute(sa.update(jobs).where(
        jobs.c.job_id == job_id, jobs.c.lease_owner == owner, jobs.c.attempts == attempt,
        jobs.c.state == "RUNNING").values(state="QUEUED", attempts=attempt - 1, lease_owner=None,
                                          lease_expires_at=None, updated_at=utcnow()))
    return result.rowcount == 1


def running_leases(conn: Connection) -> list[Row]:
    """(job_id, lease_owner, lease_expires_at) of every RUNNING job."""
    return list(conn.execute(sa.select(jobs.c.job_id, jobs.c.lease_owner, jobs.c.lease_expires_at)
                             .where(jobs.c.state == "RUNNING")))


def next_window_close(conn: Connection, after: datetime | None = None) -> datetime | None:
    """The earliest coalescing window of a QUEUED job that closes after ``after`` (any, when None)."""
    query = sa.select(sa.func.min(jobs.c.window_closes_at)).where(jobs.c.state == "QUEUED")
    if after is not None:
        query = query.where(jobs.c.window_closes_at > after)
    return as_utc(conn.execute(query).scalar())


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
_INSERT_EVENTS = sa.insert(events).returning(events.c.seq, sort_by_parameter_order=True)
_INSERT_EVENT_REQUESTS = sa.insert(event_requests)


def add_event(conn: Connection, job_id: str, request_ids: Sequence[str], kind: str, state: str, stage: str,
              fraction: float, message: str, certificate_id: str | None = None) -> int:
    return add_events(conn, [{"job_id": job_id, "request_ids": list(request_ids), "kind": kind, "state": state,
                              "stage": stage, "fraction": fraction, "message": message,
                              "certificate_id": certificate_id}])[0]


def add_events(conn: Connection, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Append events (dicts of :func:`add_event`'s arguments) with one multi-row INSERT; their seqs, in order."""
    if not rows:
        return []
    lock_log(conn)  # seq values commit in increasing order (module docstring)
    now = utcnow()
    seqs = [int(seq) for seq in conn.execute(_INSERT_EVENTS, [{"time": now, **row} for row in rows]).scalars()]
    links = [{"seq": seq, "request_id": request_id} for seq, row in zip(seqs, rows) for request_id in row["request_ids"]]
    if links:
        conn.execute(_INSERT_EVENT_REQUESTS, links)
    return seqs


_EVENTS_AFTER = (sa.select(events).where(events.c.seq > sa.bindparam("after_seq")).order_by(events.c.seq)
                 .limit(sa.bindparam("limit", type_=sa.Integer)))


def events_after(conn: Connection, after_seq: int, job_ids: Sequence[str], request_ids: Sequence[str],
                 limit: int = 1000) -> list[Row]:
    if not (job_ids or request_ids):  # every event (the event feed's read): the statement built once
        return list(conn.execute(_EVENTS_AFTER, {"after_seq": after_seq, "limit": limit}))
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
_AUDIT_TAIL = sa.select(audit_log.c.seq, audit_log.c.entry_hash).order_by(audit_log.c.seq.desc()).limit(1)
_INSERT_AUDIT = sa.insert(audit_log)


def audit_tail(conn: Connection) -> tuple[int, str] | None:
    """The chain's last (seq, hash). Appenders call it under :func:`lock_log` (AuditLog.append does)."""
    row = conn.execute(_AUDIT_TAIL).first()
    return (row.seq, row.entry_hash) if row else None


def insert_audit_entries(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Chain entries (seq, prev_hash, body_json, entry_hash, signature), one ``executemany``."""
    if rows:
        conn.execute(_INSERT_AUDIT, list(rows))


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
    if fresh:  # a record id in two models' data may be erased by two concurrent jobs: first one wins
        now = utcnow()
        conn.execute(_insert_ignoring_duplicates(conn, tombstones),
                     [{"record_hash": h, "model_name": model_name, "job_id": job_id, "created_at": now}
                      for h in fresh])


def tombstoned(conn: Connection, record_hashes: Sequence[str]) -> set[str]:
    found: set[str] = set()
    hashes = list(record_hashes)
    for start in range(0, len(hashes), 500):  # stay below every backend's bound-parameter limit
        chunk = hashes[start:start + 500]
        found.update(conn.execute(sa.select(tombstones.c.record_hash)
                                  .where(tombstones.c.record_hash.in_(chunk))).scalars())
    return found


# ------------------------------------------------------------------------------------------ record index
INDEX_CHUNK = 5000  # rows per INSERT: well under every backend's bound-parameter limit (4 columns each)


def index_dataset(conn: Connection, dataset_id: int, rows: Iterable[dict[str, Any]]) -> bool:
    """Insert a dataset version's index rows and mark it indexed; False (nothing written) when another
    process indexed it first or it was removed meanwhile. Rows: record_hash, subject_hash, label."""
    row = conn.execute(sa.select(dataset_versions.c.indexed_at, dataset_versions.c.removed_at)
                       .where(dataset_versions.c.id == dataset_id).with_for_update()).first()
    if row is None or row.indexed_at is not None or row.removed_at is not None:
        return False
    batch: list[dict[str, Any]] = []
    for values in rows:
        batch.append({"dataset_id": dataset_id, **values})
        if len(batch) >= INDEX_CHUNK:
            conn.execute(_insert_ignoring_duplicates(conn, record_index), batch)
            batch = []
    if batch:
        conn.execute(_insert_ignoring_duplicates(conn, record_index), batch)
    conn.execute(sa.update(dataset_versions).where(dataset_versions.c.id == dataset_id).values(indexed_at=utcnow()))
    return True


def indexed_matches(conn: Connection, dataset_ids: Sequence[int], subject_hashes: Sequence[str],
                    record_hashes: Sequence[str], classes: Sequence[int]) -> dict[int, int]:
    """Per dataset version: how many of its records a request names (its subjects', its record ids, its
    classes), counted on the index; versions with no match are absent."""
    if not dataset_ids or not (subject_hashes or record_hashes or classes):
        return {}
    statement = _indexed_matches_statement(bool(subject_hashes), bool(record_hashes), bool(classes))
    rows = conn.execute(statement, {"dataset_ids": list(dataset_ids), "subject_hashes": list(subject_hashes),
                                    "record_hashes": list(record_hashes), "classes": list(classes)})
    return {int(dataset_id): int(count) for dataset_id, count in rows}


@functools.cache
def _indexed_matches_statement(subjects: bool, records: bool, classes: bool) -> sa.Select:
    """:func:`indexed_matches`'s query for one combination of selectors, built once."""
    return (sa.select(record_index.c.dataset_id, sa.func.count())
            .where(record_index.c.dataset_id.in_(sa.bindparam("dataset_ids", expanding=True)),
                   _index_selector(subjects, records, classes))
            .group_by(record_index.c.dataset_id))


def _index_selector(subjects: bool, records: bool, classes: bool) -> sa.ColumnElement[bool]:
    """Index rows a request names: any of its subjects, record ids or classes (bound when executed); none
    when it names none of them."""
    selectors = []
    if subjects:
        selectors.append(record_index.c.subject_hash.in_(sa.bindparam("subject_hashes", expanding=True)))
    if records:
        selectors.append(record_index.c.record_hash.in_(sa.bindparam("record_hashes", expanding=True)))
    if classes:
        selectors.append(record_index.c.label.in_(sa.bindparam("classes", expanding=True)))
    return sa.or_(*selectors) if selectors else sa.false()


def seconds_ago(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


# ----------------------------------------------------------------------------------------- sealed sets
def sealed_set(conn: Connection, job_id: str, request_id: str) -> Row | None:
    return conn.execute(sa.select(sealed_sets).where(sealed_sets.c.job_id == job_id,
                                                     sealed_sets.c.request_id == request_id)).first()


def insert_sealed_set(conn: Connection, **values: Any) -> None:
    conn.execute(sa.insert(sealed_sets).values(**values))


def update_sealed_set(conn: Connection, job_id: str, request_id: str, **values: Any) -> None:
    conn.execute(sa.update(sealed_sets).where(sealed_sets.c.job_id == job_id,
                                              sealed_sets.c.request_id == request_id).values(**values))


def lineage_sealed_sets(conn: Connection, model_name: str) -> list[Row]:
    """The sealed sets of the erasures on ``model_name``'s lineage, oldest first: those of jobs whose model
    version was registered (``result_version`` set: succeeded, or failed after registering)."""
    return list(conn.execute(sa.select(sealed_sets)
                             .join(jobs, jobs.c.job_id == sealed_sets.c.job_id)
                             .where(sealed_sets.c.model_name == model_name, jobs.c.result_version.is_not(None))
                             .order_by(sealed_sets.c.created_at, sealed_sets.c.request_id)))


def sealed_sets_to_destroy(conn: Connection, now: datetime, ended_states: Sequence[str],
                           model_name: str | None = None) -> list[Row]:
    """Sealed sets whose key still exists although their window has ended, or whose job ended
    (``ended_states``) without registering a version, so erased nothing; of one model when ``model_name`` is
    given."""
    never_registered = sa.and_(jobs.c.state.in_(list(ended_states)), jobs.c.result_version.is_(None))
    query = (sa.select(sealed_sets, jobs.c.state.label("job_state"))
             .join(jobs, jobs.c.job_id == sealed_sets.c.job_id, isouter=True)
             .where(sealed_sets.c.destroyed_at.is_(None),
                    sa.or_(sealed_sets.c.expires_at <= now, never_registered, jobs.c.job_id.is_(None))))
    if model_name is not None:
        query = query.where(sealed_sets.c.model_name == model_name)
    return list(conn.execute(query.order_by(sealed_sets.c.expires_at)))


def destroy_sealed_key(conn: Connection, job_id: str, request_id: str, now: datetime, reason: str) -> bool:
    """Overwrite the key with NULL and mark the set destroyed; False when another process did it first."""
    result = conn.execute(sa.update(sealed_sets).where(
        sealed_sets.c.job_id == job_id, sealed_sets.c.request_id == request_id,
        sealed_sets.c.destroyed_at.is_(None)).values(wrapped_key=None, destroyed_at=now, destroyed_reason=reason))
    return result.rowcount == 1


def destroyed_sealed_sets_since(conn: Connection, since: datetime) -> list[Row]:
    """Sets destroyed since ``since`` (their ciphertext copies are deleted again by housekeeping)."""
    return list(conn.execute(sa.select(sealed_sets).where(sealed_sets.c.destroyed_at >= since,
                                                          sealed_sets.c.path.is_not(None))))
