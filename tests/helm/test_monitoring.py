"""The Grafana dashboard and the alert rules against a live Lethe server.

Every PromQL expression parses; every Lethe metric they name is exported by a real server (the digits model
registered, an erasure run through the gRPC API, ``/metrics`` scraped); each alert has its runbook. Where the
Debian ``prometheus`` package is installed (``.ci/run`` installs it), ``promtool`` checks and unit-tests the
rules and a real Prometheus scrapes the live server and answers every panel's query with data.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.helm.chart import (EXTERNAL_METRIC, NAMESPACE, REPO, alert_rules, dashboard, dashboard_panels,
                              dashboard_queries, metric_names, rules_file_groups)

pytestmark = pytest.mark.helm

REQUIRED_ALERT_SIGNALS = {
    # what issue 14 asks the alerts to watch -> the metric that carries it
    "pending past a fraction of the GDPR deadline": "lethe_oldest_pending_request_age_seconds",
    "any overdue request": "lethe_overdue_pending_requests",
    "verification rejections": "lethe_verification_total",
    "chain-verification failure": "lethe_audit_chain_verification_failures_total",
    "workers not heartbeating": "lethe_worker_last_heartbeat_timestamp_seconds",
    "jobs stuck in a stage": "lethe_job_stage_stalled_seconds",
    "Kubernetes Jobs failing": "kube_job_status_failed",
}


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found is None:
        print(f"SKIP reason: `{name}` is not installed (the Debian package `prometheus` provides it; "
              ".ci/run installs it when apt is available)")
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------------------------- static
def test_dashboard_is_a_current_grafana_dashboard_with_at_least_12_promql_panels():
    board = dashboard()
    assert board["schemaVersion"] >= 39 and board["uid"] and board["title"] == "Lethe"
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "namespace"}
    panels = dashboard_panels()
    with_queries = [p for p in panels if any(t.get("expr") for t in p.get("targets", []))]
    assert len(with_queries) >= 12 and len(with_queries) == len(panels)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert panel["description"], panel["title"]
    titles = " | ".join(p["title"] for p in panels)
    for topic in ("GDPR clock", "Requests by kind and outcome", "Stage duration p50", "Stage duration p95",
                  "Verification outcomes", "Membership AUC", "Utility kept", "Coalesced batch size",
                  "RPC rate", "RPC errors by code", "latency", "Workers heartbeating", "Kubernetes Jobs", "GPU"):
        assert topic in titles, topic


def test_every_promql_expression_of_the_dashboard_and_the_rules_parses():
    import promql_parser

    expressions = [expr for _, expr in dashboard_queries()] + [rule["expr"] for rule in alert_rules()]
    assert len(expressions) >= 40
    for expr in expressions:
        try:
            promql_parser.parse(expr)
        except Exception as error:  # the parser raises a bare ValueError naming the position
            pytest.fail(f"{expr!r} does not parse: {error}")


def test_alerts_cover_every_signal_and_each_has_a_runbook():
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    watched = set().union(*(metric_names(rule["expr"]) for rule in rules))
    for signal, metric in REQUIRED_ALERT_SIGNALS.items():
        assert metric in watched, f"no alert watches {signal} ({metric})"
    runbooks = (REPO / "docs" / "operations.md").read_text()
    for rule in rules:
        assert f"\n### {rule['alert']}\n" in runbooks, f"docs/operations.md has no runbook for {rule['alert']}"
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["labels"]["team"] == "privacy"
        assert rule["annotations"]["runbook"] == f"docs/operations.md#{rule['alert'].lower()}"
        assert rule["annotations"]["runbook_url"].startswith("https://docs.example.com/lethe/operations.md#")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert f'namespace="{NAMESPACE}"' in rule["expr"], rule["alert"]


def test_promtool_checks_the_rules(tmp_path):
    promtool = _binary("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    rules = tmp_path / "lethe.rules.yaml"
    rules.write_text(yaml.safe_dump(rules_file_groups()))
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout


def test_promtool_unit_tests_say_when_each_alert_fires(tmp_path):
    """Synthetic series through the real rule engine: each alert fires on its condition, and not before."""
    promtool = _binary("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    groups = rules_file_groups()
    (tmp_path / "lethe.rules.yaml").write_text(yaml.safe_dump(groups))
    for group in groups["groups"]:  # conditions and labels first; the annotations are checked below
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "lethe.conditions.yaml").write_text(yaml.safe_dump(groups))
    ns = f'namespace="{NAMESPACE}"'
    day = 86400
    tests = {"rule_files": ["lethe.conditions.yaml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            # 16 days old and ageing: past half of the month (warning), not yet 80 % (critical)
            {"series": f"lethe_oldest_pending_request_age_seconds{{{ns}, pod=\"a\"}}",
             "values": f"{16 * day}+60x60"},
            {"series": f"lethe_overdue_pending_requests{{{ns}, pod=\"a\"}}", "values": "0x10 2x50"},
            {"series": f'lethe_verification_total{{{ns}, pod="a", outcome="rejected"}}', "values": "0x20 1x40"},
            {"series": f"lethe_audit_chain_verification_failures_total{{{ns}, pod=\"a\"}}", "values": "0x30 1+1x30"},
            # a heartbeat stuck at t=60 s, then nobody heartbeats (pod b vanishes after 30 min)
            {"series": f"lethe_worker_last_heartbeat_timestamp_seconds{{{ns}, pod=\"a\"}}", "values": "60x60"},
            {"series": f'lethe_job_stage_stalled_seconds{{{ns}, pod="a", stage="apply"}}', "values": "0+60x60"},
            {"series": f'kube_job_status_failed{{{ns}, job_name="lethe-job-1"}}', "values": "0x5 1x55"},
            {"series": f'lethe_grpc_server_handled_total{{{ns}, pod="a", grpc_method="/lethe.v1.UnlearningService/GetJob", grpc_code="INTERNAL"}}',
             "values": "0x40 3x20"},
        ],
        "alert_rule_test": [
            {"eval_time": "14m", "alertname": "LetheGdprDeadlineApproaching", "exp_alerts": []},  # `for: 15m`
            {"eval_time": "20m", "alertname": "LetheGdprDeadlineApproaching",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "team": "privacy"}}]},
            {"eval_time": "20m", "alertname": "LetheGdprDeadlineImminent", "exp_alerts": []},
            {"eval_time": "9m", "alertname": "LetheRequestOverdue", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "LetheRequestOverdue",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "team": "privacy"}}]},
            {"eval_time": "25m", "alertname": "LetheVerificationRejected",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "team": "privacy"}}]},
            {"eval_time": "29m", "alertname": "LetheAuditChainVerificationFailed", "exp_alerts": []},
            {"eval_time": "35m", "alertname": "LetheAuditChainVerificationFailed",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "team": "privacy"}}]},
            {"eval_time": "5m", "alertname": "LetheWorkerHeartbeatMissing", "exp_alerts": []},
            {"eval_time": "10m", "alertname": "LetheWorkerHeartbeatMissing",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "team": "privacy", "namespace": NAMESPACE,
                                            "pod": "a"}}]},
            {"eval_time": "20m", "alertname": "LetheWorkersAbsent", "exp_alerts": []},
            {"eval_time": "30m", "alertname": "LetheJobStuckInStage", "exp_alerts": []},
            {"eval_time": "40m", "alertname": "LetheJobStuckInStage",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "team": "privacy", "stage": "apply"}}]},
            {"eval_time": "10m", "alertname": "LetheKubernetesJobFailed",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "team": "privacy", "namespace": NAMESPACE,
                                            "job_name": "lethe-job-1"}}]},
            {"eval_time": "45m", "alertname": "LetheInternalErrors",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "team": "privacy",
                                            "grpc_method": "/lethe.v1.UnlearningService/GetJob"}}]},
        ],
    }, {
        "interval": "1m",
        "input_series": [{"series": f"lethe_jobs{{{ns}, state=\"QUEUED\"}}", "values": "1x30"}],
        "alert_rule_test": [
            {"eval_time": "9m", "alertname": "LetheWorkersAbsent", "exp_alerts": []},
            {"eval_time": "11m", "alertname": "LetheWorkersAbsent",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "team": "privacy", "namespace": NAMESPACE}}]},
        ],
    }]}
    # The annotations as the operator reads them: the value humanised, the runbook linked.
    annotated = {"rule_files": ["lethe.rules.yaml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": f'lethe_job_stage_stalled_seconds{{{ns}, stage="verify"}}', "values": "0+60x60"}],
        "alert_rule_test": [{"eval_time": "40m", "alertname": "LetheJobStuckInStage", "exp_alerts": [{
            "exp_labels": {"severity": "warning", "team": "privacy", "stage": "verify"},
            "exp_annotations": {
                "summary": "A running job reports no progress in its stage.",
                "description": "A RUNNING job in stage verify has reported no progress for 40m 0s.",
                "runbook": "docs/operations.md#lethejobstuckinstage",
                "runbook_url": "https://docs.example.com/lethe/operations.md#lethejobstuckinstage"}}]}],
    }]}
    (tmp_path / "lethe.tests.yaml").write_text(yaml.safe_dump(tests))
    (tmp_path / "lethe.annotations.yaml").write_text(yaml.safe_dump(annotated))
    run = subprocess.run([promtool, "test", "rules", "lethe.tests.yaml", "lethe.annotations.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


# --------------------------------------------------------------------------------------- live server
@pytest.fixture(scope="module")
def live_lethe(tmp_path_factory):
    """A real engine (digits model registered) behind a real gRPC server, with its /metrics exporter, after
    an erasure submitted through the API has finished and one refused call (NOT_FOUND) was answered."""
    from prometheus_client import start_http_server

    from service.api.pb import service_pb2, types_pb2
    from tests.service.api_fixtures import running_api
    from tests.service.conftest import make_engine, wait_for_jobs

    engine, model = make_engine(tmp_path_factory.mktemp("live-lethe"))
    metrics_server, _ = start_http_server(0, addr="127.0.0.1", registry=engine.metrics.registry)
    try:
        with running_api(engine.settings, engine) as api:
            erasure = types_pb2.Erasure(request_id="helm-live-1", subject_ids=["subject-0007", "subject-0010"],
                                        model_names=[model])
            accepted = api.stub.SubmitErasure(service_pb2.SubmitErasureRequest(erasure=erasure)).accepted
            views = wait_for_jobs(engine, list(accepted.job_ids), timeout_s=180)
            assert [v.state.value for v in views] == ["SUCCEEDED"], views
            with pytest.raises(Exception):
                api.stub.GetJob(service_pb2.GetJobRequest(job_id="no-such-job"))
            yield engine, metrics_server.server_port
    finally:
        metrics_server.shutdown()
        engine.stop(30)
        engine.store.dispose()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_live_server_exports_every_lethe_metric_the_dashboard_and_rules_name(live_lethe):
    from prometheus_client.parser import text_string_to_metric_families

    _, port = live_lethe
    exported = {sample.name for family in text_string_to_metric_families(_scrape(port)) for sample in family.samples}
    named = set()
    for _, expr in dashboard_queries():
        named |= metric_names(expr)
    for rule in alert_rules():
        named |= metric_names(rule["expr"])
    lethe = {name for name in named if not EXTERNAL_METRIC.match(name)}
    assert len(lethe) >= 20 and all(name.startswith("lethe_") for name in lethe)
    assert not lethe - exported, f"named by the dashboard or rules but not exported: {sorted(lethe - exported)}"
    # The evidence of the erasure's verification is labelled by model, never by request or subject.
    text = _scrape(port)
    assert 'lethe_verification_membership_auc{model="digits-cnn"}' in text
    assert "subject-0007" not in text and "helm-live-1" not in text


def test_lethe_audit_verify_works_the_way_notes_txt_runs_it_in_a_pod(live_lethe, monkeypatch, capsys):
    """In a pod the store URL and the audit key come from the environment (ConfigMap and Secret)."""
    from service import cli

    engine, _ = live_lethe
    monkeypatch.setenv("LETHE_JOB_STORE_URL", engine.settings.job_store_url)
    monkeypatch.setenv("LETHE_AUDIT_KEY", engine.settings.audit_key_bytes.hex())
    monkeypatch.setenv("LETHE_STATE_DIR", "/nonexistent/not-used")
    assert cli.main(["audit", "verify"]) == 0
    report = json.loads(capsys.readouterr().out)["chain"]
    assert report["valid"] and report["entries"] > 0 and report["certificates"] == 1


def test_prometheus_scrapes_the_live_server_and_every_panel_returns_data(live_lethe, tmp_path):
    prometheus = _binary("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`)")
    _, metrics_port = live_lethe
    web_port = _free_port()
    (tmp_path / "lethe.rules.yaml").write_text(yaml.safe_dump(rules_file_groups()))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "lethe.rules.yaml")],  # Prometheus refuses to start on a bad rule
        "scrape_configs": [{"job_name": "lethe", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }))
    server = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{web_port}",
                               "--log.level=warn"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def query(expr: str) -> list:
        url = f"http://127.0.0.1:{web_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    try:
        deadline = time.monotonic() + 60
        while True:  # ready, and at least three scrapes of the server (rates need two samples in range)
            assert server.poll() is None, f"prometheus exited: {server.stdout.read()}"
            try:
                samples = query('count_over_time(up{job="lethe"}[1m])')
                if samples and float(samples[0]["value"][1]) >= 3 and query('up{job="lethe"} == 1'):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not scrape the Lethe server within 60 s"
            time.sleep(0.5)
        empty = []
        for title, expr in dashboard_queries():
            result = query(expr)
            external = any(EXTERNAL_METRIC.match(name) for name in metric_names(expr))
            if not result and not external:
                empty.append(f"{title}: {expr}")
        assert not empty, "panels without data from a live Lethe server:\n" + "\n".join(empty)
        for rule in alert_rules():
            query(rule["expr"])  # evaluates (no alert is expected to fire on a healthy server)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
