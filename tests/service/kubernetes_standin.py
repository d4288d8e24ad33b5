"""A local HTTP STAND-IN for the Kubernetes ``batch/v1`` Job API. It is not a cluster and not a fake that
accepts anything: it serves just the calls Lethe's ``kubernetes`` executor makes (create a Job, read a
Job's status) over real HTTP to the official ``kubernetes`` client, and checks every created Job against
the same OpenAPI schema the manifest tests use (``kubernetes-validate``, strict, for ``version``); a Job
that fails the schema is answered 422 Unprocessable Entity, as an API server would.

With ``run_pods=True`` it also plays the Job controller for one container: it runs the container's
``args`` as ``python -m service.cli <args>`` locally, with the container's ``env`` (``fieldRef:
metadata.name`` resolved to the pod name) and ``envFrom`` Secrets taken from ``secrets``; it applies
``podFailurePolicy`` (``FailJob`` on the listed exit codes) and ``backoffLimit``, and sets the ``Complete`` or
``Failed`` condition. Images, node selectors, tolerations and GPU limits are validated, not scheduled.

The end-to-end check on a real cluster (kind) is a manual step: README, "Deploying".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kubernetes_validate

JOBS = re.compile(r"^/apis/batch/v1/namespaces/(?P<ns>[^/]+)/jobs(?:/(?P<name>[^/]+)(?P<status>/status)?)?$")
ROOT = Path(__file__).resolve().parents[2]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class BatchV1StandIn:
    def __init__(self, version: str = "1.37", run_pods: bool = False, secrets: dict[str, dict[str, str]] | None = None,
                 log_dir: Path | None = None):
        self.version = version
        self.run_pods = run_pods
        self.secrets = secrets or {}
        self.log_dir = log_dir
        self.jobs: dict[tuple[str, str], dict] = {}
        self.calls: list[tuple[str, str, int]] = []  # (method, path, status code)
        self.pod_exit_codes: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                standin._answer(self, *standin._get(self.path))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                standin._answer(self, *standin._post(self.path, self.rfile.read(length)))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # ------------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> BatchV1StandIn:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path, namespace: str = "lethe") -> Path:
        """A kubeconfig pointing the official client at this stand-in."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": "stand-in"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin",
                                                         "namespace": namespace}}]}))
        return path

    # ------------------------------------------------------------------------------------------ test controls
    def set_condition(self, namespace: str, name: str, kind: str, reason: str = "", message: str = "") -> None:
        with self._lock:
            job = self.jobs[(namespace, name)]
            job["status"].setdefault("conditions", []).append(
                {"type": kind, "status": "True", "reason": reason or kind, "message": message,
                 "lastProbeTime": _now(), "lastTransitionTime": _now()})

    # ------------------------------------------------------------------------------------------ API
    def _answer(self, handler, code: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        with self._lock:
            self.calls.append((handler.command, handler.path, code))
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _get(self, path: str) -> tuple[int, dict]:
        match = JOBS.match(path.split("?")[0])
        if not match or not match["name"]:
            return 404, _status(404, "NotFound", f"the stand-in does not serve GET {path}")
        with self._lock:
            job = self.jobs.get((match["ns"], match["name"]))
            return (200, json.loads(json.dumps(job))) if job else \
                (404, _status(404, "NotFound", f'jobs.batch "{match["name"]}" not found'))

    def _post(self, path: str, raw: bytes) -> tuple[int, dict]:
        match = JOBS.match(path.split("?")[0])
        if not match or match["name"]:
            return 404, _status(404, "NotFound", f"the stand-in does not serve POST {path}")
        body = json.loads(raw)
        try:
            kubernetes_validate.validate(body, self.version, strict=True)
        except kubernetes_validate.ValidationError as error:
            return 422, _status(422, "Invalid", f"Job is invalid for Kubernetes {self.version}: {error.message}")
        name = body["metadata"]["name"]
        if body["metadata"].get("namespace", match["ns"]) != match["ns"]:
            return 400, _status(400, "BadRequest", "the namespace of the body does not match the request")
        with self._lock:
            if (match["ns"], name) in self.jobs:
                return 409, _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
            body["metadata"].update(namespace=match["ns"], uid=f"uid-{len(self.jobs) + 1}",
                                    creationTimestamp=_now(), resourceVersion="1")
            body["status"] = {"startTime": _now(), "active": 1 if self.run_pods else 0}
            self.jobs[(match["ns"], name)] = body
        if self.run_pods:
            threading.Thread(target=self._run, args=(match["ns"], name), daemon=True).start()
        return 201, body

    # ------------------------------------------------------------------------------------------ "controller"
    def _run(self, namespace: str, name: str) -> None:
        job = self.jobs[(namespace, name)]
        spec = job["spec"]
        container = spec["template"]["spec"]["containers"][0]
        fail_codes = {code for rule in spec.get("podFailurePolicy", {}).get("rules", [])
                      if rule["action"] == "FailJob" for code in rule.get("onExitCodes", {}).get("values", [])}
        for pod_index in range(spec.get("backoffLimit", 6) + 1):
            pod = f"{name}-{pod_index}"
            env = {**os.environ}
            for source in container.get("envFrom", []):
                env.update(self.secrets[source["secretRef"]["name"]])
            for variable in container.get("env", []):
                if "value" in variable:
                    env[variable["name"]] = variable["value"]
                elif variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                    env[variable["name"]] = pod
            output = open(self.log_dir / f"{pod}.log", "ab") if self.log_dir else subprocess.DEVNULL
            code = subprocess.run([sys.executable, "-m", "service.cli", *container["args"]], env=env, cwd=ROOT,
                                  stdout=output, stderr=subprocess.STDOUT).returncode
            self.pod_exit_codes.setdefault(name, []).append(code)
            if code == 0:
                with self._lock:
                    job["status"].update(active=0, succeeded=1, completionTime=_now())
                self.set_condition(namespace, name, "Complete")
                return
            with self._lock:
                job["status"]["failed"] = job["status"].get("failed", 0) + 1
            if code in fail_codes:
                self.set_condition(namespace, name, "Failed", "PodFailurePolicy",
                                   f"container {container['name']} exited with {code}, matching a FailJob rule")
                return
        self.set_condition(namespace, name, "Failed", "BackoffLimitExceeded", "Job has reached the backoff limit")
