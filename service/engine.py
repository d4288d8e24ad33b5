"""The engine behind :class:`service.domain.EngineProtocol`: it assembles the parts and delegates.

A request's path, one module per concern (DESIGN.md, "Embedded default and scale-out"):

- :mod:`service.registration`: make an MLflow model version unlearnable (``register_model``);
- :mod:`service.intake`: validate, resolve, commit durably, acknowledge (``submit_erasure``);
- :mod:`service.scheduler`: claims, coalescing windows, per-lineage order, recovery;
- :mod:`service.executors`: where a claimed job runs (in-process worker threads by default);
- :mod:`service.pipeline`: one job, resolve -> measure -> apply -> verify -> register -> purge -> audit;
- :mod:`service.queries`: jobs, events, certificates, the pending requests' clock.
"""

from __future__ import annotations

import threading

from service import store as db
from service.audit import AuditLog
from service.context import PipelineContext
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
    RegisteredModel,
    SubmitOutcome,
)
from service.executors import InProcessExecutor
from service.intake import Intake
from service.metrics import Metrics
from service.mlflow_registry import MlflowRegistry
from service.pipeline import STAGES
from service.prefetch import ImportancePrefetcher
from service.queries import Queries
from service.registration import Registrar
from service.scheduler import Scheduler
from service.settings import Settings
from service.store_metrics import StoreCollector
from unlearn.device import resolve_device


class Engine:
    """Implements :class:`service.domain.EngineProtocol` from its parts (see the module docstring)."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = db.Store(self.settings.job_store_url)
        self.audit = AuditLog(self.settings.audit_key_bytes)
        self.catalog = DatasetCatalog(self.settings.datasets_dir, self.settings.subject_hash_key_bytes)
        self._stopping = threading.Event()
        self.queries = Queries(None, self._stopping)  # context set below: the metrics read the pending clock
        self.metrics = Metrics(self.queries.oldest_pending_age_s, self.queries.overdue_pending_count)
        self.metrics.registry.register(StoreCollector(self.store, self.settings.audit_key_bytes, STAGES))
        self.registry = MlflowRegistry(self.settings.mlflow_tracking_uri, self.settings.mlflow_artifact_root,
                                       self.settings.mlflow_experiment, self.settings.serving_alias)
        self.context = PipelineContext(self.settings, self.store, self.registry, self.catalog, self.audit,
                                       self.metrics, resolve_device(self.settings.device))
        self.queries.ctx = self.context
        self.registrar = Registrar(self.context)
        self.intake = Intake(self.context)
        self.scheduler = Scheduler(self.context)
        self.prefetcher = ImportancePrefetcher(self.context)
        self.executor = InProcessExecutor(self.context, self.scheduler, self._stopping, self.prefetcher)

    @property
    def device(self):
        return self.context.device

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Re-queue jobs a dead process left RUNNING, then start executing jobs."""
        self.scheduler.recover()
        self._stopping.clear()
        self.executor.start()
        self.prefetcher.start()
        with self.store.read() as conn:
            for row in db.list_models(conn):
                self.prefetcher.schedule(row.model_name)

    def stop(self, grace_s: float = 30.0) -> bool:
        """Stop taking jobs and wait up to ``grace_s`` for running ones; True when all ended.

        A job still running after the grace period stays RUNNING in the store and is resumed by the next
        :meth:`start` (its stages are idempotent), so stopping never loses work.
        """
        self._stopping.set()
        self.store.wake()
        self.prefetcher.stop()
        return self.executor.stop(grace_s)

    # ---------------------------------------------------------------------------------- EngineProtocol
    def register_model(self, registration: ModelRegistration) -> RegisteredModel:
        registered = self.registrar.register_model(registration)
        self.prefetcher.schedule(registered.model_name)  # the first request on it pays only its forget set
        return registered

    def submit_erasure(self, request: ErasureRequest) -> SubmitOutcome:
        return self.intake.submit_erasure(request)

    def get_job(self, job_id: str) -> JobView:
        return self.queries.get_job(job_id)

    def list_jobs(self, job_filter: JobFilter) -> list[JobView]:
        return self.queries.list_jobs(job_filter)

    def events(self, after_seq: int = 0, job_ids: tuple[str, ...] = (), request_ids: tuple[str, ...] = (),
               wait_s: float = 0.0) -> list[JobEvent]:
        return self.queries.events(after_seq, job_ids, request_ids, wait_s)

    def get_certificate(self, request_id: str) -> list[Certificate]:
        return self.queries.get_certificate(request_id)

    def verify_certificate(self, body_json: str, signature: str) -> CertificateCheck:
        return self.queries.verify_certificate(body_json, signature)

    def pending_requests(self) -> list[PendingRequest]:
        return self.queries.pending_requests()

    def request_owners(self, request_ids: tuple[str, ...]) -> dict[str, str | None]:
        return self.queries.request_owners(request_ids)
