"""The ONE translation of exceptions into gRPC status, for unary calls and stream messages alike.

Typed domain errors (:class:`service.domain.ServiceError` subclasses) become their status code with rich
details in the trailing metadata (``grpc-status-details-bin``): a ``google.rpc.Status`` holding a
``google.rpc.ErrorInfo`` (machine-readable reason, domain ``lethe.v1``) and, when the error names fields, a
``google.rpc.BadRequest`` with one field violation each. Clients read them with
``grpc_status.rpc_status.from_call(error)``.

Anything else is a bug: its stack is logged here with a short error id, and the client gets INTERNAL with
only that id, never the exception text (it may hold paths, SQL or subject data).

Every status is bounded (:data:`MAX_MESSAGE_BYTES`, :data:`MAX_VIOLATIONS`...) and printable, whatever a
hostile client put in the fields an error names: a status travels in the trailing metadata, whose size a
client limits (8 KiB by default), and it is logged.

Next to the error map is the other table every call goes through: :data:`ALLOWED_ROLES`, the roles that
may call each RPC (enforced by :class:`service.api.interceptors.AccessInterceptor`).
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service import domain
from service.domain import Role

if TYPE_CHECKING:
    from service.api.pb import types_pb2

log = logging.getLogger(__name__)

ERROR_DOMAIN = "lethe.v1"

# Most specific first is not needed: lookup walks the exception's MRO, so an engine subclass of
# InvalidArgument maps like InvalidArgument.
_STATUS_BY_ERROR: dict[type[domain.ServiceError], grpc.StatusCode] = {
    domain.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    domain.NotFound: grpc.StatusCode.NOT_FOUND,
    domain.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    domain.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    domain.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    domain.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    domain.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    domain.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    domain.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# ------------------------------------------------------------------------------------------ who may call what
_SERVICE = "/lethe.v1.UnlearningService/"
SUBMITTER, AUDITOR, OPERATOR = Role.SUBMITTER, Role.AUDITOR, Role.OPERATOR
EVERY_ROLE = frozenset(Role)
READ_EVERYTHING = frozenset({AUDITOR, OPERATOR})
"""Roles that read every request; a SUBMITTER reads only requests it submitted (answers about any other
request or job are PERMISSION_DENIED, the same whether or not it exists)."""

ALLOWED_ROLES: dict[str, frozenset[Role]] = {
    # Submissions; the Session also resumes (watches) the caller's own requests.
    _SERVICE + "Session": frozenset({SUBMITTER}),
    _SERVICE + "SubmitErasure": frozenset({SUBMITTER}),
    _SERVICE + "SubmitRectification": frozenset({SUBMITTER}),
    _SERVICE + "SubmitUpdate": frozenset({SUBMITTER}),
    # Reads: a submitter only of its own requests (checked per request in the servicer).
    _SERVICE + "GetJob": frozenset({SUBMITTER, AUDITOR, OPERATOR}),
    _SERVICE + "WatchJob": frozenset({SUBMITTER, AUDITOR, OPERATOR}),
    _SERVICE + "GetCertificate": frozenset({SUBMITTER, AUDITOR, OPERATOR}),
    _SERVICE + "GetRequest": frozenset({SUBMITTER, AUDITOR, OPERATOR}),
    _SERVICE + "ListJobs": READ_EVERYTHING,
    _SERVICE + "ListPendingRequests": READ_EVERYTHING,
    _SERVICE + "VerifyCertificate": READ_EVERYTHING,
    # Administration.
    _SERVICE + "RegisterModel": frozenset({OPERATOR}),
    _SERVICE + "CancelRequest": frozenset({OPERATOR}),
    _SERVICE + "RetryRequest": frozenset({OPERATOR}),
    _SERVICE + "CloseRequest": frozenset({OPERATOR}),
    # The schema, for grpcurl and the like: any authenticated identity.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": EVERY_ROLE,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": EVERY_ROLE,
}
"""The roles allowed to call each RPC: the ONE table the access interceptor reads. A method of the served
API missing here is refused to everyone (a test checks that every served method has a row); an unknown
method is authenticated first and then answered UNIMPLEMENTED, so its answer says nothing to a caller
without credentials."""

PUBLIC_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
"""Called without credentials, never rate limited: Kubernetes probes and load balancers carry none."""

# ------------------------------------------------------------------------------------------ status size
MAX_MESSAGE_BYTES = 300
MAX_VIOLATIONS = 10
MAX_FIELD_BYTES = 100
MAX_DESCRIPTION_BYTES = 200
"""Bounds of one status, in UTF-8 bytes: details of at most ~3.5 KiB (4.7 KiB in base64) plus the message
stay under a client's default 8 KiB metadata limit whatever a hostile request put in the fields named."""


@dataclass(frozen=True)
class MappedError:
    """An exception as the client will see it."""

    code: grpc.StatusCode
    message: str
    reason: str  # ErrorInfo.reason, e.g. "INVALID_ARGUMENT" or "INTERNAL"
    violations: tuple[domain.FieldViolation, ...]
    error_id: str | None = None  # set for unexpected errors: the key to the logged stack
    retry_after_s: float | None = None  # RESOURCE_EXHAUSTED: google.rpc.RetryInfo

    def to_rpc_status(self) -> status_pb2.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)
        if self.error_id:
            info.metadata["error_id"] = self.error_id
        details = [_pack(info)]
        if self.retry_after_s is not None:
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=retry_delay(self.retry_after_s))))
        if self.violations:
            bad_request = error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=violation.field, description=violation.description)
                for violation in self.violations
            ])
            details.append(_pack(bad_request))
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)


def map_exception(error: BaseException, where: str = "") -> MappedError:
    """Classify and log ``error``. ``where`` (the RPC method) only makes the log line useful."""
    if isinstance(error, domain.ServiceError):
        code = _status_for(type(error))
        message, violations = _bounded(error.message, error.violations)
        log.info("%s -> %s: %s%s", where or "call", code.name, message,
                 "".join(f"; {v.field}: {v.description}" for v in violations))
        log.debug("stack of the %s refusal", code.name, exc_info=error)
        retry_after_s = getattr(error, "retry_after_s", None) if code is grpc.StatusCode.RESOURCE_EXHAUSTED else None
        return MappedError(code, message, _reason(error), violations, retry_after_s=retry_after_s)
    error_id = uuid.uuid4().hex[:12]
    log.error("%s -> INTERNAL (error id %s): unexpected %s", where or "call", error_id, type(error).__name__,
              exc_info=error)
    return MappedError(grpc.StatusCode.INTERNAL, f"internal error (error id {error_id}); see the server log",
                       "INTERNAL", (), error_id)


def abort(context: grpc.ServicerContext, error: BaseException, where: str = "") -> None:
    """End the RPC with ``error`` mapped to a status with rich details. Never returns."""
    mapped = map_exception(error, where)
    context.abort_with_status(rpc_status.to_status(mapped.to_rpc_status()))


def rejection(error: BaseException, request_id: str, where: str = "") -> types_pb2.SubmissionRejected:
    """The in-stream form of the same mapping: one refused submission, the stream stays open."""
    from service.api.pb import types_pb2

    mapped = map_exception(error, where)
    rejected = types_pb2.SubmissionRejected(
        request_id=request_id,  # echoed whole: the client's key to match it (bounded by the message size)
        code=mapped.code.value[0],
        message=mapped.message,
        field_violations=[types_pb2.FieldViolation(field=v.field, description=v.description)
                          for v in mapped.violations],
    )
    if mapped.retry_after_s is not None:
        rejected.retry_delay.CopyFrom(retry_delay(mapped.retry_after_s))
    return rejected


def retry_delay(seconds: float) -> duration_pb2.Duration:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(max(seconds, 0.001) * 1e9))
    return delay


def _bounded(message: str, violations: tuple[domain.FieldViolation, ...]
             ) -> tuple[str, tuple[domain.FieldViolation, ...]]:
    """``message`` and ``violations`` cut to the status bounds and made printable."""
    kept = tuple(domain.FieldViolation(_truncate(v.field, MAX_FIELD_BYTES), _truncate(v.description,
                                                                                      MAX_DESCRIPTION_BYTES))
                 for v in violations[:MAX_VIOLATIONS])
    if len(violations) > MAX_VIOLATIONS:
        message = f"{message} (the first {MAX_VIOLATIONS} of {len(violations)} problems)"
    return _truncate(message, MAX_MESSAGE_BYTES), kept


def _truncate(text: str, max_bytes: int) -> str:
    text = "".join(c if c.isprintable() else "\ufffd" for c in str(text))
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes - 3].decode("utf-8", errors="ignore") + "..."


def _status_for(error_type: type) -> grpc.StatusCode:
    for klass in error_type.__mro__:
        if klass in _STATUS_BY_ERROR:
            return _STATUS_BY_ERROR[klass]
    return grpc.StatusCode.UNKNOWN  # a bare ServiceError: typed, but with no specific meaning


def _reason(error: domain.ServiceError) -> str:
    """UPPER_SNAKE reason from the most specific error class, e.g. ``UnknownModel`` -> ``UNKNOWN_MODEL``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).upper()


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


assert code_pb2.INVALID_ARGUMENT == grpc.StatusCode.INVALID_ARGUMENT.value[0]  # google.rpc.Code == gRPC code
