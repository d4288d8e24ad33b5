"""Gauges computed from the job store and the audit chain at scrape time: store-wide truth, the same on every
replica (so dashboards take ``max``, never ``sum``, across replicas).

- ``lethe_jobs{state}``: jobs per state (every state, zeros included);
- ``lethe_job_stage_stalled_seconds{stage}``: for the RUNNING jobs in each stage, the longest time since one
  last reported progress (0 when no job runs in that stage). A job stuck in a stage, or whose worker died
  before its lease expired, shows here;
- ``lethe_audit_chain_verification_failures_total`` and ``lethe_audit_chain_verified_seq``: the chain is
  re-verified in bounded slices at each scrape (:class:`service.audit.ChainMonitor`).

A store that cannot be read leaves these out of that scrape (and logs why) rather than failing the scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service import store as db
from service.audit import ChainMonitor
from service.domain import JobState

log = logging.getLogger(__name__)


class StoreCollector(Collector):
    """Register once per registry: ``metrics.registry.register(StoreCollector(store, audit_key, stages))``."""

    def __init__(self, store: db.Store, audit_key: bytes, stages: Iterable[str]):
        self.store = store
        self.chain = ChainMonitor(audit_key)
        self.stages = tuple(stages)

    def describe(self) -> list[Metric]:
        return []  # produced at scrape time; registering must not query the store

    def collect(self) -> Iterable[Metric]:
        try:
            with self.store.read() as conn:
                counts = db.job_counts_by_state(conn)
                running = db.running_job_last_progress(conn)
                errors = self.chain.check(conn)
        except Exception:
            log.warning("store metrics left out of this scrape: the job store could not be read", exc_info=True)
            return
        for error in errors[:5]:
            log.error("audit chain verification failed: %s", error)

        jobs = GaugeMetricFamily("lethe_jobs", "Jobs in the store, by state.", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], counts.get(state.value, 0))
        yield jobs

        now = db.utcnow()
        silence: dict[str, float] = {}
        for stage, last_progress in running:
            if last_progress is not None:
                silence[stage] = max(silence.get(stage, 0.0), (now - last_progress).total_seconds())
        stalled = GaugeMetricFamily("lethe_job_stage_stalled_seconds",
                                    "Longest time since a RUNNING job in this stage last reported progress.",
                                    labels=["stage"])
        for stage in dict.fromkeys(self.stages + tuple(silence)):  # known stages first, then any other
            stalled.add_metric([stage], silence.get(stage, 0.0))
        yield stalled

        yield CounterMetricFamily("lethe_audit_chain_verification_failures",
                                  "Passes of the continuous audit-chain verification that found an altered, "
                                  "missing or mis-signed entry.", value=self.chain.failures)
        yield GaugeMetricFamily("lethe_audit_chain_verified_seq",
                                "Last entry of the last audit-chain verification pass that reached the tail "
                                "cleanly.", value=self.chain.verified_seq)
