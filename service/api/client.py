"""A Python client for the Lethe API: channel with auth, error decoding, and a resuming Session driver.

Used by the CLI (``lethe submit`` / ``watch`` / ``demo``), the ack benchmark and the tests; it is also the
reference for how a data-governance system should drive the bidirectional stream: submit, read acks and
events, and on a broken connection reconnect with one ``Resume`` per awaited request (after the highest seq
seen for it) plus the submissions never acknowledged (idempotent by ``request_id``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from service.api.pb import service_grpc, service_pb2, types_pb2

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


class Client:
    """Channel + stub + bearer token. ``with Client(target) as client: client.stub.GetJob(...)``.

    ``credentials`` (``service.api.tls.channel_credentials``) makes the channel TLS (mutual TLS when they hold
    a client certificate); ``server_name`` overrides the name the server's certificate must carry (a probe
    connecting to 127.0.0.1 expects the service's DNS name).
    """

    def __init__(self, target: str, token: str | None = None, credentials: grpc.ChannelCredentials | None = None,
                 server_name: str | None = None):
        self.target = target
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        self.channel = (grpc.secure_channel(target, credentials, options=options) if credentials is not None
                        else grpc.insecure_channel(target, options=options))
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = service_grpc.UnlearningServiceStub(self.channel)

    def wait_ready(self, timeout_s: float) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def describe_error(error: grpc.RpcError) -> str:
    """``CODE: message`` plus the field violations carried in the rich status, one per line."""
    lines = [f"{error.code().name}: {error.details()}"]
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            lines += [f"  {violation.field}: {violation.description}" for violation in bad_request.field_violations]
    return "\n".join(lines)


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(error)
    found = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found += [(violation.field, violation.description) for violation in bad_request.field_violations]
    return found


@dataclass
class RequestProgress:
    """What the client knows about one request of a session. ``erasure`` holds the submission: an Erasure,
    an Update or a Rectification message."""

    erasure: types_pb2.Erasure | types_pb2.Update | types_pb2.Rectification
    accepted: types_pb2.SubmissionAccepted | None = None
    rejected: types_pb2.SubmissionRejected | None = None
    last_seq: int = 0  # highest event seq seen for this request: its resume point
    job_ids: set[str] = field(default_factory=set)
    terminal: dict[str, types_pb2.JobEvent] = field(default_factory=dict)  # job id -> TERMINAL event
    stage: str = ""
    fraction: float = 0.0
    certificates: dict[tuple[str, str], types_pb2.Certificate] = field(default_factory=dict)
    resumed: bool = False  # watched, not submitted here: its job ids are learnt from events only

    @property
    def request_id(self) -> str:
        return self.erasure.request_id

    @property
    def settled(self) -> bool:
        if self.rejected is not None:
            return True
        if self.accepted is None or (self.resumed and not self.terminal):
            return False
        return self.job_ids <= set(self.terminal)

    @property
    def states(self) -> list[int]:
        return [event.state for event in self.terminal.values()]


@dataclass
class SessionResult:
    requests: dict[str, RequestProgress]
    reconnects: int


def run_session(client: Client, erasures: Iterable[types_pb2.Erasure | types_pb2.Update | types_pb2.Rectification],
                on_response: Callable[[service_pb2.SessionResponse, RequestProgress | None], None] | None = None,
                resume: Iterable[tuple[str, int]] = (), max_reconnects: int = 10,
                backoff_s: float = 0.5, timeout_s: float | None = None) -> SessionResult:
    """Submit ``erasures`` (or updates and rectifications) on one Session and follow them until every one is
    settled.

    ``resume`` adds requests submitted earlier, as (request_id, after_seq), to watch without submitting.
    On a retryable failure the stream is reopened (up to ``max_reconnects`` times) and resumed. Raises
    :class:`grpc.RpcError` on a non-retryable failure or when the reconnects are used up.
    """
    progress: dict[str, RequestProgress] = {}
    for erasure in erasures:
        progress[erasure.request_id] = RequestProgress(erasure)
    for request_id, after_seq in resume:
        entry = progress.setdefault(request_id, RequestProgress(types_pb2.Erasure(request_id=request_id)))
        entry.accepted = types_pb2.SubmissionAccepted(request_id=request_id)  # known to the server already
        entry.last_seq = max(entry.last_seq, after_seq)
        entry.resumed = True
    reconnects = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        try:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            responses = client.stub.Session(_outgoing(progress), metadata=client.metadata, timeout=remaining)
            for response in responses:
                entry = _apply(progress, response)
                if on_response is not None:
                    on_response(response, entry)
            if all(entry.settled for entry in progress.values()):
                return SessionResult(progress, reconnects)
            raise _Incomplete()
        except (grpc.RpcError, _Incomplete) as error:
            retryable = isinstance(error, _Incomplete) or error.code() in RETRYABLE
            if not retryable or reconnects >= max_reconnects or (deadline and time.monotonic() > deadline):
                raise
            reconnects += 1
            time.sleep(backoff_s * min(2 ** (reconnects - 1), 8))


class _Incomplete(Exception):
    """The server closed the stream before every request was settled."""


def _outgoing(progress: dict[str, RequestProgress]) -> Iterator[service_pb2.SessionRequest]:
    """Resumes for acknowledged but unsettled requests, then every submission not yet acknowledged."""
    for entry in list(progress.values()):
        if entry.accepted is not None and not entry.settled:
            yield service_pb2.SessionRequest(resume=service_pb2.Resume(
                after_seq=max(entry.last_seq, entry.accepted.first_event_seq - 1, 0),
                request_ids=[entry.request_id]))
    for entry in list(progress.values()):
        if entry.accepted is None and entry.rejected is None:
            yield service_pb2.SessionRequest(**{_SUBMISSION_FIELD[type(entry.erasure).__name__]: entry.erasure})


_SUBMISSION_FIELD = {"Erasure": "erasure", "Update": "update", "Rectification": "rectification"}


def _apply(progress: dict[str, RequestProgress], response: service_pb2.SessionResponse) -> RequestProgress | None:
    kind = response.WhichOneof("message")
    if kind == "accepted":
        entry = progress.get(response.accepted.request_id)
        if entry is not None:
            entry.accepted = response.accepted
            entry.job_ids.update(response.accepted.job_ids)
        return entry
    if kind == "rejected":
        entry = progress.get(response.rejected.request_id)
        if entry is not None and response.rejected.code != grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]:
            entry.rejected = response.rejected
        # RESOURCE_EXHAUSTED (a rate limit, too many unread answers): nothing was stored; the submission
        # stays unacknowledged and is re-sent on the next connection, after the back-off.
        return entry
    event = response.event
    entry = None
    for request_id in event.request_ids:
        current = progress.get(request_id)
        if current is None:
            continue
        entry = entry or current
        current.job_ids.add(event.job_id)
        current.last_seq = max(current.last_seq, event.seq)
        current.stage, current.fraction = event.stage, event.fraction
        if event.kind == types_pb2.EVENT_KIND_TERMINAL:
            current.terminal[event.job_id] = event
            for certificate in event.certificates:
                if certificate.request_id == request_id:
                    current.certificates[(certificate.request_id, certificate.signature)] = certificate
    return entry
