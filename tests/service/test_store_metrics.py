"""The gauges the chart's alerts read: jobs by state and stalled stages from the store, the continuous
audit-chain verification (a tampered entry is counted as a failure, pass after pass), the per-model
verification evidence and the worker heartbeat."""

from __future__ import annotations

import time
from datetime import timedelta

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service import store as db
from service.audit import AuditLog, ChainMonitor
from service.metrics import Metrics
from service.store_metrics import StoreCollector

KEY = bytes(range(32))


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _job(conn, job_id: str, state: str, stage: str) -> None:
    # One model per job: the store allows one RUNNING job per model lineage (a unique index).
    db.insert_job(conn, job_id=job_id, model_name=f"m-{job_id}", coalesce_key="k", selector="records", state=state,
                  stage=stage, progress=0.0, method="ssd", method_params={}, policy_overrides={}, records=1,
                  message="", evidence={}, attempts=1, window_closes_at=db.utcnow())


def test_store_collector_reports_jobs_by_state_and_the_longest_silence_per_stage(tmp_path):
    store = db.Store(f"sqlite:///{tmp_path / 'lethe.db'}")
    with store.write() as conn:
        _job(conn, "a", "RUNNING", "apply")
        _job(conn, "b", "RUNNING", "apply")
        _job(conn, "c", "QUEUED", "queued")
        _job(conn, "d", "SUCCEEDED", "done")
        conn.execute(db.jobs.update().where(db.jobs.c.job_id == "a")  # silent for ten minutes
                     .values(updated_at=db.utcnow() - timedelta(seconds=600)))
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, KEY, ("resolve", "apply", "verify")))
    samples = _samples(registry)
    assert samples[("lethe_jobs", (("state", "RUNNING"),))] == 2
    assert samples[("lethe_jobs", (("state", "QUEUED"),))] == 1
    assert samples[("lethe_jobs", (("state", "FAILED"),))] == 0  # every state, zeros included
    assert 599 <= samples[("lethe_job_stage_stalled_seconds", (("stage", "apply"),))] < 700
    assert samples[("lethe_job_stage_stalled_seconds", (("stage", "verify"),))] == 0
    assert samples[("lethe_audit_chain_verification_failures_total", ())] == 0
    store.dispose()


def test_a_tampered_audit_entry_is_counted_at_every_pass_until_repaired(tmp_path):
    store = db.Store(f"sqlite:///{tmp_path / 'lethe.db'}")
    audit = AuditLog(KEY)
    for index in range(7):
        with store.write() as conn:
            audit.append(conn, "test", {"index": index})
    monitor = ChainMonitor(KEY, batch=3)
    with store.read() as conn:
        assert [monitor.check(conn) for _ in range(3)] == [[], [], []]  # 3 + 3 + 1 entries: one clean pass
    assert monitor.verified_seq == 7 and monitor.failures == 0

    with store.write() as conn:
        original = conn.exec_driver_sql("SELECT body_json FROM audit_log WHERE seq = 2").scalar()
        conn.exec_driver_sql("UPDATE audit_log SET body_json = '{}' WHERE seq = 2")
    with store.read() as conn:
        assert monitor.check(conn) == ["entry 2: body does not match its hash (altered)"]
        assert monitor.check(conn)  # the next pass starts over and fails again
    assert monitor.failures == 2

    with store.write() as conn:
        conn.exec_driver_sql("UPDATE audit_log SET body_json = ? WHERE seq = 2", (original,))
    with store.read() as conn:
        assert [monitor.check(conn) for _ in range(3)] == [[], [], []]
    assert monitor.failures == 2 and monitor.verified_seq == 7

    with store.write() as conn:  # a signature made with another key
        conn.exec_driver_sql("UPDATE audit_log SET signature = ? WHERE seq = 7", ("0" * 64,))
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, KEY, ()))
    assert _samples(registry)[("lethe_audit_chain_verification_failures_total", ())] == 1
    store.dispose()


def test_evidence_gauges_are_per_model_and_heartbeat_is_a_timestamp():
    metrics = Metrics()
    metrics.record_evidence("digits-cnn", {"membership_after": {"auc": 0.52, "ks_p_value": 0.4},
                                           "utility_acc_before": 0.98, "utility_acc_after": 0.97,
                                           "forget_acc_after": 0.9})
    metrics.record_evidence("tiny-gpt", {"utility_acc_before": 0.0, "utility_acc_after": 0.0})
    before = time.time()
    metrics.heartbeat()
    samples = _samples(metrics.registry)
    assert samples[("lethe_verification_membership_auc", (("model", "digits-cnn"),))] == 0.52
    assert samples[("lethe_verification_forget_quality", (("model", "digits-cnn"),))] == 0.4
    assert abs(samples[("lethe_verification_utility_ratio", (("model", "digits-cnn"),))] - 0.97 / 0.98) < 1e-12
    assert samples[("lethe_verification_forget_accuracy", (("model", "digits-cnn"),))] == 0.9
    assert ("lethe_verification_utility_ratio", (("model", "tiny-gpt"),)) not in samples  # no division by zero
    assert before <= samples[("lethe_worker_last_heartbeat_timestamp_seconds", ())] <= time.time()
