"""Server interceptors: logging, metrics, the error mapping, access (authentication, roles, per-identity
limits), the stream cap, the unary deadline and safe decoding.

Each wraps the method's behaviour (unary or streaming alike) through :func:`wrap_handler`, so a servicer
method never logs, times, authorises, limits or catches anything itself. :func:`service.api.server.build_server`
installs them outermost first: logging, metrics, errors, access, stream cap, deadline, decoding. So:

- the error interceptor maps every refusal below it (authentication, roles, limits, undecodable messages,
  deadlines) in the ONE place, before metrics and logging read the final status code;
- a call is authenticated before anything else answers it: an unknown method, an undecodable message and a
  call over a limit all get UNAUTHENTICATED first when the caller has no valid credential;
- an unauthenticated or refused stream never takes a stream slot.

Health checks (``errors.PUBLIC_METHODS``) skip authentication, limits and the deadline pool: Kubernetes
probes carry no credentials and must answer even when every other thread is busy.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service import domain
from service.api import errors
from service.api.auth import Authenticator, Identity
from service.api.limits import RateLimiter, StreamSlots

log = logging.getLogger("service.api.access")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
# RPC latencies from sub-millisecond acks to hour-long watch streams.
RPC_DURATION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                          300, 1800, 3600)

Observer = Callable[[str, grpc.ServicerContext], contextlib.AbstractContextManager]


def wrap_handler(handler: grpc.RpcMethodHandler | None, method: str,
                 wrap: Callable[[Callable, bool, str], Callable],
                 request_deserializer: Callable | None = None) -> grpc.RpcMethodHandler | None:
    """A copy of ``handler`` whose behaviour is ``wrap(behaviour, response_streaming, method)`` (and whose
    request deserializer is ``request_deserializer`` when given)."""
    if handler is None:
        return None
    shape = (handler.request_streaming, handler.response_streaming)
    attribute, factory = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }[shape]
    return factory(wrap(getattr(handler, attribute), handler.response_streaming, method),
                   request_deserializer=request_deserializer or handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def around(observe: Observer) -> Callable[[Callable, bool, str], Callable]:
    """Run ``observe(method, context)`` as a context manager around the whole call, including the
    iteration of a streamed response (a generator is only finished when its last message is sent)."""

    def wrap(behavior: Callable, response_streaming: bool, method: str) -> Callable:
        if not response_streaming:
            def unary_response(request, context):
                with observe(method, context):
                    return behavior(request, context)
            return unary_response

        def streamed_response(request, context) -> Iterator:
            with observe(method, context):
                yield from behavior(request, context)
        return streamed_response

    return wrap


def status_name(context: grpc.ServicerContext, error: BaseException | None = None) -> str:
    if isinstance(error, GeneratorExit):
        return "CANCELLED"  # the client went away mid-stream
    code = context.code()
    if code is None:
        return "OK" if error is None else "UNKNOWN"
    return code.name


class _ObservingInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        return wrap_handler(continuation(handler_call_details), method, around(self.observe))

    def observe(self, method: str, context: grpc.ServicerContext) -> contextlib.AbstractContextManager:
        raise NotImplementedError


class ErrorInterceptor(_ObservingInterceptor):
    """Turns every exception escaping a handler into a status, via :func:`service.api.errors.abort`."""

    @contextlib.contextmanager
    def observe(self, method, context):
        try:
            yield
        except grpc.RpcError:
            # Raised by reading the client's request stream: gRPC has already ended the call (the client
            # cancelled, or gRPC core refused a frame, e.g. one that fails to decompress). gRPC recognises
            # its own exception and ends quietly; there is no status left to set.
            log.debug("%s: the request stream ended the call", method)
            raise
        except Exception as error:
            if context.code() not in (None, grpc.StatusCode.OK):
                raise  # the handler already aborted with a status (context.abort raises to unwind)
            errors.abort(context, error, method)


class LoggingInterceptor(_ObservingInterceptor):
    """One access-log line per RPC: method, peer, status, duration. Health checks log at DEBUG only."""

    @contextlib.contextmanager
    def observe(self, method, context):
        start = time.perf_counter()
        failure: BaseException | None = None
        try:
            yield
        except BaseException as error:
            failure = error
            raise
        finally:
            level = logging.DEBUG if method.startswith(HEALTH_PREFIX) else logging.INFO
            log.log(level, "%s %s %s %.1f ms", method, context.peer(), status_name(context, failure),
                    (time.perf_counter() - start) * 1000)


class _RpcMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.handled = Counter("lethe_grpc_server_handled_total", "RPCs completed, by method and status code.",
                               ["grpc_method", "grpc_code"], registry=registry)
        self.duration = Histogram("lethe_grpc_server_handling_seconds",
                                  "RPC duration (a stream lasts until it closes).", ["grpc_method"],
                                  buckets=RPC_DURATION_BUCKETS_S, registry=registry)
        self.open_streams = Gauge("lethe_grpc_server_open_streams",
                                  "Response streams open now; each holds a server thread (LETHE_GRPC_MAX_WORKERS).",
                                  registry=registry)
        self.auth_refusals = Counter("lethe_grpc_auth_refusals_total",
                                     "Calls refused for their credentials (UNAUTHENTICATED) or roles "
                                     "(PERMISSION_DENIED), by method.", ["grpc_method", "grpc_code"],
                                     registry=registry)
        self.limited = Counter("lethe_grpc_limited_total",
                               "Calls and Session messages refused by a limit: rate, streams, unacked.",
                               ["limit"], registry=registry)


def rpc_metrics(registry: CollectorRegistry) -> _RpcMetrics:
    """The RPC collectors of ``registry``, created once however many servers and interceptors share it."""
    if registry not in _METRICS_BY_REGISTRY:
        _METRICS_BY_REGISTRY[registry] = _RpcMetrics(registry)
    return _METRICS_BY_REGISTRY[registry]


_METRICS_BY_REGISTRY: "weakref.WeakKeyDictionary[CollectorRegistry, _RpcMetrics]" = weakref.WeakKeyDictionary()


def method_label(method: str) -> str:
    """A bounded label: the method's full path when it is one the server knows, else ``unknown`` (clients
    choose the method names of unknown calls)."""
    return method if method in errors.ALLOWED_ROLES or method in errors.PUBLIC_METHODS else "unknown"


class MetricsInterceptor(_ObservingInterceptor):
    """Prometheus RPC counters and durations. Labels are bounded: method names come from the role table
    (:func:`method_label`) and status codes from gRPC's fixed set."""

    def __init__(self, registry: CollectorRegistry):
        self._metrics = rpc_metrics(registry)

    @contextlib.contextmanager
    def observe(self, method, context):
        start = time.perf_counter()
        failure: BaseException | None = None
        try:
            yield
        except BaseException as error:
            failure = error
            raise
        finally:
            label = method_label(method)
            self._metrics.duration.labels(label).observe(time.perf_counter() - start)
            self._metrics.handled.labels(label, status_name(context, failure)).inc()


class StreamLimitInterceptor(grpc.ServerInterceptor):
    """Caps the response streams open at once, so the server's remaining threads stay free for unary calls
    and health checks (the reasoning is at ``Settings.grpc_max_workers``).

    Two budgets (:func:`service.settings.stream_budgets`): the long-lived ``Session`` streams, and every other
    stream (``WatchJob``, server reflection, health ``Watch``), so a replica whose Sessions are at their cap
    still answers a new client's ``WatchJob`` or reflection query. A stream over its budget is refused at
    once with RESOURCE_EXHAUSTED instead of being queued: a queued stream would wait for a thread that
    another stream may hold for hours, while its client could reconnect to another replica now
    (``service.api.client`` retries RESOURCE_EXHAUSTED with back-off). The slot is taken when the stream's
    handler starts and given back when its generator ends, fails or is cancelled.
    """

    def __init__(self, session_streams: int, other_streams: int, session_methods: frozenset[str],
                 registry: CollectorRegistry | None = None):
        if session_streams < 1 or other_streams < 1:
            raise ValueError(f"stream budgets must be >= 1, got {session_streams} and {other_streams}")
        self._budgets = {True: (session_streams, threading.BoundedSemaphore(session_streams), "Session streams"),
                         False: (other_streams, threading.BoundedSemaphore(other_streams), "other streams")}
        self._session_methods = session_methods
        self._registry = registry
        self._open = rpc_metrics(registry).open_streams if registry is not None else None

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        return wrap_handler(handler, handler_call_details.method, around(self._slot))

    @contextlib.contextmanager
    def _slot(self, method: str, context: grpc.ServicerContext):
        budget, slots, what = self._budgets[method in self._session_methods]
        if not slots.acquire(blocking=False):
            if self._registry is not None:
                rpc_metrics(self._registry).limited.labels("streams").inc()
            raise domain.ResourceExhausted(
                f"this replica already serves {budget} {what} (its share of LETHE_GRPC_MAX_WORKERS minus the "
                "threads reserved for unary calls and health checks); retry with back-off or use another replica",
                retry_after_s=StreamSlots.RETRY_AFTER_S)
        if self._open is not None:
            self._open.inc()
        try:
            yield
        finally:
            if self._open is not None:
                self._open.dec()
            slots.release()


_IDENTITIES: "weakref.WeakKeyDictionary[grpc.ServicerContext, Identity]" = weakref.WeakKeyDictionary()


def identity_of(context: grpc.ServicerContext) -> Identity | None:
    """The identity :class:`AccessInterceptor` admitted for this call (None outside an admitted call)."""
    return _IDENTITIES.get(context)


class AccessInterceptor(grpc.ServerInterceptor):
    """Authentication, roles and per-identity limits, in that order, for every call but health checks.

    - The caller's credential (bearer token or mutual-TLS certificate, :class:`Authenticator`) becomes an
      :class:`Identity`, or the call ends UNAUTHENTICATED.
    - The identity's roles must meet the method's row of ``errors.ALLOWED_ROLES``, or PERMISSION_DENIED. A
      served method without a row is refused to everyone; an unknown method is answered UNIMPLEMENTED, but
      only to an authenticated caller (so the answer to a caller without credentials never reveals which
      methods exist).
    - The identity's token bucket (:class:`RateLimiter`) and, for streams, its stream slots
      (:class:`StreamSlots`), or RESOURCE_EXHAUSTED with retry info.

    Both refusals of the first two steps are counted in ``lethe_grpc_auth_refusals_total`` and carry one
    fixed message each, with nothing that tells an attacker which check failed or which roles would pass.
    """

    def __init__(self, authenticator: Authenticator, limiter: RateLimiter, stream_slots: StreamSlots,
                 registry: CollectorRegistry):
        self._authenticator = authenticator
        self._limiter = limiter
        self._stream_slots = stream_slots
        self._metrics = rpc_metrics(registry)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if method in errors.PUBLIC_METHODS:
            return handler
        if handler is None:  # authenticate first, then tell the caller the method does not exist
            return grpc.stream_stream_rpc_method_handler(self._admitting(_unknown_method, True, method, None))
        allowed = errors.ALLOWED_ROLES.get(method, frozenset())
        return wrap_handler(handler, method, lambda behavior, streaming, name:
                            self._admitting(behavior, streaming, name, allowed))

    def _admitting(self, behavior: Callable, response_streaming: bool, method: str,
                   allowed: frozenset[domain.Role] | None) -> Callable:
        if not response_streaming:
            def unary_response(request, context):
                self._admit(context, method, allowed)
                return behavior(request, context)
            return unary_response

        def streamed_response(request, context) -> Iterator:
            identity = self._admit(context, method, allowed)
            try:
                self._stream_slots.acquire(identity.name)
            except domain.ResourceExhausted:
                self._metrics.limited.labels("streams").inc()
                raise
            try:
                yield from behavior(request, context)
            finally:
                self._stream_slots.release(identity.name)
        return streamed_response

    def _admit(self, context: grpc.ServicerContext, method: str,
               allowed: frozenset[domain.Role] | None) -> Identity:
        label = method_label(method)
        try:
            identity = self._authenticator.authenticate(context.invocation_metadata(), context.auth_context())
        except domain.Unauthenticated:
            self._metrics.auth_refusals.labels(label, "UNAUTHENTICATED").inc()
            raise
        if allowed is not None and not identity.roles & allowed:
            self._metrics.auth_refusals.labels(label, "PERMISSION_DENIED").inc()
            raise domain.PermissionDenied("the caller's roles do not allow this call")
        try:
            self._limiter.check(identity.name)
        except domain.ResourceExhausted:
            self._metrics.limited.labels("rate").inc()
            raise
        _IDENTITIES[context] = identity
        return identity


def _unknown_method(request_iterator, context):
    raise domain.Unimplemented("no such method on this server")
    yield  # a generator: the handler of an unknown method may be called with any streaming shape


class DeadlineInterceptor(grpc.ServerInterceptor):
    """A server-side deadline on every unary call (``Settings.unary_deadline_s``).

    A synchronous handler cannot be interrupted, so it runs on a pool of its own while the gRPC thread waits
    at most ``deadline_s``; past that the call answers DEADLINE_EXCEEDED and the handler finishes (and may
    commit) in the background, its result dropped. That is why a client that saw DEADLINE_EXCEEDED must
    replay a submission with the same request id. Streams are bounded by the client's deadline and the
    stream caps instead; health checks skip the pool so a probe never waits behind a stuck call.
    """

    def __init__(self, deadline_s: float, max_workers: int):
        self.deadline_s = deadline_s
        self._pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="lethe-unary")

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        # Unary RPCs reach this point as request-streaming handlers (DecodeInterceptor takes their one message
        # itself), so "unary" here means a single response.
        if handler is None or handler.response_streaming or handler_call_details.method in errors.PUBLIC_METHODS:
            return handler
        return wrap_handler(handler, handler_call_details.method, self._bounded)

    def _bounded(self, behavior: Callable, response_streaming: bool, method: str) -> Callable:
        def bounded(request, context):
            future = self._pool.submit(behavior, request, context)
            try:
                return future.result(timeout=self.deadline_s)
            except futures.TimeoutError:
                raise domain.DeadlineExceeded(
                    f"the call did not finish within the server's deadline of {self.deadline_s:g} s; it may "
                    "still complete: replay a submission with the same request_id to learn its outcome") from None
        return bounded

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Undecodable:
    """Stands for a request message that did not decode (garbage or truncated bytes, invalid UTF-8 in a
    string field, nesting beyond protobuf's limit). Streams that understand it (the Session) answer it in
    band; everywhere else it becomes INVALID_ARGUMENT."""

    def __init__(self, size: int):
        self.size = size

    def error(self) -> domain.InvalidArgument:
        return domain.InvalidArgument("the request message does not decode", (domain.FieldViolation(
            "message", f"{self.size} bytes that are not a valid message of this method's request type"),))


class DecodeInterceptor(grpc.ServerInterceptor):
    """Bad request bytes answer INVALID_ARGUMENT, after authentication.

    gRPC's own answers say "server bug" or "no such thing" about a client's bad bytes: a message that does
    not deserialize is INTERNAL ("Exception deserializing request!"), and a unary call whose one message is
    missing or truncated (the stream ends inside the message) is UNIMPLEMENTED ("requires exactly one request
    message"), both before any interceptor runs. So:

    - the handler's deserializer is replaced by one that never raises (it returns :class:`Undecodable`);
    - a unary-request handler is served as a request-STREAMING one whose behaviour takes the first message
      itself: no (complete) message and an undecodable one are refused there, inside the interceptor chain,
      so after the caller was authenticated. A second message is ignored, as gRPC does;
    - streamed requests reach methods in ``in_band`` as Undecodable items (the Session answers them with a
      rejection and reads on); other streams end with INVALID_ARGUMENT at the first one.

    Left to gRPC core (C, before any Python): a frame with the compressed flag but no or an unknown
    ``grpc-encoding``, or a payload that fails to decompress, answers INTERNAL; nothing is read or written.
    """

    def __init__(self, in_band: frozenset[str] = frozenset()):
        self._in_band = in_band

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = _never_raising(handler.request_deserializer)
        method = handler_call_details.method
        if handler.request_streaming:
            in_band = method in self._in_band
            return wrap_handler(handler, method, lambda behavior, streaming, name: (
                lambda request_iterator, context: behavior(_checked_stream(request_iterator, in_band), context)),
                request_deserializer=decode)
        if handler.response_streaming:
            behavior, factory = handler.unary_stream, grpc.stream_stream_rpc_method_handler
        else:
            behavior, factory = handler.unary_unary, grpc.stream_unary_rpc_method_handler
        return factory(_first_message(behavior), request_deserializer=decode,
                       response_serializer=handler.response_serializer)


def _first_message(behavior: Callable) -> Callable:
    def from_stream(request_iterator, context):
        request = next(iter(request_iterator), None)
        if request is None:
            raise domain.InvalidArgument("a unary call needs one complete request message", (
                domain.FieldViolation("message", "missing or truncated"),))
        if isinstance(request, Undecodable):
            raise request.error()
        return behavior(request, context)
    return from_stream


def _never_raising(deserializer: Callable) -> Callable:
    def decode(data: bytes):
        try:
            return deserializer(data)
        except Exception:  # DecodeError, invalid UTF-8, recursion limit: all the client's bytes
            return Undecodable(len(data))
    return decode


def _checked_stream(request_iterator, in_band: bool) -> Iterator:
    for message in request_iterator:
        if isinstance(message, Undecodable) and not in_band:
            raise message.error()
        yield message
