"""The ONE translation of exceptions into gRPC status, for unary calls and stream messages alike.

Typed domain errors (:class:`service.domain.ServiceError` subclasses) become their status code with rich
details in the trailing metadata (``grpc-status-details-bin``): a ``google.rpc.Status`` holding a
``google.rpc.ErrorInfo`` (machine-readable reason, domain ``lethe.v1``) and, when the error names fields, a
``google.rpc.BadRequest`` with one field violation each. Clients read them with
``grpc_status.rpc_status.from_call(error)``.

Anything else is a bug: its stack is logged here with a short error id, and the client gets INTERNAL with
only that id, never the exception text (it may hold paths, SQL or subject data).
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service import domain

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
    domain.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@dataclass(frozen=True)
class MappedError:
    """An exception as the client will see it."""

    code: grpc.StatusCode
    message: str
    reason: str  # ErrorInfo.reason, e.g. "INVALID_ARGUMENT" or "INTERNAL"
    violations: tuple[domain.FieldViolation, ...]
    error_id: str | None = None  # set for unexpected errors: the key to the logged stack

    def to_rpc_status(self) -> status_pb2.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)
        if self.error_id:
            info.metadata["error_id"] = self.error_id
        details = [_pack(info)]
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
        log.info("%s -> %s: %s%s", where or "call", code.name, error.message,
                 "".join(f"; {v.field}: {v.description}" for v in error.violations))
        log.debug("stack of the %s refusal", code.name, exc_info=error)
        return MappedError(code, error.message, _reason(error), tuple(error.violations))
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
    return types_pb2.SubmissionRejected(
        request_id=request_id,
        code=mapped.code.value[0],
        message=mapped.message,
        field_violations=[types_pb2.FieldViolation(field=v.field, description=v.description)
                          for v in mapped.violations],
    )


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
