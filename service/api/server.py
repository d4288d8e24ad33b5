"""Assembles and runs the gRPC server.

:func:`build_server` is the one place the server is put together: interceptors (logging, metrics, auth,
errors), the Lethe servicer, standard health checking and server reflection, and the bound port.
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
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from service import domain
from service.api import interceptors
from service.api.pb import SERVICE_NAME, service_grpc
from service.api.servicer import UnlearningServicer
from service.api.session import DEFAULT_POLL_S
from service.settings import RESERVED_GRPC_WORKERS, Settings

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

    def start(self) -> None:
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("Lethe gRPC API listening on %s", self.address)

    def stop(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        """NOT_SERVING first, then refuse new calls and give in-flight ones ``grace_s`` to finish."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()


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
    chain: list[grpc.ServerInterceptor] = [interceptors.LoggingInterceptor(),
                                           interceptors.MetricsInterceptor(metrics_registry)]
    if settings.auth_token is not None and settings.auth_token.get_secret_value():
        chain.append(interceptors.BearerAuthInterceptor(settings.auth_token.get_secret_value()))
    chain.append(interceptors.ErrorInterceptor())
    chain.append(interceptors.StreamLimitInterceptor(settings.grpc_max_workers - RESERVED_GRPC_WORKERS,
                                                     metrics_registry))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.grpc_max_workers,
                                                    thread_name_prefix="lethe-grpc"),
                         interceptors=chain, options=_SERVER_OPTIONS)
    service_grpc.add_UnlearningServiceServicer_to_server(UnlearningServicer(engine, poll_s), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)  # SERVING once started
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    host = f"[{settings.grpc_host}]" if ":" in settings.grpc_host else settings.grpc_host
    port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
    if port == 0:
        raise RuntimeError(f"could not bind the gRPC server to {host}:{settings.grpc_port}")
    return ApiServer(server, port, f"{host}:{port}", health_servicer)


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
