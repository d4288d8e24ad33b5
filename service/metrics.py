"""Prometheus metrics of the engine, on their own registry (so tests and several engines never collide).

Naming follows Prometheus conventions (``lethe_`` prefix, base units, ``_total`` for counters) and every
label has a bounded set of values: request kinds, outcomes, method names from the registry, pipeline
stages, job states, and registered model names (a set the operator controls, on the verification evidence
gauges only). Subject ids and request ids never become labels (unbounded, and subject ids are personal
data). The front adds its own RPC metrics to :attr:`Metrics.registry`, and
:class:`service.store_metrics.StoreCollector` the gauges read from the job store and the audit chain at
scrape time. The Helm chart's dashboard and alert rules (``helm/lethe``) name these metrics; ``tests/helm``
checks that a live server exports every one of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Job stages take from milliseconds (audit) to hours (an exact retrain of a large model on a busy GPU).
DURATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

REQUEST_OUTCOMES = ("accepted", "replayed", "invalid_argument", "already_exists", "not_found",
                    "failed_precondition", "deadline_exceeded", "unimplemented", "error")


class Metrics:
    """The engine's metrics. ``oldest_pending_age`` and ``overdue_pending`` are computed at scrape time from
    the job store, so every replica reports the same store-wide truth and nothing drifts between scrapes."""

    def __init__(self, oldest_pending_age_s: Callable[[], float] | None = None,
                 overdue_pending_count: Callable[[], float] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("lethe_requests_total", "Requests received, by kind and outcome.",
                                ["kind", "outcome"], registry=self.registry)
        self.jobs_in_flight = Gauge("lethe_jobs_in_flight", "Jobs currently running in this process.",
                                    registry=self.registry)
        self.job_duration = Histogram("lethe_job_duration_seconds", "Wall time of each pipeline stage of a job.",
                                      ["method", "stage"], buckets=DURATION_BUCKETS_S, registry=self.registry)
        self.records_erased = Counter("lethe_records_erased_total",
                                      "Training records whose influence was removed and that were purged.",
                                      registry=self.registry)
        self.verification = Counter("lethe_verification_total", "Verification gate outcomes.", ["outcome"],
                                    registry=self.registry)
        self.coalesced_batch_size = Histogram("lethe_coalesced_batch_size", "Requests served by one job.",
                                              buckets=BATCH_BUCKETS, registry=self.registry)
        self.oldest_pending_age = Gauge(
            "lethe_oldest_pending_request_age_seconds",
            "Age of the oldest request without a final certificate (GDPR Art. 12(3): one month).",
            registry=self.registry)
        if oldest_pending_age_s is not None:
            self.oldest_pending_age.set_function(oldest_pending_age_s)
        # The client's own deadline, beside the GDPR month: no labels (request ids are unbounded); which
        # requests are overdue is what ListPendingRequests / ``lethe pending`` show.
        self.overdue_pending = Gauge(
            "lethe_overdue_pending_requests",
            "Requests still without a final certificate whose client-set deadline has passed.",
            registry=self.registry)
        if overdue_pending_count is not None:
            self.overdue_pending.set_function(overdue_pending_count)
        self.updates = Counter("lethe_updates_total", "Update and rectification jobs, by kind and outcome.",
                               ["kind", "outcome"], registry=self.registry)
        self.records_learned = Counter("lethe_records_learned_total",
                                       "Records learned by verified updates and rectifications.",
                                       registry=self.registry)
        self.update_regressions = Counter(
            "lethe_update_regressions_total",
            "Earlier erasures an update made come back (re-checked on their sealed sets), before escalation.",
            registry=self.registry)
        self.update_bwt = Gauge("lethe_update_utility_change", "Utility after minus before of the model's last "
                                "verified update (a backward-transfer view; negative = forgetting).",
                                ["model"], registry=self.registry)
        self.update_stability_gap = Gauge(
            "lethe_update_stability_gap", "Utility before the model's last verified update minus the lowest "
            "utility measured during it (De Lange et al.'s stability gap).", ["model"], registry=self.registry)
        self.certificates_late = Counter(
            "lethe_certificates_late_total",
            "Certificates issued after their request's deadline (the erasure was still done, late).",
            registry=self.registry)
        # Evidence of the last verification of each model, whatever its verdict, so a dashboard shows how
        # close the gate runs to its limits (labels: registered model names, a set the operator controls).
        self.membership_auc = Gauge(
            "lethe_verification_membership_auc",
            "Loss-attack ROC AUC of erased vs never-seen (audit) records after the model's last verified job "
            "(0.5 = indistinguishable; near 1 = still remembered; well below 0.5 = over-forgotten).", ["model"],
            registry=self.registry)
        self.forget_quality = Gauge(
            "lethe_verification_forget_quality",
            "KS-test p-value of erased vs never-seen (audit) per-example losses after the model's last verified "
            "job (forget quality: high = indistinguishable).", ["model"], registry=self.registry)
        self.utility_ratio = Gauge(
            "lethe_verification_utility_ratio",
            "Utility after / utility before of the model's last verified job (1 = nothing lost).", ["model"],
            registry=self.registry)
        self.forget_accuracy = Gauge(
            "lethe_verification_forget_accuracy",
            "Accuracy on the erased records (or class) after the model's last verified job.", ["model"],
            registry=self.registry)
        self.worker_heartbeat = Gauge(
            "lethe_worker_last_heartbeat_timestamp_seconds",
            "Unix time this process's job workers last showed life: each pass of the claim loop and each "
            "progress report of a running job.", registry=self.registry)

    def heartbeat(self) -> None:
        self.worker_heartbeat.set(time.time())

    def record_evidence(self, model: str, evidence: Mapping) -> None:
        """Set the evidence gauges of ``model`` from a verification's evidence (keys absent: left as they were)."""
        membership = evidence.get("membership_after") or {}  # record erasures (unlearn.gate); classes have none
        if membership.get("auc") is not None:
            self.membership_auc.labels(model).set(membership["auc"])
        if membership.get("ks_p_value") is not None:
            self.forget_quality.labels(model).set(membership["ks_p_value"])
        before, after = evidence.get("utility_acc_before"), evidence.get("utility_acc_after")
        if before and after is not None:
            self.utility_ratio.labels(model).set(after / before)
        if evidence.get("forget_acc_after") is not None:
            self.forget_accuracy.labels(model).set(evidence["forget_acc_after"])


def start_metrics_server(metrics: Metrics, port: int, host: str = "127.0.0.1"):
    """Serve ``/metrics`` on ``host:port`` in a daemon thread; returns the server (``.shutdown()`` stops
    it), or None when ``port`` is 0 (the exporter is off)."""
    if port == 0:
        return None
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server
