"""Steady-state cost of SSD-family erasures through a real server (issue 9, "Honest costs"; ``make bench-steady``).

``nice python -m lethe_bench.steady --jobs 20 --seed 0 --gap-s 3``

A fresh embedded state directory with the digits demo model (the default classifier chain,
:data:`unlearn.chain.DEFAULT_CHAINS`) behind a gRPC server in this process; the client is another process
(spawned), as a data-governance system is: in one process its stream of the job's events competed with the
worker for the interpreter at exactly the moment the method starts. ``--jobs`` subject erasures arrive one at a
time through the ``SubmitErasure`` RPC: each is sent after the previous one's certificate arrived plus
``--gap-s`` seconds (the time a data-governance system takes between two requests, which is when the worker
precomputes the training set's importance I_D for the version the last job registered, :mod:`service.prefetch`).

Per job: the apply stage's seconds (every attempt of the chain, without the gate), and the unit it is
compared with, one forward+backward pass over that job's forget set on the job's result version, timed in
this process after warm-up (median of :data:`TIMED_PASSES`; a pass over a few records takes 1.2 to 3 ms and
moves by a factor of two from one second to the next on this machine, so the row also records the fastest
pass and the ratio against it). ``cost_vs_fwd_bwd`` = apply seconds / unit, and whether the job found I_D
cached. The last stdout line is one JSON object:
``{"jobs": 20, "apply_cost_vs_fwd_bwd_median": x, "apply_cost_vs_fwd_bwd_max": y, ...}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lethe_demo.data import build_digits_demo
from service.api.pb import service_pb2, types_pb2
from service.engine import Engine
from service.settings import Settings
from unlearn.data import classification_examples
from unlearn.digits import load_digits_records
from unlearn.tasks import ClassificationTask

WARM_UP_PASSES = 3
TIMED_PASSES = 21


def _subjects(count: int, seed: int) -> list[str]:
    records = load_digits_records()
    train_subjects = np.unique(records.subject_ids[records.indices("train")])
    return [str(s) for s in np.random.default_rng(seed).choice(train_subjects, count, replace=False)]


def fwd_bwd_timings(model: torch.nn.Module, examples, batch_size: int = 64,
                    repeats: int = TIMED_PASSES) -> list[float]:
    """Seconds of ``repeats`` forward+backward passes over ``examples`` (after ``WARM_UP_PASSES`` untimed)."""
    task = ClassificationTask(10)
    timings = []
    for index in range(WARM_UP_PASSES + repeats):
        started = time.perf_counter()
        for batch in examples.batches(batch_size):
            model.zero_grad(set_to_none=True)
            task.batch_loss(model, batch).backward()
        if index >= WARM_UP_PASSES:
            timings.append(time.perf_counter() - started)
    return timings


def _client(port: int, model_name: str, subjects: list[str], connection) -> None:
    """The data-governance side, in its own process: each erasure after the parent's go, watched to its end."""
    from service.api.client import Client

    client = Client(f"127.0.0.1:{port}", None)
    try:
        client.wait_ready(30)
        for index, subject in enumerate(subjects):
            connection.recv()  # the parent's go: the previous job was measured and the gap has passed
            accepted = client.stub.SubmitErasure(service_pb2.SubmitErasureRequest(erasure=types_pb2.Erasure(
                request_id=f"steady-{index}", subject_ids=[subject], model_names=[model_name]))).accepted
            (job_id,) = accepted.job_ids
            for _ in client.stub.WatchJob(service_pb2.WatchJobRequest(job_id=job_id), timeout=600):
                pass
            connection.send(job_id)
    finally:
        client.close()
        connection.close()


def run(jobs: int, seed: int, gap_s: float) -> dict:
    from service.api.server import build_server

    subjects = _subjects(jobs, seed)
    with tempfile.TemporaryDirectory(prefix="lethe-steady-") as state:
        settings = Settings(state_dir=Path(state), coalescing_window_s=0, metrics_port=0, grpc_port=0, device="cpu")
        engine = Engine(settings)
        model_name = build_digits_demo(settings, engine)
        engine.start()
        server = build_server(settings, engine)
        server.start()
        context = multiprocessing.get_context("spawn")  # gRPC does not survive fork()
        ours, theirs = context.Pipe()
        client = context.Process(target=_client, args=(server.port, model_name, subjects, theirs), daemon=True)
        client.start()
        rows = []
        try:
            time.sleep(gap_s)  # the registered version's I_D is precomputed meanwhile, as in steady state
            for subject in subjects:
                ours.send("go")
                if not ours.poll(600):
                    raise TimeoutError("the client reported no finished job within 600 s")
                job = engine.get_job(ours.recv())
                _wait_for_prefetch(engine, model_name, job.result_version)  # measured alone, not beside it
                rows.append(_measure(engine, model_name, job, subject))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                time.sleep(gap_s)
        finally:
            client.join(30)
            if client.is_alive():
                client.terminate()
            server.stop(1)
            engine.stop(30)
            engine.store.dispose()
    costs = [row["cost_vs_fwd_bwd"] for row in rows if row["cost_vs_fwd_bwd"] is not None]
    against_fastest = [row["cost_vs_fastest_fwd_bwd"] for row in rows if row["cost_vs_fastest_fwd_bwd"] is not None]
    return {"jobs": len(rows), "apply_cost_vs_fwd_bwd_median": statistics.median(costs) if costs else None,
            "apply_cost_vs_fwd_bwd_max": max(costs) if costs else None,
            "apply_cost_vs_fastest_fwd_bwd_median": statistics.median(against_fastest) if against_fastest else None,
            "untouched": sum(bool(row["untouched"]) for row in rows),
            "importance_cached": sum(bool(row["importance_cached"]) for row in rows),
            "states": {s: sum(row["state"] == s for row in rows) for s in sorted({row["state"] for row in rows})},
            "methods": {m: sum(row["method"] == m for row in rows) for m in sorted({str(row["method"]) for row in rows})},
            "seed": seed, "gap_s": gap_s, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(), "rows": rows}


def _wait_for_prefetch(engine: Engine, model_name: str, version: str | None, timeout_s: float = 120) -> None:
    """Until the worker has precomputed ``version``'s derived state: the unit is then timed without the
    background precomputation competing for the same cores."""
    deadline = time.monotonic() + timeout_s
    while version is not None and (model_name, version) not in engine.prefetcher.completed:
        if time.monotonic() > deadline:
            print(f"version {version} not precomputed after {timeout_s} s", file=sys.stderr)
            return
        time.sleep(0.05)


def _measure(engine: Engine, model_name: str, job, subject: str) -> dict:
    evidence = job.evidence or {}
    attempts = evidence.get("attempts", [])
    apply_s = sum(float(a["seconds"]) for a in attempts)
    records = load_digits_records()  # the subject's training records, as the job's forget set held them
    index = np.flatnonzero((records.subject_ids == subject) & (records.splits == "train"))
    forget = classification_examples(torch.from_numpy(records.features[index]), torch.from_numpy(records.labels[index]))
    unit = fastest = None
    if len(index):
        # The job's result version: the base version's weights were purged as superseded (same architecture).
        timings = fwd_bwd_timings(engine.registry.load_model(model_name, job.result_version), forget)
        unit, fastest = statistics.median(timings), min(timings)
    importance = evidence.get("train_importance", {})
    details = evidence.get("method", {}).get("details", {})
    return {"job_id": job.job_id, "state": job.state.value, "forget_records": int(len(index)),
            "method": evidence.get("method", {}).get("name"), "attempts": [a["method"] for a in attempts],
            "rejected_by": {a["method"]: a.get("failures") or a.get("error") for a in attempts if not a.get("gate_passed")},
            "tune_scores": details.get("tune_scores"), "untouched": details.get("alpha", 0) is None,
            "apply_seconds": round(apply_s, 4), "fwd_bwd_seconds": unit, "fastest_fwd_bwd_seconds": fastest,
            "cost_vs_fwd_bwd": round(apply_s / unit, 2) if unit else None,
            "cost_vs_fastest_fwd_bwd": round(apply_s / fastest, 2) if fastest else None,
            "importance_cached": importance.get("cached"), "importance_seconds": importance.get("seconds")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lethe_bench.steady", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gap-s", type=float, default=3.0, help="seconds between a certificate and the next request")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.jobs, args.seed, args.gap_s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
