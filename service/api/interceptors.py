"""Server interceptors: logging, metrics, bearer-token auth, the error mapping, and the stream cap.

Each wraps the method's behaviour (unary or streaming alike) through :func:`wrap_handler`, so a servicer
method never logs, times, authorises, limits or catches anything itself. :func:`service.api.server.build_server`
installs them outermost first: logging, metrics, auth, errors, stream cap, so the error interceptor has set
the final status code before metrics and logging read it, an unauthenticated stream never takes a slot, and
the stream cap's refusal is mapped like every other domain error.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service import domain
from service.api import errors

log = logging.getLogger("service.api.access")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
# RPC latencies from sub-millisecond acks to hour-long watch streams.
RPC_DURATION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                          300, 1800, 3600)

Observer = Callable[[str, grpc.ServicerContext], contextlib.AbstractContextManager]


def wrap_handler(handler: grpc.RpcMethodHandler | None, method: str,
                 wrap: Callable[[Callable, bool, str], Callable]) -> grpc.RpcMethodHandler | None:
    """A copy of ``handler`` whose behaviour is ``wrap(behaviour, response_streaming, method)``."""
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
                   request_deserializer=handler.request_deserializer,
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


def rpc_metrics(registry: CollectorRegistry) -> _RpcMetrics:
    """The RPC collectors of ``registry``, created once however many servers and interceptors share it."""
    if registry not in _METRICS_BY_REGISTRY:
        _METRICS_BY_REGISTRY[registry] = _RpcMetrics(registry)
    return _METRICS_BY_REGISTRY[registry]


_METRICS_BY_REGISTRY: "weakref.WeakKeyDictionary[CollectorRegistry, _RpcMetrics]" = weakref.WeakKeyDictionary()


class MetricsInterceptor(_ObservingInterceptor):
    """Prometheus RPC counters and durations. Labels are bounded: method names come from the proto (the
    full path; unknown methods never reach a handler) and status codes from gRPC's fixed set."""

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
            self._metrics.duration.labels(method).observe(time.perf_counter() - start)
            self._metrics.handled.labels(method, status_name(context, failure)).inc()


class StreamLimitInterceptor(grpc.ServerInterceptor):
    """Caps the response streams open at once, so the server's remaining threads stay free for unary calls
    and health checks (the reasoning is at ``Settings.grpc_max_workers``).

    A stream over the cap is refused at once with RESOURCE_EXHAUSTED instead of being queued: a queued
    stream would wait for a thread that another stream may hold for hours, while its client could reconnect
    to another replica now (``service.api.client`` retries RESOURCE_EXHAUSTED with back-off). The slot is
    taken when the stream's handler starts and given back when its generator ends, fails or is cancelled.
    """

    def __init__(self, max_streams: int, registry: CollectorRegistry | None = None):
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        self.max_streams = max_streams
        self._slots = threading.BoundedSemaphore(max_streams)
        self._open = rpc_metrics(registry).open_streams if registry is not None else None

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        return wrap_handler(handler, handler_call_details.method, around(self._slot))

    @contextlib.contextmanager
    def _slot(self, method: str, context: grpc.ServicerContext):
        if not self._slots.acquire(blocking=False):
            raise domain.ResourceExhausted(
                f"this replica already serves {self.max_streams} open streams (LETHE_GRPC_MAX_WORKERS minus the "
                "threads reserved for unary calls and health checks); retry with back-off or use another replica")
        if self._open is not None:
            self._open.inc()
        try:
            yield
        finally:
            if self._open is not None:
                self._open.dec()
            self._slots.release()


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call except health checks (Kubernetes probes
    carry no credentials). Compared in constant time."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(HEALTH_PREFIX) or self._authorized(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)

        def refuse(behavior, response_streaming, method):
            def reject(request, context):
                errors.abort(context, domain.Unauthenticated(
                    "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')"), method)
            return reject

        return wrap_handler(continuation(handler_call_details), method, refuse)

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(presented, self._expected)
        return False
