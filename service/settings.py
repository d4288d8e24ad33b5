"""Lethe's one settings object: every knob of the front and the engine, read from ``LETHE_*`` variables.

The defaults give the embedded mode of DESIGN.md ("Embedded default and scale-out"): one process, a state
directory (``./.lethe``) holding the SQLite job store, MLflow's SQLite backend and artifact directory, the
key files and the caches. Scale-out changes only configuration: point ``LETHE_JOB_STORE_URL`` at
PostgreSQL and ``LETHE_MLFLOW_TRACKING_URI`` at a tracking server. The Helm chart uses these environment
variable names verbatim.

Unknown keyword arguments in code are an error (``extra="forbid"``), as STYLE.md asks of configuration;
unknown ``LETHE_`` environment variables are ignored, because pydantic-settings only reads declared ones.
"""

from __future__ import annotations

import json
import hashlib
import hmac
import os
import secrets
import socket
import subprocess
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

KEY_BYTES = 32  # HMAC-SHA256 keys: 256 bits, the hash's own block strength
RESERVED_GRPC_WORKERS = 4
"""gRPC server threads that streams may never take: kept for unary calls and health checks (see
``Settings.grpc_max_workers``). Four covers a probe, a metrics-minded operator and a couple of unary
submissions at once; unary calls last milliseconds, so a handful of threads serves many of them."""


def stream_budgets(grpc_max_workers: int) -> tuple[int, int]:
    """(Session streams, other streams) one replica serves at once: the threads left after the unary reserve,
    a quarter (at least one) for the short-lived streams (``WatchJob``, server reflection, health ``Watch``)
    and the rest for the long-lived ``Session`` streams. Separate budgets: a replica whose Sessions are at
    their cap still answers a ``WatchJob`` or a reflection query from a new client."""
    streams = grpc_max_workers - RESERVED_GRPC_WORKERS
    others = max(1, streams // 4)
    return streams - others, others


def _default_code_version() -> str:
    """``lethe <package version>+g<commit>`` so a certificate names the exact code that produced it."""
    try:
        from importlib.metadata import version

        package = version("lethe")
    except Exception:  # running from a tree that is not installed
        package = "0+unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"lethe {package}+g{commit}" if commit else f"lethe {package}"


class Settings(BaseSettings):
    """Configuration of the Lethe service (front and engine). Each field is a ``LETHE_<NAME>`` variable."""

    model_config = SettingsConfigDict(env_prefix="LETHE_", extra="forbid", validate_default=True)

    state_dir: Path = Path(".lethe")
    """Directory of the embedded mode's state: job store, MLflow database and artifacts, keys, datasets,
    caches. Created on first use."""

    mlflow_tracking_uri: str | None = None
    """MLflow tracking and registry URI. Default ``sqlite:///<state_dir>/mlflow.db`` (embedded); set an
    ``http(s)://`` tracking server for scale-out."""

    mlflow_artifact_root: str | None = None
    """Where Lethe's MLflow experiment stores artifacts (models, dataset copies). Default
    ``<state_dir>/mlartifacts`` in the embedded mode; with an ``http(s)://`` tracking server, the server's
    default (``mlflow-artifacts:/...`` when it runs with ``--serve-artifacts``, so every artifact is written,
    read and deleted through the server, never a local disk). Ignored when the experiment already exists."""

    mlflow_experiment: str = "lethe"
    """MLflow experiment holding Lethe's unlearning runs and registrations."""

    job_store_url: str | None = None
    """SQLAlchemy URL of the durable job store. Default ``sqlite:///<state_dir>/lethe.db`` (WAL mode);
    ``postgresql+psycopg://...`` for scale-out."""

    grpc_host: str = "127.0.0.1"
    """Address the gRPC server binds (``0.0.0.0`` in a container)."""

    grpc_port: int = Field(50051, ge=0, le=65535)
    """gRPC port (0 picks a free port, for tests)."""

    grpc_max_workers: int = Field(32, ge=RESERVED_GRPC_WORKERS + 2, le=4096)
    """Threads serving RPCs (``LETHE_GRPC_MAX_WORKERS``). Each open stream (``Session``, ``WatchJob``, health
    ``Watch``, reflection) holds one thread for its whole life, which can be hours; a unary call holds one for
    milliseconds. Open streams are therefore capped at this number minus ``RESERVED_GRPC_WORKERS`` (4), split
    into two budgets (:func:`stream_budgets`: three quarters for ``Session`` streams, the rest for the others,
    so a replica full of Sessions still serves ``WatchJob`` and reflection), and a stream over its budget is
    refused at once with RESOURCE_EXHAUSTED (clients back off or use another replica). Why a reserve: gRPC queues a call that finds no free thread, so a pool filled with streams
    would queue the Kubernetes health probe behind them; the probe would time out and the kubelet would
    restart a replica that was merely busy, dropping every stream it held. Size it to the concurrent
    data-governance streams one replica should carry plus the reserve; scale out with replicas beyond that
    (each thread costs a stack, about 8 MiB of virtual memory, little resident)."""

    metrics_port: int = Field(9464, ge=0, le=65535)
    """Port of the Prometheus ``/metrics`` exporter; 0 turns the exporter off."""

    metrics_host: str = "127.0.0.1"
    """Address the metrics exporter binds (``0.0.0.0`` in a container)."""

    auth_token: SecretStr | None = None
    """A single bearer token with every role (embedded mode). With neither it nor ``auth_tokens_file`` set
    there is no authentication at all (embedded, local only); with either set, every call but health checks
    must present a valid credential."""

    max_ids_per_request: int = Field(10000, ge=1)
    """Most subject or record ids one request may carry (larger requests are INVALID_ARGUMENT)."""

    max_id_length: int = Field(256, ge=1, le=4096)
    """Longest accepted id, in characters (request ids, subject ids, record ids)."""

    coalescing_window_s: float = Field(2.0, ge=0.0, le=3600.0)
    """Erasures for one model arriving within this many seconds of the first become ONE job over the
    union of their records. 0 = no coalescing (every request its own job)."""

    worker_threads: int = Field(1, ge=1, le=64)
    """In-process job workers. Jobs of one model lineage always run one at a time; more threads only let
    different models progress in parallel."""

    loaded_models: int = Field(4, ge=0, le=64)
    """Model versions a worker process keeps in memory after a job used or registered them, so the next job
    on the lineage does not load its base version from MLflow again (:mod:`service.loaded_models`; each is
    checked against its weights digest when taken). 0 = always load from MLflow."""

    serving_alias: str = "serving"
    """MLflow alias that marks the version to serve; moved only when verification passes."""

    audit_key: SecretStr | None = None
    """HMAC-SHA256 key (hex) signing the audit chain and certificates. Unset: generated once into
    ``<state_dir>/keys/audit.key`` (mode 0600)."""

    subject_hash_key: SecretStr | None = None
    """HMAC-SHA256 key (hex) for keyed hashes of subject ids, payload digests and tombstones, so no
    subject id is ever stored in clear. Unset: generated once into ``<state_dir>/keys/subject-hash.key``."""

    device: str = "auto"
    """Torch device for unlearning jobs: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

    code_version: str = Field(default_factory=_default_code_version)
    """Code version written into every certificate and model version tag. Default: package version and
    git commit when available; the container image sets it to the image tag."""

    max_inline_update_rows: int = Field(1000, ge=1, le=100_000)
    """Most records an update or rectification may carry inline (``records``); larger updates come as a
    Parquet ``dataset_uri`` (bounded by ``max_update_rows``). Inline rows travel in one gRPC message."""

    max_update_rows: int = Field(100_000, ge=1)
    """Most records one update may bring from a Parquet ``dataset_uri``."""

    # ------------------------------------------------------------------------------------- scale-out
    executor: Literal["inprocess", "subprocess", "kubernetes", "external"] = "inprocess"
    """Where a claimed job runs: ``inprocess`` (worker threads of this process, the embedded default),
    ``subprocess`` (each job in a fresh ``lethe worker --once --job-id ID`` process: the same contract as a
    Kubernetes Job), ``kubernetes`` (one ``batch/v1`` Job per unlearning job, on GPU nodes) or ``external``
    (this process runs no job: a pool of ``lethe worker`` processes, e.g. a Deployment, claims them from the
    shared job store). ``subprocess`` and ``kubernetes`` run at most ``worker_threads`` jobs at once per
    process."""

    job_lease_s: float = Field(60.0, ge=1.0, le=3600.0)
    """How long a worker's claim on a job lasts without a heartbeat. The holder renews it every third of
    this; a worker that dies stops renewing, the lease expires and another worker reclaims the job (crash
    recovery by lease expiry, safe with any number of processes)."""

    job_max_attempts: int = Field(3, ge=1, le=100)
    """Claims of one job before it is marked FAILED: a job that kills its worker this often (out of
    memory, a poisoned input) stops being retried forever."""

    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", min_length=1,
                           max_length=120)
    """Identity of this process in job leases and logs. Default ``<hostname>-<pid>``; the chart sets the
    pod name. Each engine adds a random suffix (``<worker_id>/<6 hex>``) so leases never collide."""

    kubernetes_namespace: str = "default"
    """Namespace the ``kubernetes`` executor creates its Jobs in (the chart sets its release namespace)."""

    kubernetes_image: str = "lethe:dev"
    """Container image of the unlearning Jobs (the same image as the API, entry point ``lethe worker``)."""

    kubernetes_service_account: str | None = None
    """Service account of the Job pods (needs no Kubernetes API rights; talks to the job store and MLflow)."""

    kubernetes_gpu_count: int = Field(1, ge=0, le=16)
    """``nvidia.com/gpu`` limit of each Job pod; 0 runs jobs on CPU nodes."""

    kubernetes_node_selector: dict[str, str] = Field(default_factory=dict)
    """Node selector of the Job pods, as JSON (e.g. ``{"nvidia.com/gpu.present": "true"}``)."""

    kubernetes_tolerations: list[dict[str, Any]] = Field(default_factory=list)
    """Tolerations of the Job pods, as a JSON list of Kubernetes toleration objects (GPU node taints)."""

    kubernetes_priority_class: str | None = None
    """PriorityClass of the Job pods (unset: the cluster default)."""

    kubernetes_cpu: str = "2"
    """CPU request and limit of a Job pod (a Kubernetes quantity string)."""

    kubernetes_memory: str = "8Gi"
    """Memory request and limit of a Job pod (a Kubernetes quantity string)."""

    kubernetes_active_deadline_s: int = Field(6 * 3600, ge=60)
    """``activeDeadlineSeconds`` of a Job: a job running longer is killed and its lease expires."""

    kubernetes_ttl_after_finished_s: int = Field(3600, ge=0)
    """``ttlSecondsAfterFinished``: finished Jobs (and their pods and logs) are garbage-collected after this."""

    kubernetes_backoff_limit: int = Field(2, ge=0, le=20)
    """``backoffLimit`` of a Job: pod retries for retryable failures (disruptions are ignored by the pod
    failure policy; the worker's non-retryable exit code fails the Job at once)."""

    kubernetes_env_secret: str | None = None
    """Name of a Secret whose keys become environment variables of the Job pods (``envFrom``): the job store
    URL, the keys and MLflow credentials, never written into the Job spec itself."""

    # -------------------------------------------------------------------------------------- security
    tls_cert: Path | None = None
    """PEM certificate chain this process presents. The server (with ``tls_key``) then speaks TLS only on its
    gRPC port, and re-reads the files when they change (cert-manager rotation) without a restart: the next
    TLS handshake uses the new pair. Client commands (``lethe submit``, ``lethe health``...) present it as
    their client certificate when the server asks for one (mutual TLS), so a pod's own certificate serves its
    exec probe."""

    tls_key: Path | None = None
    """PEM private key of ``tls_cert`` (both or neither)."""

    tls_client_ca: Path | None = None
    """PEM CA bundle for mutual TLS: when set, clients must present a certificate signed by it, or the TLS
    handshake fails before any RPC. Re-read on change like the certificate. The server refuses to start with
    it but without ``tls_cert`` (it would otherwise serve plaintext); clients use it as their trust root when
    ``tls_ca`` is unset."""

    tls_ca: Path | None = None
    """PEM CA bundle that CLIENTS (the CLI, ``lethe health``) use to verify the server's certificate. Unset:
    ``tls_client_ca`` when that is set (one CA for both sides, cert-manager's usual ``ca.crt``), else the
    system roots. Setting it (or ``tls_cert``) makes client commands connect with TLS."""

    auth_tokens_file: Path | None = None
    """File of scoped credentials, one per line: ``<roles> <name> <credential>``, ``#`` starts a comment.
    ``roles`` is one or more of ``submitter``, ``auditor``, ``operator`` joined by commas; ``name`` is the
    identity (no spaces) that owns the requests it submits; ``credential`` is ``sha256:<hex of the token>``
    (a bearer token, stored hashed: ``lethe token`` prints a fresh one with its line) or
    ``x509-cn:<common name>`` (a mutual-TLS client certificate's subject CN). Several lines may share a name
    and roles (rotation: add the new token, move clients, delete the old line). Re-read when the file
    changes. ``auth_token`` (a single all-roles token) may be set beside it for the embedded mode."""

    rate_limit_per_s: float = Field(200.0, ge=0.0)
    """Calls and Session messages one identity may make per second, sustained (a token bucket; 0 = no
    limit). Over the limit a call answers RESOURCE_EXHAUSTED with ``google.rpc.RetryInfo`` saying when to
    retry (on a stream: a ``SubmissionRejected`` with ``retry_delay``). Health checks are never limited."""

    rate_limit_burst: int = Field(400, ge=1)
    """Size of each identity's token bucket: how many calls may arrive at once after a quiet period."""

    max_streams_per_identity: int = Field(16, ge=1)
    """Open streams (``Session``, ``WatchJob``) one identity may hold on this replica, so one client cannot
    take every stream slot of ``grpc_max_workers``; RESOURCE_EXHAUSTED with retry info beyond it."""

    max_unacked_messages: int = Field(1000, ge=1)
    """Session submissions read but not yet answered (their ack or rejection still waiting for the client
    to read it). A client that keeps sending without reading gets RESOURCE_EXHAUSTED rejections with a
    retry delay beyond this many, and the server stops reading its stream at twice this many, so a stalled
    reader cannot grow the server's memory. Event delivery waits (back-pressure) rather than buffering more."""

    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    """Largest request message accepted, in bytes (gRPC refuses a larger one with RESOURCE_EXHAUSTED before
    decoding it, so before any database work). 4 MiB holds ``max_ids_per_request`` ids of 256 characters."""

    unary_deadline_s: float = Field(120.0, gt=0.0, le=3600.0)
    """Server-side deadline of every unary call (the client's own deadline applies when shorter). A call
    past it answers DEADLINE_EXCEEDED, but its work may still commit afterwards: clients must replay a
    submission with the same ``request_id`` (idempotent) rather than assume it was dropped."""

    dataset_roots: list[str] = Field(default_factory=list)
    """Where ``RegisterModel`` may read training data, as a JSON list: absolute directories
    (``["/data/training"]``) and URI prefixes (``["s3://bucket/datasets/"]``; the scheme must match).
    ``<state_dir>/incoming`` is always accepted. A dataset URI outside every root is refused without
    touching the file system, with one answer that says nothing about the server's files."""

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        state = self.state_dir.expanduser().absolute()
        object.__setattr__(self, "state_dir", state)
        if self.mlflow_tracking_uri is None:
            object.__setattr__(self, "mlflow_tracking_uri", f"sqlite:///{state / 'mlflow.db'}")
        if self.mlflow_artifact_root is None and not self.mlflow_tracking_uri.startswith(("http://", "https://")):
            object.__setattr__(self, "mlflow_artifact_root", str(state / "mlartifacts"))
        if self.job_store_url is None:
            object.__setattr__(self, "job_store_url", f"sqlite:///{state / 'lethe.db'}")
        return self

    def as_environment(self) -> dict[str, str]:
        """These settings as ``LETHE_*`` variables (secrets included): what a worker process this one starts
        needs to see the same store, MLflow and keys, whatever mix of environment and code built them."""
        environment = {}
        for name, value in self.model_dump().items():
            if value is None or name in ("worker_id", "executor"):  # the worker's own, never inherited
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, (dict, list)):
                value = json.dumps(value)
            environment[f"LETHE_{name.upper()}"] = str(value)
        return environment

    # ------------------------------------------------------------------------------------- derived paths
    @property
    def datasets_dir(self) -> Path:
        """Lethe's own copies of training datasets, one file per dataset version."""
        return self.state_dir / "datasets"

    @property
    def dataset_import_dir(self) -> Path:
        """``<state_dir>/incoming``: a drop box always accepted as a dataset root (see ``dataset_roots``)."""
        return self.state_dir / "incoming"

    @property
    def cache_dir(self) -> Path:
        """Derived state that may be deleted at any time (importance, baseline measurements, ONNX files)."""
        return self.state_dir / "cache"

    @cached_property
    def audit_key_bytes(self) -> bytes:
        return _key_bytes(self.audit_key, self.state_dir / "keys" / "audit.key")

    @cached_property
    def subject_hash_key_bytes(self) -> bytes:
        return _key_bytes(self.subject_hash_key, self.state_dir / "keys" / "subject-hash.key")

    @cached_property
    def split_key_bytes(self) -> bytes:
        """Key of the tune/audit split of never-trained records (:mod:`unlearn.splits`), derived from the
        subject hash key: stable for the life of the deployment, unknown to clients."""
        return hmac.new(self.subject_hash_key_bytes, b"lethe tune/audit split v1", hashlib.sha256).digest()


def _key_bytes(configured: SecretStr | None, path: Path) -> bytes:
    """The configured key, or the key file's, creating it (0600, exclusive create) on first use.

    Exclusive creation makes two processes racing on a fresh state directory agree on one key.
    """
    if configured is not None:
        return bytes.fromhex(configured.get_secret_value())
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(KEY_BYTES))
    return bytes.fromhex(path.read_text().strip())


def load_key(state_dir: str | Path, name: str) -> bytes:
    """Read an embedded key file (``audit`` or ``subject-hash``) for offline tools; never creates one."""
    return bytes.fromhex((Path(state_dir) / "keys" / f"{name}.key").read_text().strip())
