"""Assembles and runs the gRPC server.

:func:`build_server` is the one place the server is put together: interceptors (logging, metrics, errors,
access, stream cap, unary deadline, safe decoding; see :mod:`service.api.interceptors`), the Lethe servicer,
standard health checking and server reflection, and the bound port: TLS (with mutual TLS and certificate
rotation, :mod:`service.api.tls`) when ``tls_cert`` is set, plaintext otherwise.
:func:`serve` is the process entry point (``lethe serve``): start the engine, the metrics exporter and the
server, wait for SIGTERM/SIGINT, then shut down with a grace period (health turns NOT_SERVING first, so a
load balancer stops routing; in-flight calls get ``grace_s`` to finish; the engine stops last, and an
interrupted job resumes from the durable store at the next start).
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from service import domain
from service.api import errors, interceptors
from service.api.auth import Authenticator
from service.api.limits import ApiLimits, RateLimiter, StreamSlots
from service.api.pb import SERVICE_NAME, service_grpc, service_pb2
from service.api.servicer import UnlearningServicer
from service.api.session import DEFAULT_POLL_S
from service.api.tls import CertificateFiles, server_credentials
from service.settings import Settings, stream_budgets

log = logging.getLogger(__name__)


DEFAULT_GRACE_S = 10.0

_SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second server on the same port must fail to bind, not share it
    ("grpc.keepalive_time_ms", 60_000),  # keep long event streams alive through idle NATs and proxies
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass
class ApiServer:
    """A built (bound, not yet started) server."""

    server: grpc.Server
    port: int
    address: str
    health: health.HealthServicer
    certificates: CertificateFiles | None = None  # set when the port speaks TLS
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    security: str = "plaintext, no authentication"  # for the start-up log line

    def start(self) -> None:
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("Lethe gRPC API listening on %s (%s)", self.address, self.security)

    def stop(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        """NOT_SERVING first, then refuse new calls and give in-flight ones ``grace_s`` to finish."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        for stop in self.on_stop:
            stop()


def build_server(settings: Settings, engine: domain.EngineProtocol, *,
                 metrics_registry: CollectorRegistry | None = None,
                 poll_s: float = DEFAULT_POLL_S) -> ApiServer:
    """Build the server around ``engine``: interceptors, servicers, health, reflection; bind the port.

    RPC metrics go to ``metrics_registry``, by default the engine's (``engine.metrics.registry``) so one
    ``/metrics`` endpoint shows both. ``settings.grpc_port`` 0 binds a free port (see ``ApiServer.port``).
    The pool has ``settings.grpc_max_workers`` threads, of which streams may hold all but
    ``RESERVED_GRPC_WORKERS``: health checks and unary calls always find a thread (each open Session also
    runs a reader and a poller thread of its own, outside the pool).
    """
    if metrics_registry is None:
        engine_metrics = getattr(engine, "metrics", None)
        metrics_registry = getattr(engine_metrics, "registry", None) or CollectorRegistry()
    token = settings.auth_token.get_secret_value() if settings.auth_token is not None else None
    authenticator = Authenticator(token or None, settings.auth_tokens_file, settings.subject_hash_key_bytes)
    limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    deadline = interceptors.DeadlineInterceptor(settings.unary_deadline_s, settings.grpc_max_workers)
    chain: list[grpc.ServerInterceptor] = [
        interceptors.LoggingInterceptor(),
        interceptors.MetricsInterceptor(metrics_registry),
        interceptors.ErrorInterceptor(),
        interceptors.AccessInterceptor(authenticator, limiter, StreamSlots(settings.max_streams_per_identity),
                                       metrics_registry),
        interceptors.StreamLimitInterceptor(*stream_budgets(settings.grpc_max_workers),
                                            frozenset({f"/{SERVICE_NAME}/Session"}), metrics_registry),
        deadline,
        interceptors.DecodeInterceptor(in_band=frozenset({f"/{SERVICE_NAME}/Session"})),
    ]
    served = service_pb2.DESCRIPTOR.services_by_name["UnlearningService"].methods
    unlisted = {f"/{SERVICE_NAME}/{method.name}" for method in served} - set(errors.ALLOWED_ROLES)
    if unlisted:  # a new RPC without a row would be refused to everyone: say so at start-up
        raise RuntimeError(f"RPCs without a row in service.api.errors.ALLOWED_ROLES: {sorted(unlisted)}")

    options = [*_SERVER_OPTIONS, ("grpc.max_receive_message_length", settings.max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.grpc_max_workers,
                                                    thread_name_prefix="lethe-grpc"),
                         interceptors=chain, options=options)
    limits = ApiLimits(max_id_length=settings.max_id_length, max_ids_per_request=settings.max_ids_per_request,
                       max_unacked_messages=settings.max_unacked_messages, rate=limiter,
                       limited=interceptors.rpc_metrics(metrics_registry).limited,
                       auth_refusals=interceptors.rpc_metrics(metrics_registry).auth_refusals)
    service_grpc.add_UnlearningServiceServicer_to_server(UnlearningServicer(engine, poll_s, limits), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)  # SERVING once started
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    host = f"[{settings.grpc_host}]" if ":" in settings.grpc_host else settings.grpc_host
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise RuntimeError("LETHE_TLS_CLIENT_CA (mutual TLS) needs LETHE_TLS_CERT and LETHE_TLS_KEY; refusing to "
                           "serve plaintext")
    certificates = None
    if settings.tls_cert is not None:
        credentials, certificates = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        port = server.add_secure_port(f"{host}:{settings.grpc_port}", credentials)
    else:
        port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
    if port == 0:
        raise RuntimeError(f"could not bind the gRPC server to {host}:{settings.grpc_port}")
    transport = ("mutual TLS" if settings.tls_client_ca else "TLS") if certificates is not None else "plaintext"
    credentials = ("credentials file" if settings.auth_tokens_file else "one token" if token
                   else "no authentication")
    return ApiServer(server, port, f"{host}:{port}", health_servicer, certificates, [deadline.shutdown],
                     f"{transport}, {credentials}")


def serve(settings: Settings, grace_s: float = DEFAULT_GRACE_S, stop: threading.Event | None = None) -> int:
    """Run Lethe until SIGTERM/SIGINT (or ``stop`` is set). Returns the process exit status."""
    from service.engine import Engine
    from service.metrics import start_metrics_server

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda number, _frame: (log.info("signal %d: shutting down", number), stop.set()))

    engine = Engine(settings)
    engine.start()
    metrics_server = None
    api = None
    try:
        metrics_server = start_metrics_server(engine.metrics, settings.metrics_port, settings.metrics_host)
        if metrics_server is not None:
            log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
        api = build_server(settings, engine)
        api.start()
        stop.wait()
    finally:
        if api is not None:
            api.stop(grace_s)
        engine.stop(grace_s)
        if metrics_server is not None:
            metrics_server.shutdown()
    log.info("Lethe stopped")
    return 0
