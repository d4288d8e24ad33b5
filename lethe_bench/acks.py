"""Durable-acknowledgement throughput and latency of the gRPC API (issues 3 and 11, "Measured").

    python -m lethe_bench.acks [--store sqlite|postgres] [--replicas 1|2] [--requests 2000] [--streams 8]
                               [--window 1] [--json out.json]
    python -m lethe_bench.acks --matrix --json docs/bench_acks.json    # SQLite and PostgreSQL x 1 and 2 replicas
    python -m lethe_bench.acks --matrix --in-process                   # the same path without gRPC: its ceiling

Builds a real deployment on this machine: the digits model registered (embedded MLflow on SQLite), the job
store on SQLite (WAL, ``synchronous=FULL``) or on PostgreSQL (a pgserver instance the benchmark starts, with
its default ``fsync=on``, ``synchronous_commit=on``), and ``--replicas`` separate ``lethe serve`` processes on
loopback (executor ``external``: no job runs in them; the per-identity rate limit off, since every stream
of this one client is the same identity and the default limit, 200 calls/s, is below the rate measured). It
then sends ``--requests`` erasure requests over
``--streams`` concurrent ``Session`` streams, spread round-robin over the replicas, each stream on its own
channel and keeping at most ``--window`` requests unacknowledged (1 = closed loop). An ack is the server's
``SubmissionAccepted``, sent only after the request, its job link, its ACCEPTED event and its audit entry
are committed; latency is measured on the client from handing the request to gRPC to receiving its ack.

Each request names one of ~300 real subjects (``subject-NNNN``, seeded by its index), so the submit path
does its whole work: keyed hashing, resolution on the record index, coalescing into the open job. The
coalescing window is an hour, so no unlearning job runs: the numbers are the API and durable-commit path
alone. A warm-up (not measured) precedes the run.

``--in-process`` measures the path without gRPC or a client process: the same deployment's engine, in this
process (executor ``external``, the same window), called by ``--streams`` threads each submitting its requests
one after the other (``engine.submit_erasure``: validation, resolution, group commit), latency from call to
return. What the API adds is the difference.

Where the CPU goes: over the measured run, the CPU time (user + system, from ``/proc``) of the API replicas,
of this client (its 8 gRPC streams run on the same cores) and of PostgreSQL's processes, per ack
(``cpu_ms_per_ack``), and their sum against the cores' capacity over the run (``cpu_busy_share``: 1.0 means
every core was busy with this benchmark alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY_HEX = "5a" * 32
SUBJECT_KEY_HEX = "c3" * 32


def run(requests: int, streams: int, window: int, store: str = "sqlite", replicas: int = 1, warmup: int = 40,
        state_dir: Path | None = None, in_process: bool = False) -> dict:
    from lethe_demo.data import build_digits_demo
    from service.engine import Engine
    from service.settings import Settings

    root = state_dir or Path(tempfile.mkdtemp(prefix="lethe-bench-acks-"))
    postgres = None
    servers: list[subprocess.Popen] = []
    try:
        if store == "postgres":
            import pgserver

            postgres = pgserver.get_server(Path(tempfile.mkdtemp(prefix="lethe-pg-", dir="/tmp")), cleanup_mode="stop")
            postgres.psql("CREATE DATABASE lethe_bench;")
            store_url = f"postgresql+psycopg://postgres:@/lethe_bench?host={postgres.pgdata}"
        else:
            store_url = f"sqlite:///{root / 'registrar' / 'lethe.db'}"
        settings = Settings(state_dir=root / "registrar", job_store_url=store_url, audit_key=KEY_HEX,
                            subject_hash_key=SUBJECT_KEY_HEX, metrics_port=0, device="cpu")
        registrar = Engine(settings)
        build_digits_demo(settings, registrar)
        registrar.store.dispose()
        if in_process:
            engine = Engine(settings.model_copy(update={"executor": "external", "coalescing_window_s": 3600.0}))
            drive = _engine_drivers(engine, requests, streams, warmup)
        else:
            drive = _session_drivers(_start_replicas(settings, replicas, root, servers), requests, streams, window,
                                     warmup)
        results: list[list[float]] = [[] for _ in range(streams)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(streams + 1)

        def stream_worker(index: int) -> None:
            try:
                barrier.wait()
                results[index] = drive(index)
            except BaseException as error:  # reported below, never swallowed
                errors.append(error)

        threads = [threading.Thread(target=stream_worker, args=(i,)) for i in range(streams)]
        for thread in threads:
            thread.start()
        cpu_before = _cpu_seconds(servers, postgres)
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed_s = time.perf_counter() - started
        cpu_used = {part: seconds - cpu_before[part] for part, seconds in _cpu_seconds(servers, postgres).items()}
        if in_process:  # this process is the engine (and its callers), not a gRPC client
            cpu_used = {"engine_in_process": cpu_used.pop("client"),
                        **{part: seconds for part, seconds in cpu_used.items() if part != "api_replicas"}}
        if errors:
            raise errors[0]
        latencies_ms = sorted(latency * 1000 for stream in results for latency in stream)
        from service import store as db

        check = db.Store(store_url, migrate=False)
        with check.read() as conn:
            pending = len(db.pending_requests(conn))
        check.dispose()
        return {
            "store": "PostgreSQL 16 (pgserver), fsync on" if store == "postgres" else "SQLite WAL, synchronous=FULL",
            "replicas": "in-process, no gRPC" if in_process else replicas, "requests": len(latencies_ms),
            "streams": streams, "window_per_stream": window,
            "elapsed_s": round(elapsed_s, 3), "acks_per_s": round(len(latencies_ms) / elapsed_s, 1),
            "latency_ms": {**{f"p{p}": round(_percentile(latencies_ms, p), 2) for p in (50, 90, 99)},
                           "max": round(latencies_ms[-1], 2), "mean": round(statistics.fmean(latencies_ms), 2)},
            "durably_pending_after": pending,
            "cpu_ms_per_ack": {part: round(1000 * seconds / len(latencies_ms), 2) for part, seconds in cpu_used.items()},
            "cpu_busy_share": round(sum(cpu_used.values()) / (elapsed_s * _cpus()), 2),
            "machine": {"cpus": _cpus(), "python": platform.python_version(), "platform": platform.platform(),
                        "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        }
    finally:
        for server in servers:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
        for server in servers:
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
        if postgres is not None:
            postgres.cleanup()
        if state_dir is None:
            shutil.rmtree(root, ignore_errors=True)


def _cpu_seconds(servers: list[subprocess.Popen], postgres) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the API replicas, this process, and PostgreSQL."""
    used = {"api_replicas": sum(_process_cpu_s(server.pid) for server in servers), "client": time.process_time()}
    if postgres is not None:
        postmaster = int((Path(postgres.pgdata) / "postmaster.pid").read_text().split()[0])
        # The postmaster's own time, its exited backends' (reaped: in its children's fields), its live ones'.
        used["postgres"] = _process_cpu_s(postmaster, with_reaped_children=True) + sum(
            _process_cpu_s(pid) for pid in _children(postmaster))
    return used


def _process_cpu_s(pid: int, with_reaped_children: bool = False) -> float:
    """From ``/proc/PID/stat``: utime and stime, plus cutime and cstime when asked (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):  # it exited meanwhile
        return 0.0
    ticks = fields[11:15] if with_reaped_children else fields[11:13]  # fields 14-17 of proc(5)
    return sum(int(tick) for tick in ticks) / os.sysconf("SC_CLK_TCK")


def _children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) == parent:
                found.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return found


def _start_replicas(settings, replicas: int, root: Path, servers: list[subprocess.Popen]) -> list[str]:
    """``replicas`` ``lethe serve`` processes on the deployment (appended to ``servers`` as they start, for the
    caller to stop); their addresses once each is serving."""
    targets = []
    for index in range(replicas):
        port = _free_port()
        env = {**os.environ, **settings.as_environment(), "LETHE_GRPC_HOST": "127.0.0.1",
               "LETHE_GRPC_PORT": str(port), "LETHE_EXECUTOR": "external", "LETHE_COALESCING_WINDOW_S": "3600",
               "LETHE_METRICS_PORT": "0", "LETHE_RATE_LIMIT_PER_S": "0",
               "LETHE_WORKER_ID": f"bench-api-{index}", "OMP_NUM_THREADS": "1"}
        log = open(root / f"api-{index}.log", "ab")
        servers.append(subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--grace-s", "1"],
                                        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        targets.append(f"127.0.0.1:{port}")
    for target in targets:
        _wait_ready(target, servers, root)
    return targets


def _session_drivers(targets: list[str], requests: int, streams: int, window: int, warmup: int):
    """After a warm-up of every replica: ``drive(stream)`` sends that stream's share of the requests over a
    Session to its replica (round-robin) and returns their ack latencies."""
    from service.api.pb import service_pb2, types_pb2

    for index, target in enumerate(targets):  # warm-up: every replica's caches and connections
        drive_session(target, [_erasure(types_pb2, f"warmup-{index}-{i}", i) for i in range(warmup)], window,
                      service_pb2)
    per_stream = [[_erasure(types_pb2, f"bench-{s}-{i}", s * requests + i) for i in range(s, requests, streams)]
                  for s in range(streams)]
    return lambda stream: drive_session(targets[stream % len(targets)], per_stream[stream], window, service_pb2)[0]


def _engine_drivers(engine, requests: int, streams: int, warmup: int):
    """After a warm-up: ``drive(stream)`` submits that stream's share of the requests to ``engine`` in this
    process, one after the other, and returns their latencies."""
    from service.domain import ErasureRequest

    drive_engine(engine, [ErasureRequest(f"warmup-{i}", (_subject(i),)) for i in range(warmup)])
    per_stream = [[ErasureRequest(f"bench-{s}-{i}", (_subject(s * requests + i),))
                   for i in range(s, requests, streams)] for s in range(streams)]
    return lambda stream: drive_engine(engine, per_stream[stream])


def drive_engine(engine, requests: list) -> list[float]:
    """Submit ``requests`` (domain ``ErasureRequest``) one after the other; the latency of each, in s."""
    latencies = []
    for request in requests:
        started = time.perf_counter()
        if not engine.submit_erasure(request).created:
            raise RuntimeError(f"{request.request_id} was not stored as new")
        latencies.append(time.perf_counter() - started)
    return latencies


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_ready(target: str, servers: list[subprocess.Popen], root: Path, timeout_s: float = 300) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if any(server.poll() is not None for server in servers):
                logs = "\n".join(path.read_text()[-2000:] for path in root.glob("api-*.log"))
                raise RuntimeError(f"an API replica exited:\n{logs}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.5)
    raise RuntimeError(f"{target} not serving after {timeout_s} s")


def _erasure(types_pb2, request_id: str, index: int):
    # ~300 subjects in the digits data; every request names a real one, so the submit path does its
    # full work (keyed hashing, resolution on the record index, coalescing into the open job).
    return types_pb2.Erasure(request_id=request_id, subject_ids=[_subject(index)])


def _subject(index: int) -> str:
    return f"subject-{index % 299:04d}"


def drive_session(target: str, erasures: list, window: int, service_pb2) -> tuple[list[float], list[str]]:
    """Send ``erasures`` on one Session, at most ``window`` unacknowledged; returns (ack latencies in s, the
    request id of every ack received, duplicates included)."""
    from service.api.client import Client

    slots = threading.Semaphore(window)
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    acked: list[str] = []
    done = threading.Event()

    def requests():
        for erasure in erasures:
            slots.acquire()
            sent_at[erasure.request_id] = time.perf_counter()
            yield service_pb2.SessionRequest(erasure=erasure)
        done.wait()  # keep the stream open until every ack is in, then half-close

    with Client(target) as client:
        client.wait_ready(30)
        call = client.stub.Session(requests(), timeout=3600)
        try:
            for response in call:
                kind = response.WhichOneof("message")
                if kind == "rejected":
                    raise RuntimeError(f"request refused: {response.rejected}")
                if kind == "accepted":
                    request_id = response.accepted.request_id
                    acked.append(request_id)
                    latencies.append(time.perf_counter() - sent_at[request_id])
                    slots.release()
                    if len(set(acked)) == len(erasures):
                        break
        finally:
            done.set()
            call.cancel()  # the requests stay queued behind the hour-long window: do not wait for them
    return latencies, acked


def _percentile(sorted_values: list[float], percent: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, round(percent / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lethe_bench.acks", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--window", type=int, default=1, help="unacknowledged requests per stream (1 = closed loop)")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--replicas", type=int, default=1, choices=[1, 2, 3, 4])
    parser.add_argument("--matrix", action="store_true", help="SQLite and PostgreSQL, 1 and 2 replicas")
    parser.add_argument("--in-process", action="store_true",
                        help="the engine in this process, no gRPC (with --matrix: on SQLite and PostgreSQL)")
    parser.add_argument("--json", help="also write the result(s) to this file")
    args = parser.parse_args(argv)
    replica_counts = (0,) if args.in_process else (1, 2)
    configurations = ([(s, r) for s in ("sqlite", "postgres") for r in replica_counts] if args.matrix
                      else [(args.store, args.replicas)])
    results = []
    for store, replicas in configurations:
        result = run(args.requests, args.streams, args.window, store, replicas, in_process=args.in_process)
        results.append(result)
        latency = result["latency_ms"]
        where = "in process, no gRPC" if args.in_process else f"{replicas} replica(s)"
        print(f"{store}, {where}: {result['requests']} durable acks over {result['streams']} streams "
              f"(window {result['window_per_stream']}) in {result['elapsed_s']} s: {result['acks_per_s']} acks/s, "
              f"p50 {latency['p50']} ms, p99 {latency['p99']} ms; CPU ms per ack {result['cpu_ms_per_ack']}",
              file=sys.stderr)
    text = json.dumps(results if args.matrix else results[0], indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
