"""Fixtures for the API tests: a real in-process gRPC server around an engine, and a scripted in-memory
engine for the stream-protocol tests (ordering, resume, backfill) that must not depend on job timing."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

from service import domain
from service.api.client import Client
from service.api.server import ApiServer, build_server
from service.settings import Settings


@dataclass
class RunningApi:
    api: ApiServer
    client: Client
    registry: object = None  # the metrics registry, when the test passed one

    @property
    def stub(self):
        return self.client.stub

    @property
    def metadata(self):
        return self.client.metadata


@contextlib.contextmanager
def running_api(settings: Settings, engine: domain.EngineProtocol, token: str | None = None,
                poll_s: float = 0.05, credentials=None, metrics_registry=None) -> Iterator[RunningApi]:
    """A started server on a free loopback port and a connected client (TLS with ``credentials``); stopped
    on exit."""
    settings = settings.model_copy(update={"grpc_host": "127.0.0.1", "grpc_port": 0})
    api = build_server(settings, engine, poll_s=poll_s, metrics_registry=metrics_registry)
    api.start()
    client = Client(f"127.0.0.1:{api.port}", token, credentials)
    try:
        client.wait_ready(10)
        yield RunningApi(api, client)
    finally:
        client.close()
        api.stop(0.5)


class ScriptedEngine:
    """An in-memory EngineProtocol whose jobs advance only when the test says so.

    Same event semantics as the real engine: one global, strictly increasing seq; an ACCEPTED event per
    new request; PROGRESS events for the whole job; one TERMINAL event per request, carrying that
    request's certificate (a rejection: one TERMINAL event for all of the job's requests, no certificate).
    """

    def __init__(self):
        self._condition = threading.Condition()
        self._events: list[domain.JobEvent] = []
        self._seq = itertools.count(1)
        self._requests: dict[str, tuple[domain.ErasureRequest, domain.SubmitOutcome]] = {}
        self._jobs: dict[str, dict] = {}
        self._certificates: dict[str, list[domain.Certificate]] = {}
        self.submit_calls = 0

    # ------------------------------------------------------------------------------------ test controls
    def progress(self, job_id: str, stage: str, fraction: float) -> int:
        job = self._jobs[job_id]
        job["state"], job["stage"], job["progress"] = domain.JobState.RUNNING, stage, fraction
        return self._add(job_id, job["request_ids"], domain.EventKind.PROGRESS, domain.JobState.RUNNING, stage,
                         fraction)

    def succeed(self, job_id: str) -> int:
        job = self._jobs[job_id]
        job["state"], job["stage"], job["progress"] = domain.JobState.SUCCEEDED, "done", 1.0
        last = 0
        for request_id in job["request_ids"]:
            certificate = domain.Certificate(request_id, f'{{"job_id":"{job_id}","request_id":"{request_id}"}}',
                                             "0" * 64)
            self._certificates.setdefault(request_id, []).append(certificate)
            last = self._add(job_id, (request_id,), domain.EventKind.TERMINAL, domain.JobState.SUCCEEDED, "done",
                             1.0, certificate)
        return last

    def reject(self, job_id: str) -> int:
        job = self._jobs[job_id]
        job["state"], job["stage"], job["progress"] = domain.JobState.REJECTED_BY_VERIFICATION, "verify", 1.0
        return self._add(job_id, job["request_ids"], domain.EventKind.TERMINAL,
                         domain.JobState.REJECTED_BY_VERIFICATION, "verify", 1.0)

    def job_of(self, request_id: str) -> str:
        return self._requests[request_id][1].job_ids[0]

    # ------------------------------------------------------------------------------------ protocol
    def submit_update(self, request: domain.UpdateSubmission) -> domain.SubmitOutcome:
        """Scripted: every update is refused as the real engine refuses one without records."""
        raise domain.InvalidArgument("invalid update", (domain.FieldViolation("records", "no records"),))

    def submit_rectification(self, request: domain.RectificationSubmission) -> domain.SubmitOutcome:
        """Scripted: every rectification is refused as the real engine refuses one without records."""
        raise domain.InvalidArgument("invalid rectification", (domain.FieldViolation(
            "corrected_records", "name at least one record to correct"),))

    def submit_erasure(self, request: domain.ErasureRequest) -> domain.SubmitOutcome:
        self.submit_calls += 1
        if not request.request_id:
            raise domain.InvalidArgument("request_id is empty", (domain.FieldViolation(
                "request_id", "must not be empty"),))
        with self._condition:
            if request.request_id in self._requests:
                earlier, outcome = self._requests[request.request_id]
                if earlier != request:
                    raise domain.AlreadyExists(f"request {request.request_id!r} exists with another payload")
                return domain.SubmitOutcome(outcome.request_id, outcome.job_ids, False, outcome.first_event_seq)
            job_id = f"job-{len(self._jobs) + 1}"
            now = datetime.now(timezone.utc)
            self._jobs[job_id] = {"request_ids": (request.request_id,), "state": domain.JobState.QUEUED,
                                  "stage": "queued", "progress": 0.0, "created": now}
            seq = self._add(job_id, (request.request_id,), domain.EventKind.ACCEPTED, domain.JobState.QUEUED,
                            "queued", 0.0)
            outcome = domain.SubmitOutcome(request.request_id, (job_id,), True, seq)
            self._requests[request.request_id] = (request, outcome)
            return outcome

    def last_event_seq(self) -> int:
        with self._condition:
            return self._events[-1].seq if self._events else 0

    def events(self, after_seq: int = 0, job_ids: tuple[str, ...] = (), request_ids: tuple[str, ...] = (),
               wait_s: float = 0.0) -> list[domain.JobEvent]:
        deadline = time.monotonic() + wait_s
        with self._condition:
            while True:
                found = [event for event in self._events if event.seq > after_seq and (
                    (not job_ids and not request_ids) or event.job_id in job_ids
                    or set(event.request_ids) & set(request_ids))]
                remaining = deadline - time.monotonic()
                if found or remaining <= 0:
                    return found
                self._condition.wait(remaining)

    def get_job(self, job_id: str) -> domain.JobView:
        if job_id not in self._jobs:
            raise domain.NotFound(f"no job {job_id!r}", (domain.FieldViolation("job_id", "unknown job"),))
        job = self._jobs[job_id]
        return domain.JobView(job_id, "digits", "1", job["state"], job["stage"], job["progress"], "ssd-auto",
                              job["request_ids"], 1, job["created"], job["created"], None, "", {})

    def list_jobs(self, job_filter: domain.JobFilter) -> list[domain.JobView]:
        return [self.get_job(job_id) for job_id in self._jobs][:job_filter.limit]

    def get_certificate(self, request_id: str) -> list[domain.Certificate]:
        if request_id not in self._certificates:
            raise domain.NotFound(f"no certificate for request {request_id!r}")
        return list(self._certificates[request_id])

    def verify_certificate(self, body_json: str, signature: str) -> domain.CertificateCheck:
        return domain.CertificateCheck(signature == "0" * 64, "scripted")

    def register_model(self, registration: domain.ModelRegistration) -> domain.RegisteredModel:
        raise domain.NotFound(f"model {registration.model_name!r} is not in MLflow")

    def pending_requests(self) -> list[domain.PendingRequest]:
        return []

    def request_owners(self, request_ids: tuple[str, ...]) -> dict[str, str | None]:
        return {r: self._requests[r][0].submitter_hash for r in request_ids if r in self._requests}

    def _add(self, job_id, request_ids, kind, state, stage, fraction, certificate=None) -> int:
        with self._condition:
            event = domain.JobEvent(next(self._seq), job_id, tuple(request_ids), kind, state, stage, fraction, "",
                                    datetime.now(timezone.utc), certificate)
            self._events.append(event)
            self._condition.notify_all()
            return event.seq
