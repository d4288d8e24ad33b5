"""The engine behind :class:`service.domain.EngineProtocol`: it assembles the parts and delegates.

A request's path, one module per concern (DESIGN.md, "Embedded default and scale-out"):

- :mod:`service.registration`: make an MLflow model version unlearnable (``register_model``);
- :mod:`service.intake`: validate, resolve, commit durably, acknowledge (``submit_erasure``);
- :mod:`service.scheduler`: claims, leases, per-lineage order, recovery by lease expiry;
- :mod:`service.executors`: where a claimed job runs (``LETHE_EXECUTOR``: in-process worker threads by
  default, a ``lethe worker`` subprocess, a Kubernetes Job, or external ``lethe worker`` processes);
- :mod:`service.pipeline`: one job, resolve -> measure -> apply -> verify -> register -> purge -> audit;
- :mod:`service.queries`: jobs, events, certificates, the pending requests' clock.
"""

from __future__ import annotations

import logging
import secrets
import threading

from service import store as db
from service.audit import AuditLog
from service.context import PipelineContext
from service.controls import RequestControls
from service.datasets import DatasetCatalog
from service.domain import (
    Certificate,
    CertificateCheck,
    ErasureRequest,
    JobEvent,
    JobFilter,
    JobView,
    ModelRegistration,
    PendingRequest,
    RectificationSubmission,
    RegisteredModel,
    RequestView,
    RetryOutcome,
    RetryRequest,
    SubmitOutcome,
    UpdateSubmission,
)
from service.executors import build_executor
from service.housekeeping import delete_removed_copies, purge_superseded
from service.intake import Intake
from service.update_intake import UpdateIntake
from service.loaded_models import LoadedModels
from service.metrics import Metrics
from service.mlflow_registry import MlflowRegistry
from service.pipeline import STAGES
from service.prefetch import ImportancePrefetcher
from service.queries import Queries
from service.record_index import index_serving
from service.registration import Registrar
from service.scheduler import Scheduler
from service.sealed import shred_expired
from service.settings import Settings
from service.store_metrics import StoreCollector
from unlearn.device import resolve_device

log = logging.getLogger(__name__)
HOUSEKEEPING_S = 60.0


class Engine:
    """Implements :class:`service.domain.EngineProtocol` from its parts (see the module docstring)."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = db.Store(self.settings.job_store_url)
        self.audit = AuditLog(self.settings.audit_key_bytes)
        self.catalog = DatasetCatalog(self.settings.datasets_dir, self.settings.subject_hash_key_bytes,
                                      fetch_missing=self._fetch_dataset)
        self._stopping = threading.Event()
        self.queries = Queries(None, self._stopping)  # context set below: the metrics read the pending clock
        self.metrics = Metrics(self.queries.oldest_pending_age_s, self.queries.overdue_pending_count)
        self.metrics.registry.register(StoreCollector(self.store, self.settings.audit_key_bytes, STAGES))
        self.registry = MlflowRegistry(self.settings.mlflow_tracking_uri, self.settings.mlflow_artifact_root,
                                       self.settings.mlflow_experiment, self.settings.serving_alias)
        self.context = PipelineContext(self.settings, self.store, self.registry, self.catalog, self.audit,
                                       self.metrics, resolve_device(self.settings.device),
                                       LoadedModels(self.settings.loaded_models))
        self.queries.attach(self.context)
        self.registrar = Registrar(self.context)
        self.intake = Intake(self.context)
        self.update_intake = UpdateIntake(self.context)
        self.controls = RequestControls(self.context, self.intake)
        # One identity per engine instance in every lease it takes: the configured worker id (the pod name
        # in the chart) plus a random suffix, so two engines of one process never share a lease.
        self.owner = f"{self.settings.worker_id}/{secrets.token_hex(3)}"
        self.scheduler = Scheduler(self.context, self.owner)
        # I_D is precomputed where jobs run and read it from the local cache: in-process workers only (a
        # replica dispatching to pods or to a worker pool has no use for it; `lethe worker` runs in-process).
        self.prefetcher = ImportancePrefetcher(self.context) if self.settings.executor == "inprocess" else None
        self.executor = build_executor(self.scheduler, self._stopping, self.prefetcher)

    def _housekeeping(self) -> None:
        """Every HOUSEKEEPING_S: :mod:`service.housekeeping` (superseded versions; this host's copies of
        removed ones) and :func:`service.sealed.shred_expired` (sealed-set keys past their window)."""
        while not self._stopping.wait(HOUSEKEEPING_S):
            try:
                purge_superseded(self.context)
                delete_removed_copies(self.context)
                shred_expired(self.context)
            except Exception:  # the store may be unreachable for a while; next round
                log.exception("housekeeping failed")

    def _fetch_dataset(self, recorded_path: str, local_path) -> None:
        """A dataset version another host wrote: download its MLflow copy (workers on other hosts)."""
        with self.store.read() as conn:
            row = db.dataset_by_path(conn, recorded_path)
            staged = db.staged_artifact_for(conn, recorded_path) if row is None else None
        if staged:  # an update's staged records
            self.registry.download_artifact(staged, local_path)
            return
        if row is None or row.removed_at is not None:
            raise FileNotFoundError(f"no live dataset version recorded at {recorded_path}")
        self.registry.download_artifact(row.mlflow_artifact_uri or "", local_path)

    @property
    def device(self):
        return self.context.device

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start executing jobs. Nothing is re-queued here: a job a dead process left RUNNING is reclaimed
        when its lease expires (at once on SQLite, whose liveness locks show the holder is gone)."""
        self._stopping.clear()
        self.executor.start()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="lethe-housekeeping", daemon=True)
        self._housekeeper.start()
        if self.prefetcher is not None:
            self.prefetcher.start()
            with self.store.read() as conn:
                for row in db.list_models(conn):
                    self.prefetcher.schedule(row.model_name)

    def stop(self, grace_s: float = 30.0) -> bool:
        """Stop taking jobs and wait up to ``grace_s`` for running ones; True when all ended.

        A job still running after the grace period keeps its lease while this process lives; once the
        process is gone the lease lapses and another worker (or the next start) resumes the job from the
        store (its stages are idempotent), so stopping never loses work.
        """
        self._stopping.set()
        self.store.wake()
        if self.prefetcher is not None:
            self.prefetcher.stop()
        return self.executor.stop(grace_s)

    # ---------------------------------------------------------------------------------- EngineProtocol
    def register_model(self, registration: ModelRegistration) -> RegisteredModel:
        registered = self.registrar.register_model(registration)
        index_serving(self.context, registered.model_name)  # intake resolves its requests on the index
        if self.prefetcher is not None:
            self.prefetcher.schedule(registered.model_name)  # the first request on it pays only its forget set
        return registered

    def submit_erasure(self, request: ErasureRequest) -> SubmitOutcome:
        return self.intake.submit_erasure(request)

    def submit_update(self, request: UpdateSubmission) -> SubmitOutcome:
        return self.update_intake.submit_update(request)

    def submit_rectification(self, request: RectificationSubmission) -> SubmitOutcome:
        return self.update_intake.submit_rectification(request)

    def get_job(self, job_id: str) -> JobView:
        return self.queries.get_job(job_id)

    def list_jobs(self, job_filter: JobFilter) -> list[JobView]:
        return self.queries.list_jobs(job_filter)

    def events(self, after_seq: int = 0, job_ids: tuple[str, ...] = (), request_ids: tuple[str, ...] = (),
               wait_s: float = 0.0) -> list[JobEvent]:
        return self.queries.events(after_seq, job_ids, request_ids, wait_s)

    def last_event_seq(self) -> int:
        return self.queries.last_event_seq()

    def get_certificate(self, request_id: str) -> list[Certificate]:
        return self.queries.get_certificate(request_id)

    def verify_certificate(self, body_json: str, signature: str) -> CertificateCheck:
        return self.queries.verify_certificate(body_json, signature)

    def pending_requests(self) -> list[PendingRequest]:
        return self.queries.pending_requests()

    def request_owners(self, request_ids: tuple[str, ...]) -> dict[str, str | None]:
        return self.queries.request_owners(request_ids)

    # ------------------------------------------------------------------------------ operator controls
    def get_request(self, request_id: str) -> RequestView:
        return self.controls.get_request(request_id)

    def cancel_request(self, request_id: str, reason: str) -> RequestView:
        return self.controls.cancel_request(request_id, reason)

    def retry_request(self, retry: RetryRequest) -> RetryOutcome:
        outcome = self.controls.retry_request(retry)
        self.store.wake()  # the new job may run at once
        return outcome

    def close_request(self, request_id: str, reason: str) -> RequestView:
        return self.controls.close_request(request_id, reason)
