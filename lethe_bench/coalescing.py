"""Coalescing benchmark: N erasure requests for one model inside one window versus one request, and versus
the same N requests without coalescing (every request its own job).

``nice python -m lethe_bench.coalescing --requests 50 --window-s 2 --seed 0 [--uncoalesced 50] [--json]``

Each scenario runs on a fresh embedded state directory (its own MLflow and job store) with the digits demo
model, and measures wall seconds from the first submission until every request holds its certificate.
Subjects are drawn with the seed. The uncoalesced run is the expensive one (one full pipeline per
request); ``--uncoalesced K`` runs K requests and the report says when it extrapolates to N.

A job the verification gate rejects stops the clock at its TERMINAL event; the scenario then lists the
failing checks, the accuracies and the method's own account under ``not_succeeded``. Such seconds are not
comparable with a succeeded job's (a rejection skips register, purge and audit), so read the states first.
Each scenario is also printed on stderr as it ends, so a run cut short still leaves its numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lethe_demo.data import build_digits_demo
from service.domain import ErasureRequest
from service.engine import Engine
from service.settings import Settings
from unlearn.digits import load_digits_records


def _subjects(count: int, seed: int) -> list[str]:
    records = load_digits_records()
    train_subjects = np.unique(records.subject_ids[records.indices("train")])
    return [str(s) for s in np.random.default_rng(seed).choice(train_subjects, count, replace=False)]


def run_scenario(subjects: list[str], window_s: float) -> dict:
    """Seconds from the first submission until every request has a certificate, and the job count."""
    with tempfile.TemporaryDirectory(prefix="lethe-bench-") as state:
        settings = Settings(state_dir=Path(state), coalescing_window_s=window_s, metrics_port=0, device="cpu")
        engine = Engine(settings)
        build_digits_demo(settings, engine)
        engine.start()
        try:
            started = time.perf_counter()
            outcomes = [engine.submit_erasure(ErasureRequest(request_id=f"bench-{i}", subject_ids=(subject,)))
                        for i, subject in enumerate(subjects)]
            submitted = time.perf_counter() - started
            # Done when every request has its certificate or its job ended without one (a rejection is
            # timed too: the pipeline ran up to the gate, and the outcome is reported next to the seconds).
            pending = {o.request_id for o in outcomes}
            ended: dict[str, str] = {}
            seq = 0
            while pending:
                for event in engine.events(after_seq=seq, wait_s=5.0):
                    seq = event.seq
                    if event.certificate is not None:
                        pending.discard(event.request_ids[0])
                    elif event.kind.value == "TERMINAL":
                        ended[event.job_id] = event.state.value
                        pending -= set(event.request_ids)
            seconds = time.perf_counter() - started
            jobs = {job_id for o in outcomes for job_id in o.job_ids}
            views = [engine.get_job(job_id) for job_id in sorted(jobs)]
        finally:
            engine.stop(30)
            engine.store.dispose()
    states = [view.state.value for view in views]
    result = {"requests": len(subjects), "window_s": window_s, "jobs": len(jobs), "seconds": round(seconds, 2),
              "submit_seconds": round(submitted, 3), "job_states": {s: states.count(s) for s in sorted(set(states))}}
    not_succeeded = [view for view in views if view.state.value != "SUCCEEDED"]
    if not_succeeded:  # a timing of a refused job is only meaningful next to the reason it was refused
        result["not_succeeded"] = [_why(view) for view in not_succeeded[:5]]
    return result


def _why(view) -> dict:
    """The gate's failing checks (value against limit) and the method's own account, or the error message,
    of a job that did not succeed: a timing of a refused job only means something next to its reason."""
    evidence = view.evidence or {}
    verification, method = evidence.get("verification", {}), evidence.get("method", {})
    return {"job_id": view.job_id, "state": view.state.value, "records": view.records, "message": view.message,
            "failed_checks": [c for c in verification.get("checks", []) if not c.get("passed")],
            "accuracy": {name: verification.get(name) for name in (
                "utility_acc_before", "utility_acc_after", "holdout_acc_after", "forget_acc_before",
                "forget_acc_after")},
            "sizes": verification.get("sizes"), "policy": verification.get("policy"),
            "method": {"name": method.get("name"), "target_reached": method.get("target_reached"),
                       "message": method.get("message"), "details": method.get("details")}}


def _report(name: str, result: dict) -> None:
    """Each scenario on stderr as it ends, so a run cut short by a time limit still leaves its numbers."""
    print(f"[bench_coalescing] {name}: {json.dumps(result)}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lethe_bench.coalescing", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50, help="requests in the coalesced burst")
    parser.add_argument("--window-s", type=float, default=2.0, help="coalescing window for the first two runs")
    parser.add_argument("--uncoalesced", type=int, default=50, help="requests run without coalescing (0: skip)")
    parser.add_argument("--seed", type=int, default=0, help="seed drawing the subjects")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    subjects = _subjects(args.requests + 1, args.seed)
    run_scenario(subjects[-1:], args.window_s)  # warm-up (imports, first ONNX export), not reported
    subjects = subjects[:-1]
    single = run_scenario(subjects[:1], args.window_s)
    _report("single", single)
    burst = run_scenario(subjects, args.window_s)
    _report("coalesced", burst)
    result = {"seed": args.seed, "machine": f"{platform.machine()} {os.cpu_count()} cpu(s)",
              "single": single, "coalesced": burst, "coalesced_over_single": round(burst["seconds"] / single["seconds"], 2)}
    if args.uncoalesced:
        alone = run_scenario(subjects[:args.uncoalesced], 0.0)
        _report("uncoalesced", alone)
        per_request = alone["seconds"] / alone["requests"]
        result["uncoalesced"] = alone
        # Measured outright when all N ran; scaled linearly (per-request seconds x N) when fewer did.
        result["uncoalesced_over_single"] = round(per_request * args.requests / single["seconds"], 2)
        result["uncoalesced_extrapolated"] = alone["requests"] != args.requests
    text = json.dumps(result)
    if not args.json:
        print(json.dumps(result, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
