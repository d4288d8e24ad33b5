"""Durable-acknowledgement throughput and latency of the gRPC API (issue 3, "Measured").

    python -m lethe_bench.acks [--requests 1000] [--streams 4] [--window 1] [--json out.json]

Starts the real stack in this process (embedded MLflow and SQLite job store in a temporary state
directory, the digits model registered, the engine and the gRPC server on loopback), then sends
``--requests`` erasure requests for real subjects over ``--streams`` concurrent ``Session`` streams, each
on its own channel, each keeping at most ``--window`` requests unacknowledged (1 = closed loop). An ack
is the server's ``SubmissionAccepted``, sent only after the request, its job link, its ACCEPTED event and
its audit entry are committed with ``synchronous=FULL``; latency is measured on the client from handing
the request to gRPC to receiving its ack.

The coalescing window is set to an hour so no unlearning job runs during the measurement (the requests
coalesce into one queued job): the numbers are the API and durable-commit path alone, not a CPU shared
with a running job. A short warm-up (not measured) loads the dataset caches first.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def run(requests: int, streams: int, window: int, warmup: int = 20, state_dir: Path | None = None) -> dict:
    from service.api.client import Client
    from service.api.pb import service_pb2, types_pb2
    from service.api.server import build_server
    from lethe_demo.data import build_digits_demo
    from service.engine import Engine
    from service.settings import Settings

    root = state_dir or Path(tempfile.mkdtemp(prefix="lethe-bench-acks-"))
    settings = Settings(state_dir=root, grpc_host="127.0.0.1", grpc_port=0, metrics_port=0,
                        coalescing_window_s=3600.0)
    engine = Engine(settings)
    build_digits_demo(settings, engine)
    engine.start()
    api = build_server(settings, engine)
    api.start()
    try:
        target = f"127.0.0.1:{api.port}"
        _drive(target, [_erasure(types_pb2, f"warmup-{i}", i) for i in range(warmup)], window, service_pb2)
        per_stream = [[_erasure(types_pb2, f"bench-{s}-{i}", s * requests + i)
                       for i in range(s, requests, streams)] for s in range(streams)]
        results: list[list[float]] = [[] for _ in range(streams)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(streams + 1)

        def stream_worker(index: int) -> None:
            try:
                barrier.wait()
                results[index] = _drive(target, per_stream[index], window, service_pb2)
            except BaseException as error:  # reported below, never swallowed
                errors.append(error)

        threads = [threading.Thread(target=stream_worker, args=(i,)) for i in range(streams)]
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed_s = time.perf_counter() - started
        if errors:
            raise errors[0]
        latencies_ms = sorted(latency * 1000 for stream in results for latency in stream)
        with Client(target) as client:
            pending = client.stub.ListPendingRequests(service_pb2.ListPendingRequestsRequest())
        return {
            "requests": len(latencies_ms), "streams": streams, "window_per_stream": window,
            "elapsed_s": round(elapsed_s, 3), "acks_per_s": round(len(latencies_ms) / elapsed_s, 1),
            "latency_ms": {**{f"p{p}": round(_percentile(latencies_ms, p), 2) for p in (50, 90, 99)},
                           "max": round(latencies_ms[-1], 2), "mean": round(statistics.fmean(latencies_ms), 2)},
            "durably_pending_after": len(pending.pending_requests),
            "machine": {"cpus": _cpus(), "python": platform.python_version(), "platform": platform.platform()},
            "store": "SQLite WAL, synchronous=FULL",
        }
    finally:
        api.stop(1.0)
        engine.stop(5.0)
        engine.store.dispose()
        if state_dir is None:
            shutil.rmtree(root, ignore_errors=True)


def _erasure(types_pb2, request_id: str, index: int):
    # ~300 subjects in the digits data; every request names a real one, so the submit path does its
    # full work (keyed hashing, matching against the dataset, coalescing into the open job).
    return types_pb2.Erasure(request_id=request_id, subject_ids=[f"subject-{index % 299:04d}"])


def _drive(target: str, erasures: list, window: int, service_pb2) -> list[float]:
    """Send ``erasures`` on one Session, at most ``window`` unacknowledged; returns ack latencies (s)."""
    from service.api.client import Client

    slots = threading.Semaphore(window)
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    done = threading.Event()

    def requests():
        for erasure in erasures:
            slots.acquire()
            sent_at[erasure.request_id] = time.perf_counter()
            yield service_pb2.SessionRequest(erasure=erasure)
        done.wait()  # keep the stream open until every ack is in, then half-close

    with Client(target) as client:
        client.wait_ready(10)
        call = client.stub.Session(requests(), timeout=600)
        try:
            for response in call:
                kind = response.WhichOneof("message")
                if kind == "rejected":
                    raise RuntimeError(f"request refused: {response.rejected}")
                if kind == "accepted":
                    latencies.append(time.perf_counter() - sent_at[response.accepted.request_id])
                    slots.release()
                    if len(latencies) == len(erasures):
                        break
        finally:
            done.set()
            call.cancel()  # the requests stay queued behind the hour-long window: do not wait for them
    return latencies


def _percentile(sorted_values: list[float], percent: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, round(percent / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lethe_bench.acks", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--window", type=int, default=1, help="unacknowledged requests per stream (1 = closed loop)")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    result = run(args.requests, args.streams, args.window)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    latency = result["latency_ms"]
    print(f"{result['requests']} durable acks over {result['streams']} streams (window {result['window_per_stream']}) "
          f"in {result['elapsed_s']} s: {result['acks_per_s']} acks/s, p50 {latency['p50']} ms, "
          f"p99 {latency['p99']} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
