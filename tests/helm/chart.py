"""Rendering the chart offline, the value profiles the tests render, and what the tests read from manifests.

Rendering uses helm-python-sdk: Helm's own engine (Helm v4's Go packages through a C ABI), no ``helm``
binary and no cluster. ``lookup`` returns nothing there, exactly as in ``helm template``.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "lethe"
RELEASE, NAMESPACE = "lethe", "privacy"

_SCALE_OUT = {
    "api": {"replicas": 3},
    "persistence": {"enabled": False},
    "secrets": {"jobStoreUrl": "postgresql+psycopg://lethe:db-password-123@postgres.db.svc:5432/lethe"},
    "config": {"LETHE_MLFLOW_TRACKING_URI": "http://mlflow.mlflow.svc:5000", "LETHE_DEVICE": "cuda"},
}

PROFILES: dict[str, dict[str, Any]] = {
    # The embedded default: one pod, SQLite and MLflow on a volume.
    "defaults": {},
    # Scale-out on PostgreSQL and an MLflow server; one Kubernetes Job per unlearning job on GPU nodes.
    "scale-out-gpu-jobs": {
        **copy.deepcopy(_SCALE_OUT),
        "executor": {"type": "kubernetes", "kubernetes": {
            "gpuCount": 2, "cpu": "4", "memory": "16Gi", "priorityClassName": "lethe-unlearning",
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": 600, "backoffLimit": 1}},
    },
    # Mutual TLS from a cert-manager Secret, with the embedded store.
    "tls": {"tls": {"enabled": True, "secretName": "lethe-grpc-tls", "clientCA": {"enabled": True}}},
    # Every optional part on: workers on GPUs, TLS, both kinds of credentials, all the monitoring.
    "everything": {
        **copy.deepcopy(_SCALE_OUT),
        "worker": {"enabled": True, "replicas": 3, "gpus": 1,
                   "nodeSelector": {"nvidia.com/gpu.present": "true"},
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   "priorityClassName": "lethe-unlearning"},
        "tls": {"enabled": True, "secretName": "lethe-grpc-tls", "clientCA": {"enabled": True,
                                                                              "secretName": "clients-ca"}},
        "secrets": {"jobStoreUrl": "postgresql+psycopg://lethe:db-password-123@postgres.db.svc:5432/lethe",
                    "auditKey": "ab" * 32, "subjectHashKey": "cd" * 32, "authToken": "bearer-token-456"},
        "auth": {"tokensFile": {"enabled": True, "content": "operator ops sha256:" + "0" * 64 + "\n"}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                    "dashboard": {"annotations": {"grafana_folder": "Lethe"}, "namespace": "monitoring"}},
        "alerts": {"runbookBaseUrl": "https://docs.example.com/lethe/operations.md", "labels": {"team": "privacy"}},
        "networkPolicy": {"grpcFromNamespaces": ["data-governance"], "metricsFromNamespaces": ["monitoring"]},
        "api": {"replicas": 3, "podAnnotations": {"example.com/owner": "privacy"},
                "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                               "whenUnsatisfiable": "ScheduleAnyway",
                                               "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "lethe"}}}]},
        "image": {"repository": "registry.example.com/lethe", "digest": "sha256:" + "1" * 64},
        "extraEnv": [{"name": "MLFLOW_HTTP_REQUEST_TIMEOUT", "value": "60"}],
        "extraEnvFrom": [{"secretRef": {"name": "mlflow-credentials"}}],
    },
}
SECRET_VALUES = ("db-password-123", "bearer-token-456", "ab" * 32, "cd" * 32)


@functools.lru_cache(maxsize=None)
def _render_cached(values_json: str) -> tuple[tuple[str, str], ...]:
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart:
        rendered = chart.render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE, is_install=True)
    return tuple(sorted(rendered.items()))


def render(values: dict[str, Any]) -> dict[str, str]:
    """Template path -> rendered text (raises helm_python's errors for refused values)."""
    return dict(_render_cached(json.dumps(values, sort_keys=True)))


def manifests(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for ``values``."""
    objects = []
    for path, text in render(values).items():
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def notes(values: dict[str, Any]) -> str:
    return next(text for path, text in render(values).items() if path.endswith("NOTES.txt"))


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_specs(objects: list[dict]) -> Iterator[tuple[str, dict]]:
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield o["metadata"]["name"], o["spec"]["template"]["spec"]


def container_env(objects: list[dict], container: dict) -> dict[str, str | None]:
    """The environment a container starts with: its ConfigMaps and chart Secrets whole (envFrom), then its
    own ``env`` (fieldRefs resolve to a pod name). Secrets from outside the chart contribute nothing."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
        elif "secretRef" in source:
            found = [s for s in by_kind(objects, "Secret") if s["metadata"]["name"] == source["secretRef"]["name"]]
            for secret in found:
                env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif "fieldRef" in variable.get("valueFrom", {}):
            env[variable["name"]] = f"{RELEASE}-pod-0"
        else:
            env[variable["name"]] = None
    return env


def settings_env_names() -> set[str]:
    from service.settings import Settings

    return {f"LETHE_{name.upper()}" for name in Settings.model_fields}


def dashboard() -> dict[str, Any]:
    return json.loads((CHART / "dashboards" / "lethe.json").read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return panels


# Grafana's variables, as the tests substitute them before parsing or querying.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h", "$namespace": ".*",
                     "${datasource}": "prometheus"}


def concrete(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with variables substituted) for every target of every panel."""
    return [(panel["title"], concrete(target["expr"])) for panel in dashboard_panels()
            for target in panel.get("targets", [])]


def alert_rules(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    objects = manifests(values if values is not None else PROFILES["everything"])
    rule = one(objects, "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def rules_file_groups(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The PrometheusRule's groups as a plain Prometheus rules file (what promtool reads)."""
    objects = manifests(values if values is not None else PROFILES["everything"])
    return {"groups": one(objects, "PrometheusRule")["spec"]["groups"]}


def metric_names(expr: str) -> set[str]:
    """Every metric a PromQL expression selects (vector selectors, in matrices and subqueries too)."""
    import promql_parser

    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    names.add(matcher.value)
        for attribute in ("expr", "lhs", "rhs", "vector_selector", "param"):
            child = getattr(node, attribute, None)
            if child is not None and not isinstance(child, (str, int, float)):
                visit(child)
        for child in getattr(node, "args", None) or ():
            visit(child)

    visit(promql_parser.parse(expr))
    return names


EXTERNAL_METRIC = re.compile(r"^(DCGM_|kube_)")
"""Metrics of other exporters (NVIDIA DCGM, kube-state-metrics) that the dashboard and rules also use."""
