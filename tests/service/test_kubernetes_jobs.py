"""The ``kubernetes`` executor: the Job manifest (one function) validated with ``kubernetes-validate`` for the
Kubernetes versions the chart supports (1.27, its oldest; 1.28; 1.37, the newest kubernetes-validate knows) and against the official client's
models; the launcher's calls through the official client to a local batch/v1 STAND-IN (not a cluster,
:mod:`tests.service.kubernetes_standin`) that checks each request against the same schema; and the whole
executor end to end with the stand-in running the Job's ``lethe worker --once`` container locally."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import kubernetes_validate
import pytest
from kubernetes import client

from service.domain import ErasureRequest, JobState
from service.kubernetes_jobs import (
    CONTAINER,
    NON_RETRYABLE_EXIT_CODES,
    SUPPORTED_KUBERNETES,
    KubernetesLauncher,
    job_manifest,
    job_name,
)
from service.scheduler import Claim
from service.settings import Settings
from service.worker import EXIT_JOB_FAILED
from tests.service.kubernetes_standin import BatchV1StandIn

pytestmark = pytest.mark.kubernetes
JOB_ID = "job-0123456789abcdef0123"


def gpu_settings(tmp_path, **overrides) -> Settings:
    values = dict(state_dir=tmp_path, kubernetes_namespace="lethe", kubernetes_image="registry.example/lethe:1.2.3",
                  kubernetes_service_account="lethe-worker", kubernetes_gpu_count=1,
                  kubernetes_node_selector={"nvidia.com/gpu.present": "true"},
                  kubernetes_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                  kubernetes_priority_class="lethe-jobs", kubernetes_env_secret="lethe-env")
    return Settings(**{**values, **overrides})


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
@pytest.mark.parametrize("gpus", [1, 0])
def test_the_job_manifest_is_valid_for_the_supported_kubernetes_versions(tmp_path, version, gpus):
    assert kubernetes_validate.utils.latest_version().startswith(SUPPORTED_KUBERNETES[-1]), \
        "kubernetes-validate knows a newer Kubernetes: extend SUPPORTED_KUBERNETES (and the chart)"
    manifest = job_manifest(gpu_settings(tmp_path, kubernetes_gpu_count=gpus), JOB_ID, 2)
    kubernetes_validate.validate(manifest, version, strict=True)


def test_the_manifest_carries_the_scale_out_contract(tmp_path):
    manifest = job_manifest(gpu_settings(tmp_path), JOB_ID, 2)
    spec, pod = manifest["spec"], manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert manifest["metadata"]["name"] == "lethe-job-0123456789abcdef0123-a2" == job_name(JOB_ID, 2)
    assert container["args"] == ["worker", "--once", "--job-id", JOB_ID, "--attempt", "2"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert spec["backoffLimit"] == 2 and spec["activeDeadlineSeconds"] == 6 * 3600
    assert spec["ttlSecondsAfterFinished"] == 3600
    fail, ignore = spec["podFailurePolicy"]["rules"]
    assert fail == {"action": "FailJob", "onPodConditions": [], "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                         "values": list(NON_RETRYABLE_EXIT_CODES)}}
    assert EXIT_JOB_FAILED in NON_RETRYABLE_EXIT_CODES
    assert ignore["action"] == "Ignore" and ignore["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1", "quantities are strings"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["serviceAccountName"] == "lethe-worker" and pod["priorityClassName"] == "lethe-jobs"
    assert container["envFrom"] == [{"secretRef": {"name": "lethe-env"}}]
    assert not any("KEY" in variable["name"] or "URL" in variable["name"] for variable in container["env"]), \
        "secrets travel by reference (envFrom), never in the Job spec"


def test_the_manifest_deserializes_into_the_official_client_models(tmp_path):
    text = json.dumps(job_manifest(gpu_settings(tmp_path), JOB_ID, 1))
    job = client.ApiClient().deserialize(text, "V1Job", "application/json")  # 37.x validates field types
    assert isinstance(job, client.V1Job)
    assert job.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    assert job.spec.pod_failure_policy.rules[0].on_exit_codes.values == list(NON_RETRYABLE_EXIT_CODES)


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
def test_a_retried_create_gets_409_and_resumes_watching(tmp_path, version):
    settings = gpu_settings(tmp_path)
    with BatchV1StandIn(version) as standin:
        api = client.ApiClient(_configuration(standin))
        claim = Claim(JOB_ID, "digits", 1, "dispatch:api-0/abc")
        first = KubernetesLauncher(settings, api).launch(claim)
        again = KubernetesLauncher(settings, api).launch(claim)  # e.g. another replica, or a timed-out create
        assert first == again == job_name(JOB_ID, 1)
        assert [code for method, _path, code in standin.calls if method == "POST"] == [201, 409]
        standin.set_condition("lethe", first, "Complete")
        import threading

        assert KubernetesLauncher(settings, api).wait(first, threading.Event(), poll_s=0.05) is True
        failed = KubernetesLauncher(settings, api).launch(Claim(JOB_ID, "digits", 2, "dispatch:api-0/abc"))
        standin.set_condition("lethe", failed, "Failed", "PodFailurePolicy")
        assert KubernetesLauncher(settings, api).wait(failed, threading.Event(), poll_s=0.05) is False


def test_the_stand_in_refuses_what_an_api_server_would(tmp_path):
    manifest = job_manifest(gpu_settings(tmp_path), JOB_ID, 1)
    manifest["spec"]["template"]["spec"]["restartPolicyy"] = "Never"  # a typo: unknown field
    with BatchV1StandIn("1.28") as standin:  # raw HTTP: the official client (37.x) would refuse it itself
        request = urllib.request.Request(f"{standin.url}/apis/batch/v1/namespaces/lethe/jobs", method="POST",
                                         data=json.dumps(manifest).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 422
        assert "restartPolicyy" in json.loads(refused.value.read())["message"]


def _configuration(standin: BatchV1StandIn) -> client.Configuration:
    configuration = client.Configuration()
    configuration.host = standin.url
    return configuration


@pytest.mark.slow
def test_the_kubernetes_executor_runs_each_job_as_a_job_end_to_end(tmp_path, monkeypatch):
    """Engine (executor ``kubernetes``) -> official client -> stand-in -> ``lethe worker --once`` pod process."""
    from tests.service.conftest import fresh_subjects, make_engine, make_settings, wait_for_jobs

    state = tmp_path / "state"
    registrar, model = make_engine(state, start=False)  # registered on the embedded store, not started
    registrar.store.dispose()
    pod_env = make_settings(state).as_environment()  # what the chart's Secret would carry (envFrom)
    with BatchV1StandIn("1.37", run_pods=True, secrets={"lethe-env": pod_env}, log_dir=tmp_path) as standin:
        monkeypatch.setenv("KUBECONFIG", str(standin.kubeconfig(tmp_path / "kubeconfig")))
        from service.engine import Engine

        engine = Engine(make_settings(state, executor="kubernetes", kubernetes_namespace="lethe",
                                      kubernetes_env_secret="lethe-env", kubernetes_gpu_count=0))
        engine.start()
        try:
            outcome = engine.submit_erasure(ErasureRequest(request_id="k8s-1", subject_ids=fresh_subjects(2),
                                                           model_names=(model,)))
            (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=900)
            assert job.state is JobState.SUCCEEDED, (job.message, standin.pod_exit_codes)
            name = job_name(job.job_id, 1)
            assert ("lethe", name) in standin.jobs
            deadline = time.monotonic() + 120  # the job is SUCCEEDED; the pod process is still exiting
            while not standin.jobs[("lethe", name)]["status"].get("conditions") and time.monotonic() < deadline:
                time.sleep(0.2)
            assert standin.pod_exit_codes[name] == [0]
            assert standin.jobs[("lethe", name)]["status"]["conditions"][-1]["type"] == "Complete"
            assert len(engine.get_certificate("k8s-1")) == 1
        finally:
            engine.stop(10)
            engine.store.dispose()
