"""What one caller may read: everything, or (a submitter) only its own requests and what concerns them.

An identity with ``auditor`` or ``operator`` reads everything (``errors.READ_EVERYTHING``). A submitter
reads only requests whose stored ``submitter_hash`` is its own, and the jobs serving them:

- a job, request or certificate that is not its own answers PERMISSION_DENIED with one fixed message,
  whether or not it exists (no oracle for other clients' ids);
- a coalesced job serves other clients' requests too: their request ids are removed from the job and its
  events, and their TERMINAL events (which carry their certificates) are not sent.

Every id a call names is checked with the one id rule (``service.domain.id_problem``) before any lookup,
and no message quotes it whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from service import domain
from service.api.auth import Identity
from service.api.limits import ApiLimits

NOT_YOURS = "no such job or request for this caller"


class Scope:
    def __init__(self, engine: domain.EngineProtocol, identity: Identity | None, limits: ApiLimits,
                 method: str = ""):
        self._engine = engine
        self.identity = identity
        self.limits = limits
        self.method = method  # the RPC's full path, for the refusal metric

    def denied(self) -> domain.PermissionDenied:
        """The one refusal of a request or job that is not the caller's, counted like the access refusals."""
        if self.limits.auth_refusals is not None:
            from service.api.interceptors import method_label

            self.limits.auth_refusals.labels(method_label(self.method), "PERMISSION_DENIED").inc()
        return domain.PermissionDenied(NOT_YOURS)

    @property
    def restricted(self) -> bool:
        """True for a caller that may read only its own requests."""
        return self.identity is not None and not self.identity.reads_everything

    @property
    def submitter_hash(self) -> str | None:
        return self.identity.hash if self.identity is not None else None

    # ------------------------------------------------------------------------------------------ ids
    def check_id(self, value: str, field: str) -> None:
        problem = domain.id_problem(value, self.limits.max_id_length)
        if problem:
            raise domain.InvalidArgument(f"invalid {field}", (domain.FieldViolation(field, problem),))

    def check_ids(self, values: Iterable[str], field: str) -> None:
        values = list(values)
        if len(values) > self.limits.max_ids_per_request:
            raise domain.InvalidArgument(f"too many {field}", (domain.FieldViolation(
                field, f"{len(values)} ids; at most {self.limits.max_ids_per_request} per request"),))
        violations = []
        for index, value in enumerate(values):
            problem = domain.id_problem(value, self.limits.max_id_length)
            if problem:
                violations.append(domain.FieldViolation(f"{field}[{index}]", problem))
        if violations:
            raise domain.InvalidArgument(f"invalid {field}", tuple(violations))

    # ------------------------------------------------------------------------------------------ reads
    def own_requests(self, request_ids: Iterable[str]) -> set[str]:
        """The ids among ``request_ids`` this caller may read (all of them when it reads everything; known
        or not: the engine answers for unknown ones)."""
        request_ids = tuple(dict.fromkeys(request_ids))
        if not self.restricted:
            return set(request_ids)
        owners = self._engine.request_owners(request_ids)
        return {request_id for request_id in request_ids if owners.get(request_id) == self.identity.hash}

    def require_request(self, request_id: str, field: str = "request_id") -> None:
        self.check_id(request_id, field)
        if self.restricted and not self.own_requests((request_id,)):
            raise self.denied()

    def job(self, job_id: str, field: str = "job_id") -> domain.JobView:
        """The job as this caller may see it (NotFound for an unknown job, PermissionDenied instead for a
        restricted caller, so that both cases look the same)."""
        self.check_id(job_id, field)
        try:
            job = self._engine.get_job(job_id)
        except domain.NotFound:
            if self.restricted:
                raise self.denied() from None
            raise
        if not self.restricted:
            return job
        mine = self.own_requests(job.request_ids)
        if not mine:
            raise self.denied()
        return dataclasses.replace(job, request_ids=tuple(r for r in job.request_ids if r in mine))

    def event(self, event: domain.JobEvent, mine: set[str]) -> domain.JobEvent | None:
        """``event`` as a restricted caller owning ``mine`` may see it: None when it concerns none of its
        requests, else without the other requests' ids."""
        if not self.restricted:
            return event
        visible = tuple(r for r in event.request_ids if r in mine)
        if not visible and event.request_ids:
            return None
        if event.certificate is not None and event.certificate.request_id not in mine:
            return None
        return dataclasses.replace(event, request_ids=visible) if visible != event.request_ids else event
