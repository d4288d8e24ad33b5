"""The Helm chart, rendered offline by Helm's own engine for four value profiles: it lints clean, every
manifest is valid for the oldest and newest Kubernetes the chart claims (the prometheus-operator objects
against their vendored CRD schemas), the pods are hardened, the probes and RBAC are what an SRE expects,
every LETHE_* variable it sets is a field of ``Settings`` (and the environment parses as ``Settings``),
secrets stay out of ConfigMaps, and bad values are refused with a message that names them."""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

from tests.helm.chart import (CHART, NAMESPACE, PROFILES, REPO, SECRET_VALUES, by_kind, container_env, manifests,
                              notes, one, pod_specs, render, settings_env_names)

pytestmark = pytest.mark.helm

CRD_SCHEMAS = Path(__file__).parent / "crds"
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
             ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_v1_prometheusrule.json"}
SECRET_SETTINGS = {"LETHE_JOB_STORE_URL", "LETHE_AUDIT_KEY", "LETHE_SUBJECT_HASH_KEY", "LETHE_AUTH_TOKEN"}
# What every Lethe container in a cluster must be given: bind beyond loopback, the state volume, the pod's
# identity, and keys shared by every replica (a key generated per pod would split the audit chain).
REQUIRED_IN_CLUSTER = {"LETHE_GRPC_HOST", "LETHE_METRICS_HOST", "LETHE_STATE_DIR", "LETHE_WORKER_ID",
                       "LETHE_AUDIT_KEY", "LETHE_SUBJECT_HASH_KEY", "LETHE_CODE_VERSION"}


def chart_meta() -> dict:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def claimed_kubernetes_versions() -> tuple[str, str]:
    """The oldest Kubernetes the chart claims (kubeVersion's lower bound) and the newest one it is checked
    against (the newest schema kubernetes-validate ships), asserting that one is inside the claim."""
    claim = chart_meta()["kubeVersion"]
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)\.\d+(-0)?", claim)
    assert match, f"kubeVersion {claim!r}: expected an open lower bound like '>=1.27.0-0'"
    oldest = f"{match[1]}.{match[2]}"
    newest = ".".join(kubernetes_validate.utils.latest_version().split(".")[:2])
    assert Version(newest) >= Version(oldest)
    return oldest, newest


@functools.lru_cache(maxsize=None)
def _cached_schema(filename: str, desired_version: str):
    return _original_schema_contents(filename, desired_version)


# kubernetes-validate re-reads the (large) definitions file for every object; read each file once.
_original_schema_contents = kubernetes_validate.utils.schema_contents
kubernetes_validate.utils.schema_contents = _cached_schema


@functools.lru_cache(maxsize=None)
def crd_validator(filename: str) -> jsonschema.Draft7Validator:
    """The vendored CRD schema, strict: an object that lists its properties admits no others (what the API
    server's field validation does), unless it preserves unknown fields."""

    def strict(node):
        if isinstance(node, dict):
            node = {k: strict(v) for k, v in node.items()}
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            return node
        if isinstance(node, list):
            return [strict(v) for v in node]
        return node

    schema = strict(json.loads((CRD_SCHEMAS / filename).read_text()))
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def _values(profile: str) -> dict:
    return copy.deepcopy(PROFILES[profile])


# ------------------------------------------------------------------------------------------ rendering
@pytest.mark.parametrize("profile", list(PROFILES))
def test_profile_renders_and_lints_clean_on_the_claimed_kubernetes_versions(profile):
    import helm_python

    objects = manifests(_values(profile))
    assert objects and {o["kind"] for o in objects} >= {"Deployment", "Service", "ConfigMap", "Secret"}
    for version in claimed_kubernetes_versions():
        report = helm_python.lint(str(CHART), _values(profile), strict=True, namespace=NAMESPACE,
                                  kube_version=f"v{version}.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
        assert not problems and not report["errors"], f"{profile} on {version}: {problems or report['errors']}"


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_manifest_is_valid_for_the_oldest_and_newest_claimed_kubernetes(profile):
    objects = manifests(_values(profile))
    for version in claimed_kubernetes_versions():
        for manifest in objects:
            key = (manifest["apiVersion"], manifest["kind"])
            where = f"{manifest['kind']}/{manifest['metadata']['name']} ({profile}, Kubernetes {version})"
            if key in CRD_KINDS:
                errors = sorted(crd_validator(CRD_KINDS[key]).iter_errors(manifest), key=str)
                assert not errors, f"{where}: {errors[0].message} at {list(errors[0].absolute_path)}"
                continue
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{where}: {error.message} at {list(error.path)}")
    assert any(key in CRD_KINDS for key in ((o["apiVersion"], o["kind"]) for o in objects)) == (profile == "everything")


def test_schema_refuses_typos_and_bad_values_naming_the_key():
    import helm_python

    bad = [
        ({"replica": 2}, "replica"),                                               # typo at the top
        ({"api": {"replicas": 1, "resource": {}}}, "resource"),                   # typo inside
        ({"config": {"LETHE_COALESCING_WINDOW": 1}}, "LETHE_COALESCING_WINDOW"),  # not a setting
        ({"config": {"LETHE_AUDIT_KEY": "00"}}, "LETHE_AUDIT_KEY"),               # secret setting in a ConfigMap
        ({"config": {"LETHE_GRPC_MAX_WORKERS": 3}}, "LETHE_GRPC_MAX_WORKERS"),    # below Settings' bound
        ({"executor": {"type": "k8s"}}, "type"),
        ({"secrets": {"auditKey": "not-hex"}}, "auditKey"),
        ({"secrets": {"jobStoreUrl": "mysql://x"}}, "jobStoreUrl"),
        ({"api": {"resources": {"limits": None}}}, "limits"),                      # unbounded pod
        ({"extraEnv": [{"name": "LETHE_DEVICE", "value": "cpu"}]}, "extraEnv"),   # LETHE_* bypassing config
        ({"alerts": {"pendingWarningFraction": 1.5}}, "pendingWarningFraction"),
    ]
    for values, key in bad:
        with pytest.raises(helm_python.HelmValuesError) as refused:
            render(values)  # what `helm install` checks: the values coalesced with the chart's, then the schema
        assert key in str(refused.value), f"{values}: the message does not name {key!r}: {refused.value}"
    with helm_python.Chart.load(str(CHART)) as chart:
        for profile in PROFILES:
            chart.validate_schema(_values(profile))


@pytest.mark.parametrize("values, says", [
    ({"api": {"replicas": 3}}, "api.replicas > 1 needs the scale-out job store"),
    ({"executor": {"type": "kubernetes"}}, "executor.type=kubernetes runs jobs in other pods"),
    ({**PROFILES["scale-out-gpu-jobs"], "worker": {"enabled": True}}, "choose one way to run jobs"),
    ({"tls": {"enabled": True}}, "tls.enabled needs tls.secretName"),
    ({"api": {"replicas": 2}, "secrets": {"jobStoreUrl": "postgresql://db/lethe"},
      "config": {"LETHE_MLFLOW_TRACKING_URI": "http://mlflow:5000"}}, "persistence.enabled=false"),
])
def test_inconsistent_values_fail_with_what_to_change(values, says):
    import helm_python

    with pytest.raises(helm_python.HelmError) as refused:
        render(values)
    assert says in str(refused.value)


# ------------------------------------------------------------------------------------------- hardening
@pytest.mark.parametrize("profile", list(PROFILES))
def test_pods_are_hardened(profile):
    objects = manifests(_values(profile))
    for name, spec in pod_specs(objects):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is (name == "lethe" and profile == "scale-out-gpu-jobs"), \
            f"{name}: the API token is mounted only where the kubernetes executor needs it"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert not any("hostPath" in v for v in volumes.values()), name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["privileged"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{name}: {bound}"
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            # The only writable places: scratch and the state directory (a volume or an emptyDir).
            assert mounts["/tmp"] == "tmp" and "emptyDir" in volumes["tmp"], name
            state = volumes[mounts["/var/lib/lethe"]]
            assert ("persistentVolumeClaim" in state) == (profile in ("defaults", "tls") and name == "lethe"), name
            assert container_env(objects, container)["LETHE_STATE_DIR"] == "/var/lib/lethe"


def test_embedded_mode_recreates_its_single_pod_and_keeps_its_volume():
    objects = manifests({})
    api = one(objects, "Deployment", "lethe")
    assert api["spec"]["replicas"] == 1 and api["spec"]["strategy"] == {"type": "Recreate"}
    claim = one(objects, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    scaled = one(manifests(_values("scale-out-gpu-jobs")), "Deployment", "lethe")
    assert scaled["spec"]["strategy"]["type"] == "RollingUpdate"
    assert scaled["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert one(manifests(_values("scale-out-gpu-jobs")), "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_network_policy_admits_only_grpc_and_metrics_from_the_configured_namespaces():
    objects = manifests(_values("everything"))
    api = one(objects, "NetworkPolicy", "lethe")
    assert api["spec"]["policyTypes"] == ["Ingress"]
    rules = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in api["spec"]["ingress"]}
    assert set(rules) == {("grpc",), ("metrics",)}
    assert rules[("grpc",)] == [{"podSelector": {}}, {"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["data-governance"]}]}}]
    assert rules[("metrics",)][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["monitoring"]
    worker = one(objects, "NetworkPolicy", "lethe-worker")
    assert [tuple(p["port"] for p in rule["ports"]) for rule in worker["spec"]["ingress"]] == [("metrics",)]
    # The ports named in the policies are the containers' named ports.
    for name, spec in pod_specs(objects):
        names = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
        assert names == ({"grpc", "metrics"} if name == "lethe" else {"metrics"})


# ----------------------------------------------------------------------------------------------- probes
def test_api_probes_use_native_grpc_health_and_readiness_follows_the_lethe_service():
    api = one(manifests({}), "Deployment", "lethe")["spec"]["template"]["spec"]["containers"][0]
    port = next(p["containerPort"] for p in api["ports"] if p["name"] == "grpc")
    assert api["livenessProbe"]["grpc"] == {"port": port, "service": ""}
    assert api["startupProbe"]["grpc"] == {"port": port, "service": ""}
    assert api["readinessProbe"]["grpc"] == {"port": port, "service": "lethe.v1.UnlearningService"}
    assert api["startupProbe"]["failureThreshold"] * api["startupProbe"]["periodSeconds"] >= 300
    assert api["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]


def test_tls_probe_is_an_exec_health_check_that_passes_mutual_tls(tmp_path):
    """The exec fall-back, run for real: against a TLS server demanding client certificates, the probe
    command from the rendered Deployment exits 0 while the server is SERVING and 1 once it is not."""
    import grpc
    from concurrent import futures
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    objects = manifests(_values("tls"))
    container = one(objects, "Deployment", "lethe")["spec"]["template"]["spec"]["containers"][0]
    env = container_env(objects, container)
    assert (env["LETHE_TLS_CERT"], env["LETHE_TLS_KEY"], env["LETHE_TLS_CLIENT_CA"]) == (
        "/etc/lethe/tls/tls.crt", "/etc/lethe/tls/tls.key", "/etc/lethe/client-ca/ca.crt")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/lethe/tls"]["readOnly"] and "subPath" not in mounts["/etc/lethe/tls"]  # rotations reach it
    readiness = container["readinessProbe"]["exec"]["command"]
    assert readiness[:2] == ["python", "-c"] and "grpc" not in container["readinessProbe"]

    ca_pem, cert_pem, key_pem = _certificates(server_name="lethe.privacy.svc")
    (tmp_path / "tls.crt").write_bytes(cert_pem)
    (tmp_path / "tls.key").write_bytes(key_pem)
    (tmp_path / "ca.crt").write_bytes(ca_pem)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True))
    server.start()
    try:
        command = [sys.executable, *readiness[1:]]
        command[3] = str(port)  # the rendered port is the container's; the test server has its own
        command[5] = str(tmp_path / "ca.crt")
        env = {"LETHE_TLS_CERT": str(tmp_path / "tls.crt"), "LETHE_TLS_KEY": str(tmp_path / "tls.key")}
        for status, expected in ((health_pb2.HealthCheckResponse.SERVING, 0),
                                 (health_pb2.HealthCheckResponse.NOT_SERVING, 1)):
            health_servicer.set("lethe.v1.UnlearningService", status)
            probe = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
            assert probe.returncode == expected, probe.stderr
    finally:
        server.stop(0)


def _certificates(server_name: str) -> tuple[bytes, bytes, bytes]:
    """A throwaway CA and a certificate for ``server_name`` usable as server and client (cert-manager's
    usages: server auth, client auth)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (ca.public_bytes(pem), cert.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


# ------------------------------------------------------------------------------------------------- RBAC
def test_kubernetes_executor_rbac_is_namespaced_and_minimal():
    objects = manifests(_values("scale-out-gpu-jobs"))
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    role = one(objects, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r["verbs"] for r in role["rules"]}
    assert rules == {(("batch",), ("jobs",)): ["create", "get", "list", "watch", "delete"],
                     (("",), ("pods", "pods/log")): ["get", "list"]}
    binding = one(objects, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    api = one(objects, "Deployment", "lethe")["spec"]["template"]["spec"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": api["serviceAccountName"],
                                    "namespace": NAMESPACE}]
    env = container_env(objects, api["containers"][0])
    job_account = one(objects, "ServiceAccount", env["LETHE_KUBERNETES_SERVICE_ACCOUNT"])
    assert job_account["automountServiceAccountToken"] is False  # Job pods never talk to the Kubernetes API
    for profile in ("defaults", "tls", "everything"):
        assert not by_kind(manifests(_values(profile)), "Role"), profile


def test_kubernetes_job_template_values_reach_the_executor_settings():
    objects = manifests(_values("scale-out-gpu-jobs"))
    env = container_env(objects, one(objects, "Deployment", "lethe")["spec"]["template"]["spec"]["containers"][0])
    assert env["LETHE_EXECUTOR"] == "kubernetes" and env["LETHE_KUBERNETES_NAMESPACE"] == NAMESPACE
    assert env["LETHE_KUBERNETES_IMAGE"] == "lethe:0.1.0"
    assert env["LETHE_KUBERNETES_GPU_COUNT"] == "2"
    assert json.loads(env["LETHE_KUBERNETES_NODE_SELECTOR"]) == {"nvidia.com/gpu.present": "true"}
    assert json.loads(env["LETHE_KUBERNETES_TOLERATIONS"]) == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert (env["LETHE_KUBERNETES_PRIORITY_CLASS"], env["LETHE_KUBERNETES_CPU"], env["LETHE_KUBERNETES_MEMORY"]) == (
        "lethe-unlearning", "4", "16Gi")
    assert (env["LETHE_KUBERNETES_ACTIVE_DEADLINE_S"], env["LETHE_KUBERNETES_TTL_AFTER_FINISHED_S"],
            env["LETHE_KUBERNETES_BACKOFF_LIMIT"]) == ("7200", "600", "1")
    assert env["LETHE_KUBERNETES_ENV_SECRET"] == one(objects, "Secret")["metadata"]["name"]
    # Worker pods ask for GPUs as a quantity string, and run their jobs themselves.
    everything = manifests(_values("everything"))
    worker = one(everything, "Deployment", "lethe-worker")["spec"]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # Workers serve no RPC: no server key, no token file, no TLS settings.
    assert {v["name"] for v in worker["volumes"]} == {"tmp", "state"}
    assert not [k for k in container_env(everything, worker["containers"][0]) if k.startswith(("LETHE_TLS", "LETHE_AUTH_TOKENS"))]
    assert worker["containers"][0]["args"] == ["worker"]
    assert container_env(everything, worker["containers"][0])["LETHE_EXECUTOR"] == "inprocess"
    assert worker["tolerations"] and worker["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


# ------------------------------------------------------------------------------------- settings and env
@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_variable_the_chart_sets_is_a_setting_and_the_environment_parses(profile, monkeypatch):
    from service import settings as settings_module

    objects = manifests(_values(profile))
    known = settings_env_names()
    for name, spec in pod_specs(objects):
        for container in spec["containers"]:
            env = container_env(objects, container)
            lethe = {k for k in env if k.startswith("LETHE_")}
            assert lethe <= known, f"{name}: not settings: {sorted(lethe - known)}"
            assert REQUIRED_IN_CLUSTER <= lethe, f"{name}: missing {sorted(REQUIRED_IN_CLUSTER - lethe)}"
            required = {f"LETHE_{n.upper()}" for n, field in settings_module.Settings.model_fields.items()
                        if field.is_required()}
            assert required <= lethe
            # The values parse as Settings (types, bounds, JSON).
            for key in [k for k in __import__("os").environ if k.startswith("LETHE_")]:
                monkeypatch.delenv(key)
            for key, value in env.items():
                if key.startswith("LETHE_") and value is not None:
                    monkeypatch.setenv(key, value)
            parsed = settings_module.Settings()
            assert parsed.grpc_host == "0.0.0.0" and str(parsed.state_dir) == "/var/lib/lethe"
            assert parsed.audit_key is not None and parsed.subject_hash_key is not None


@pytest.mark.parametrize("profile", list(PROFILES))
def test_no_secret_in_a_configmap(profile):
    objects = manifests(_values(profile))
    for config_map in by_kind(objects, "ConfigMap"):
        data = config_map.get("data", {})
        assert not SECRET_SETTINGS & set(data), config_map["metadata"]["name"]
        text = json.dumps(data)
        assert not [value for value in SECRET_VALUES if value in text], config_map["metadata"]["name"]
    secret = [s for s in by_kind(objects, "Secret") if s["metadata"]["name"] == "lethe-env"]
    assert set(secret[0]["data"]) <= SECRET_SETTINGS and secret[0]["metadata"]["annotations"] == {
        "helm.sh/resource-policy": "keep"}


def test_keys_are_generated_as_hex_or_taken_from_values_and_an_existing_secret_replaces_them():
    import base64

    generated = one(manifests({}), "Secret")["data"]
    for key in ("LETHE_AUDIT_KEY", "LETHE_SUBJECT_HASH_KEY"):
        assert re.fullmatch(r"[0-9a-f]{64}", base64.b64decode(generated[key]).decode())
    given = one(manifests(_values("everything")), "Secret", "lethe-env")["data"]
    assert base64.b64decode(given["LETHE_AUDIT_KEY"]).decode() == "ab" * 32
    existing = manifests({"secrets": {"existingSecret": "lethe-keys-from-vault"}})
    assert not by_kind(existing, "Secret")
    container = one(existing, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "lethe-keys-from-vault"}} in container["envFrom"]


def test_values_table_and_readme_table_name_every_setting_and_config_defaults_match_settings():
    from service.settings import Settings

    known = settings_env_names()
    values_text = (CHART / "values.yaml").read_text()
    table = set(re.findall(r"^# \| (LETHE_\w+)(?: / (LETHE_\w+))?", values_text, re.M))
    in_table = {name for pair in table for name in pair if name}
    assert in_table == known, f"values.yaml table: missing {sorted(known - in_table)}, unknown {sorted(in_table - known)}"
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Configuration"):readme.index("## API overview")]
    in_readme = set(re.findall(r"`(LETHE_\w+)`", section))
    bench_only = {"LETHE_CACHE_DIR"}  # read by the benchmark harness, not by the service
    assert in_readme - bench_only == known, f"README: missing {sorted(known - in_readme)}, unknown {sorted(in_readme - known - bench_only)}"

    config = yaml.safe_load(values_text)["config"]
    defaults = Settings.model_fields
    for name, value in config.items():
        field = defaults[name.removeprefix("LETHE_").lower()]
        if value != "":
            assert value == field.default, f"values.yaml config.{name}={value!r}, Settings default {field.default!r}"


def test_notes_tell_how_to_reach_the_api_and_verify_the_audit_chain():
    text = notes({})
    assert "kubectl -n privacy port-forward svc/lethe 50051:50051" in text
    assert "kubectl -n privacy exec deploy/lethe -- lethe audit verify" in text
    assert "Back them up" in text
    assert "refuses settings whose feature is still being built" in notes(_values("tls"))


def test_dashboard_configmap_carries_the_dashboard_for_the_grafana_sidecar():
    objects = manifests(_values("everything"))
    dashboard = one(objects, "ConfigMap", "lethe-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Lethe"}
    assert json.loads(dashboard["data"]["lethe.json"]) == json.loads((CHART / "dashboards" / "lethe.json").read_text())
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    services = [s for s in by_kind(objects, "Service")
                if {p["name"] for p in s["spec"]["ports"]} >= {"metrics"}]
    assert {s["metadata"]["name"] for s in services} == {"lethe", "lethe-worker"}
    assert not by_kind(manifests({}), "ServiceMonitor") and not by_kind(manifests({}), "PrometheusRule")


def test_alert_tuning_values_named_in_the_runbooks_exist():
    """docs/operations.md names the values that tune each alert; they exist in values.yaml."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = (REPO / "docs" / "operations.md").read_text()
    for key in re.findall(r"`alerts\.(\w+)`", docs):
        assert key in values["alerts"], f"docs/operations.md names alerts.{key}, which values.yaml lacks"
