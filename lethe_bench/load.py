"""Load: many erasure requests over concurrent Session streams against one server, nothing lost (issue 15).

    python -m lethe_bench.load [--requests 10000] [--streams 16] [--window 1] [--json out.json]

One ``lethe serve`` process on loopback (embedded SQLite job store, WAL, ``synchronous=FULL``; embedded
MLflow on SQLite; executor ``external`` and an hour-long coalescing window, so no unlearning job runs: the
load is the API, intake and durable-commit path; the per-identity rate limit off, since all streams are one
client identity) with the digits demo model registered. ``--streams``
concurrent ``Session`` streams, each on its own channel and keeping at most ``--window`` requests
unacknowledged, send ``--requests`` erasure requests between them (request ids ``load-<stream>-<n>``, each
naming one of ~300 real subjects, so intake does its whole work: keyed hashing, resolution on the record
index, coalescing into the open job).

Measured: ack latency (client side, from handing the request to gRPC to its ``SubmissionAccepted``; p50,
p90, p99, max), throughput, and the server's resident set size (``VmRSS`` of the server process) before the
first request, after the warm-up and after the run.

Checked, after the server is stopped, by reading the job store directly: NOTHING LOST, NOTHING DOUBLED:

- every request sent got exactly one ack, and no ack came for a request that was not sent;
- every request is stored exactly once (one ``requests`` row), linked to exactly one job, has exactly one
  ACCEPTED event and exactly one ``request_received`` audit entry;
- the audit chain verifies (:func:`service.audit.verify_audit`).

The run fails (exit 1, ``"nothing_lost": false``) when any of these does not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from lethe_bench.acks import (
    KEY_HEX,
    ROOT,
    SUBJECT_KEY_HEX,
    _cpus,
    _free_port,
    _percentile,
    _wait_ready,
    drive_session,
)

PREFIX = "load-"


def rss_kib(pid: int) -> int:
    """Resident set size of a process, KiB (``VmRSS`` of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def run(requests: int, streams: int, window: int = 1, warmup: int = 64, state_dir: Path | None = None) -> dict:
    from lethe_demo.data import build_digits_demo
    from service.api.pb import service_pb2, types_pb2
    from service.engine import Engine
    from service.settings import Settings

    root = state_dir or Path(tempfile.mkdtemp(prefix="lethe-bench-load-"))
    server: subprocess.Popen | None = None
    store_url = f"sqlite:///{root / 'lethe.db'}"
    try:
        settings = Settings(state_dir=root, job_store_url=store_url, audit_key=KEY_HEX,
                            subject_hash_key=SUBJECT_KEY_HEX, metrics_port=0, device="cpu")
        registrar = Engine(settings)
        build_digits_demo(settings, registrar)
        registrar.store.dispose()
        port = _free_port()
        env = {**os.environ, **settings.as_environment(), "LETHE_GRPC_HOST": "127.0.0.1",
               "LETHE_GRPC_PORT": str(port), "LETHE_EXECUTOR": "external", "LETHE_COALESCING_WINDOW_S": "3600",
               "LETHE_METRICS_PORT": "0", "LETHE_RATE_LIMIT_PER_S": "0",
               "LETHE_WORKER_ID": "bench-load", "OMP_NUM_THREADS": "1"}
        log = open(root / "api-0.log", "ab")
        server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--grace-s", "1"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        target = f"127.0.0.1:{port}"
        _wait_ready(target, [server], root)
        rss_start = rss_kib(server.pid)
        warm = [_erasure(types_pb2, f"warmup-{i}", i) for i in range(warmup)]
        drive_session(target, warm, window, service_pb2)
        rss_warm = rss_kib(server.pid)

        per_stream = [[_erasure(types_pb2, f"{PREFIX}{s}-{i}", s * requests + i) for i in range(s, requests, streams)]
                      for s in range(streams)]
        results: list[tuple[list[float], list[str]]] = [([], []) for _ in range(streams)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(streams + 1)
        rss_peak = [rss_warm]
        finished = threading.Event()

        def stream_worker(index: int) -> None:
            try:
                barrier.wait()
                results[index] = drive_session(target, per_stream[index], window, service_pb2)
            except BaseException as error:  # reported below, never swallowed
                errors.append(error)

        def sample_rss() -> None:
            while not finished.wait(1.0):
                try:
                    rss_peak[0] = max(rss_peak[0], rss_kib(server.pid))
                except (OSError, RuntimeError):
                    return

        threads = [threading.Thread(target=stream_worker, args=(i,)) for i in range(streams)]
        for thread in threads:
            thread.start()
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed_s = time.perf_counter() - started
        finished.set()
        rss_end = rss_kib(server.pid)
        if errors:
            raise errors[0]
        latencies_ms = sorted(latency * 1000 for stream, _ in results for latency in stream)
        acked = Counter(request_id for _, ids in results for request_id in ids)
        _stop(server)
        checks = check_store(store_url, root, {e.request_id for stream in per_stream for e in stream}, acked)
        return {
            "store": "SQLite WAL, synchronous=FULL (embedded)", "server_processes": 1,
            "requests": requests, "streams": streams, "window_per_stream": window,
            "elapsed_s": round(elapsed_s, 3), "acks_per_s": round(len(latencies_ms) / elapsed_s, 1),
            "latency_ms": {**{f"p{p}": round(_percentile(latencies_ms, p), 2) for p in (50, 90, 99)},
                           "max": round(latencies_ms[-1], 2), "mean": round(statistics.fmean(latencies_ms), 2)},
            "server_rss_mib": {"start": round(rss_start / 1024, 1), "after_warmup": round(rss_warm / 1024, 1),
                               "peak_sampled": round(max(rss_peak[0], rss_end) / 1024, 1),
                               "end": round(rss_end / 1024, 1)},
            **checks,
            "machine": {"cpus": _cpus(), "python": platform.python_version(), "platform": platform.platform(),
                        "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        }
    finally:
        if server is not None:
            _stop(server)
        if state_dir is None:
            shutil.rmtree(root, ignore_errors=True)


def check_store(store_url: str, root: Path, sent: set[str], acked: Counter) -> dict:
    """Nothing lost, nothing doubled: acks against what was sent, then the job store itself."""
    import sqlalchemy as sa

    from service import store as db
    from service.audit import verify_audit

    problems: list[str] = []
    doubled_acks = sorted(r for r, n in acked.items() if n != 1)
    missing_acks = sorted(sent - set(acked))
    unknown_acks = sorted(set(acked) - sent)
    for name, ids in (("acked more than once", doubled_acks), ("never acked", missing_acks),
                      ("acked but never sent", unknown_acks)):
        if ids:
            problems.append(f"{len(ids)} request(s) {name}: {ids[:5]}")
    like = f"{PREFIX}%"
    store = db.Store(store_url, migrate=False)
    try:
        with store.read() as conn:
            stored = Counter(r for (r,) in conn.execute(sa.select(db.requests.c.request_id)
                                                         .where(db.requests.c.request_id.like(like))))
            links = Counter(r for (r,) in conn.execute(sa.select(db.job_requests.c.request_id)
                                                        .where(db.job_requests.c.request_id.like(like))))
            accepted = Counter(r for (r,) in conn.execute(
                sa.select(db.event_requests.c.request_id)
                .join(db.events, db.events.c.seq == db.event_requests.c.seq)
                .where(db.event_requests.c.request_id.like(like), db.events.c.kind == "ACCEPTED")))
            audited: Counter = Counter()
            for (body_json,) in conn.execute(sa.select(db.audit_log.c.body_json)):
                body = json.loads(body_json)
                if body.get("kind") == "request_received" and str(body.get("request_id", "")).startswith(PREFIX):
                    audited[body["request_id"]] += 1
            jobs = conn.execute(sa.select(sa.func.count(sa.distinct(db.job_requests.c.job_id)))
                                .where(db.job_requests.c.request_id.like(like))).scalar_one()
    finally:
        store.dispose()
    for name, counts in (("stored", stored), ("linked to a job", links), ("with an ACCEPTED event", accepted),
                         ("with a request_received audit entry", audited)):
        wrong = sorted(r for r in sent if counts.get(r, 0) != 1) + sorted(set(counts) - sent)
        if wrong:
            problems.append(f"{len(wrong)} request(s) not exactly once {name}: {wrong[:5]}")
    report = verify_audit(store_url, bytes.fromhex(KEY_HEX))
    if not report.valid:
        problems.append(f"audit chain: {report.errors[:3]}")
    return {"acked_exactly_once": len(sent) - len(doubled_acks) - len(missing_acks),
            "stored_exactly_once": sum(1 for r in sent if stored.get(r) == 1),
            "jobs_coalesced_into": jobs, "audit_chain_valid": report.valid,
            "nothing_lost": not problems, "problems": problems}


def _erasure(types_pb2, request_id: str, index: int):
    return types_pb2.Erasure(request_id=request_id, subject_ids=[f"subject-{index % 299:04d}"])


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lethe_bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--window", type=int, default=1, help="unacknowledged requests per stream (1 = closed loop)")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--state-dir", type=Path, help="keep the deployment here (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    result = run(args.requests, args.streams, args.window, state_dir=args.state_dir)
    latency, rss = result["latency_ms"], result["server_rss_mib"]
    print(f"{result['requests']} erasures over {result['streams']} streams in {result['elapsed_s']} s: "
          f"{result['acks_per_s']} acks/s, p50 {latency['p50']} ms, p99 {latency['p99']} ms; server RSS "
          f"{rss['after_warmup']} -> {rss['end']} MiB; nothing lost: {result['nothing_lost']}", file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if result["nothing_lost"] else 1


if __name__ == "__main__":
    sys.exit(main())
