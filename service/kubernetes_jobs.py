"""The ``kubernetes`` executor's half: one ``batch/v1`` Job per attempt of an unlearning job.

:func:`job_manifest` is the ONE place the Job is built (tests validate it with ``kubernetes-validate``
against the Kubernetes versions the chart supports, 1.27 (its oldest), 1.28 and 1.37 (the newest
kubernetes-validate knows), and check it
deserializes into the official client's ``V1Job``). :class:`KubernetesLauncher` creates it through the
official ``kubernetes`` client and watches it; :class:`service.executors.DispatchingExecutor` does the
rest (claim, lease until the pod's worker takes it over, release when the Job failed before that).

Design points:

- Deterministic name ``lethe-<job id>-a<attempt>``: a create retried after a timeout, or by another replica
  that reclaimed the dispatch, gets 409 Conflict and resumes watching the existing Job instead of starting a
  second worker. A new attempt (after a lease expired) is a new Job.
- ``restartPolicy: Never`` and ``backoffLimit``: pod retries are the Job controller's; each retried pod's
  ``lethe worker --once`` re-claims the job only once the dead pod's lease has expired.
- ``podFailurePolicy``: the worker's non-retryable exit codes (3: the job FAILED; 2: usage, e.g. an unknown
  job) fail the Job at once; pod disruptions (``DisruptionTarget``: preemption, node drain) are ignored, i.e.
  do not count against ``backoffLimit``.
- ``activeDeadlineSeconds`` bounds a runaway job; ``ttlSecondsAfterFinished`` garbage-collects finished Jobs.
- GPUs: ``nvidia.com/gpu`` limit (a quantity STRING: the client models of kubernetes 37.x validate types),
  node selector and tolerations from settings; secrets only by reference (``envFrom`` a Secret).
- The pod needs no Kubernetes API rights: ``automountServiceAccountToken: false``.

Run against a real cluster (kind) by hand: see the README, "Deploying".
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from service.scheduler import Claim
from service.settings import Settings
from service.worker import EXIT_JOB_FAILED, EXIT_USAGE

log = logging.getLogger(__name__)

CONTAINER = "worker"
NON_RETRYABLE_EXIT_CODES = (EXIT_USAGE, EXIT_JOB_FAILED)
# The versions the manifest is validated against: the chart's oldest (helm/lethe/Chart.yaml kubeVersion >=1.27),
# 1.28 (the oldest the scale-out issue names), and the newest kubernetes-validate knows.
SUPPORTED_KUBERNETES = ("1.27", "1.28", "1.37")
LABEL_JOB = "lethe.io/job-id"
LABEL_ATTEMPT = "lethe.io/attempt"


def job_name(job_id: str, attempt: int) -> str:
    """``lethe-<job id>-a<attempt>``: a valid DNS-1123 label (job ids are ``job-`` + 20 hex digits)."""
    name = f"lethe-{job_id}-a{attempt}".lower()
    if len(name) > 63:
        raise ValueError(f"job id {job_id!r} is too long for a Kubernetes Job name")
    return name


def job_manifest(settings: Settings, job_id: str, attempt: int) -> dict[str, Any]:
    """The ``batch/v1`` Job that runs ``lethe worker --once --job-id <job_id> --attempt <attempt>``."""
    labels = {"app.kubernetes.io/name": "lethe", "app.kubernetes.io/component": "unlearning-job",
              LABEL_JOB: job_id, LABEL_ATTEMPT: str(attempt)}
    gpus = settings.kubernetes_gpu_count
    limits = {"cpu": settings.kubernetes_cpu, "memory": settings.kubernetes_memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)  # quantities are strings
    env = [
        {"name": "LETHE_WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "LETHE_JOB_LEASE_S", "value": str(settings.job_lease_s)},
        {"name": "LETHE_JOB_MAX_ATTEMPTS", "value": str(settings.job_max_attempts)},
        {"name": "LETHE_MLFLOW_EXPERIMENT", "value": settings.mlflow_experiment},
        {"name": "LETHE_SERVING_ALIAS", "value": settings.serving_alias},
        {"name": "LETHE_DEVICE", "value": "cuda" if gpus else "cpu"},
        {"name": "LETHE_METRICS_PORT", "value": "0"},
    ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.kubernetes_image,
        "args": ["worker", "--once", "--job-id", job_id, "--attempt", str(attempt)],
        "env": env,
        "resources": {"requests": {"cpu": settings.kubernetes_cpu, "memory": settings.kubernetes_memory},
                      "limits": limits},
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
    }
    if settings.kubernetes_env_secret:
        container["envFrom"] = [{"secretRef": {"name": settings.kubernetes_env_secret}}]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "containers": [container],
    }
    if settings.kubernetes_service_account:
        pod["serviceAccountName"] = settings.kubernetes_service_account
    if settings.kubernetes_priority_class:
        pod["priorityClassName"] = settings.kubernetes_priority_class
    if settings.kubernetes_node_selector:
        pod["nodeSelector"] = dict(settings.kubernetes_node_selector)
    if settings.kubernetes_tolerations:
        pod["tolerations"] = [dict(toleration) for toleration in settings.kubernetes_tolerations]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(job_id, attempt), "namespace": settings.kubernetes_namespace,
                     "labels": labels},
        "spec": {
            "backoffLimit": settings.kubernetes_backoff_limit,
            "activeDeadlineSeconds": settings.kubernetes_active_deadline_s,
            "ttlSecondsAfterFinished": settings.kubernetes_ttl_after_finished_s,
            "podFailurePolicy": {"rules": [
                # onPodConditions: [] because the 1.27 and 1.28 schemas require the field on every rule.
                {"action": "FailJob", "onPodConditions": [],
                 "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                 "values": list(NON_RETRYABLE_EXIT_CODES)}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def load_api_client():
    """In a pod: the service account's in-cluster config; elsewhere: ``KUBECONFIG`` / ``~/.kube/config``."""
    import os

    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:  # KUBECONFIG read now: the library reads it once, at import
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    return client.ApiClient(configuration)


class KubernetesLauncher:
    """Creates the Job of one claim and watches it to its end (``Complete`` or ``Failed``)."""

    worker_dead_when_done = False  # a Failed Job's pod may still be terminating: let its lease lapse

    def __init__(self, settings: Settings, api_client=None):
        from kubernetes import client

        self.settings = settings
        self.batch = client.BatchV1Api(api_client or load_api_client())

    def launch(self, claim: Claim) -> str:
        from kubernetes.client.exceptions import ApiException

        manifest = job_manifest(self.settings, claim.job_id, claim.attempt)
        name = manifest["metadata"]["name"]
        try:
            self.batch.create_namespaced_job(self.settings.kubernetes_namespace, manifest)
            log.info("job %s attempt %d: created Kubernetes Job %s", claim.job_id, claim.attempt, name)
        except ApiException as error:
            if error.status != 409:
                raise
            log.info("Kubernetes Job %s exists already (a retried create); watching it", name)
        return name

    def wait(self, name: str, stopping: threading.Event, poll_s: float) -> bool | None:
        while True:
            status = self.batch.read_namespaced_job_status(name, self.settings.kubernetes_namespace).status
            for condition in (status.conditions if status is not None else None) or []:
                if condition.status == "True" and condition.type in ("Complete", "Failed"):
                    if condition.type == "Failed":
                        log.warning("Kubernetes Job %s failed: %s %s", name, condition.reason, condition.message)
                    return condition.type == "Complete"
            if stopping.wait(poll_s):
                return None
