"""Update benchmark (issue 13): an update of N new records through the service, seconds per stage, against
a joint retrain of the same model on the same data; and K updates coalesced into one job against one.

``nice python -m lethe_bench.updates --records 100 --coalesced 20 --seed 0 [--json]``

On a fresh embedded state directory with the digits demo model (the CNN of ``make demo``), all in this
process, in this order:

1. warm-up: an update of 10 records (imports, ONNX export, MLflow client and the replay buffer are built);
   its wall time is reported as the first request's cost on a new lineage;
2. the timed update: ``--records`` new records (train digits shifted one pixel right, data the model never
   saw), wall seconds from submission to certificate and the seconds of each pipeline stage (from the
   job's PROGRESS events), the strategy and the gate's numbers;
3. the exact baseline: the digits CNN retrained from scratch with its registered recipe on the current
   training data plus the same new records (``joint``), timed in the same process after the warm-up;
   accuracy of both models on the test split (never trained on) and on the new records;
4. ``--coalesced`` updates of 5 records each submitted inside one coalescing window (one job) against one
   update of 5 records.
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
import torch

from lethe_demo.data import build_digits_demo, digits_frame, shifted_digits
from service import store as db
from service.domain import JobState, NewRecord, UpdateSubmission
from service.engine import Engine
from service.settings import Settings
from unlearn.bench import DIGITS_RECIPE
from unlearn.data import ExampleSet, classification_examples
from unlearn.models import digits_cnn
from unlearn.tasks import ClassificationTask, accuracy
from unlearn.training import train


def _records(count: int, prefix: str, start: int) -> tuple[NewRecord, ...]:
    return tuple(NewRecord(r["record_id"], r["subject_id"], {"features": r["features"], "label": r["label"]})
                 for r in shifted_digits(count, prefix, start=start))


def _wait(engine: Engine, job_ids, timeout_s: float = 3600.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        views = [engine.get_job(j) for j in job_ids]
        if all(v.state.terminal for v in views):
            return views
        time.sleep(0.2)
    raise TimeoutError(job_ids)


def _stage_seconds(engine: Engine, job_id: str) -> dict[str, float]:
    """Seconds between consecutive stage changes of the job's events (the last stage ends at TERMINAL)."""
    with engine.store.read() as conn:
        events = db.events_after(conn, 0, [job_id], [], limit=100_000)
    stages: dict[str, float] = {}
    previous = None
    for event in events:
        if previous is not None and event.stage != previous.stage:
            stages[previous.stage] = stages.get(previous.stage, 0.0) + (event.time - previous.time).total_seconds()
            previous = event
        elif previous is None:
            previous = event
    return {stage: round(seconds, 3) for stage, seconds in stages.items()}


def _update(engine: Engine, request_id: str, model: str, records) -> tuple[float, object]:
    started = time.perf_counter()
    outcome = engine.submit_update(UpdateSubmission(request_id, model, records=records))
    (job,) = _wait(engine, outcome.job_ids)
    return time.perf_counter() - started, job


def _examples(frame) -> ExampleSet:
    return classification_examples(torch.tensor(np.stack(frame["features"].to_numpy()), dtype=torch.float32),
                                   torch.tensor(frame["label"].to_numpy(), dtype=torch.long))


def run(records: int, coalesced: int, seed: int) -> dict:
    torch.manual_seed(seed)
    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                "torch_threads": torch.get_num_threads(), "device": "cpu"},
                    "seed": seed, "records": records}
    with tempfile.TemporaryDirectory(prefix="lethe-bench-updates-") as state:
        settings = Settings(state_dir=Path(state), coalescing_window_s=2.0, metrics_port=0, device="cpu")
        engine = Engine(settings)
        model = build_digits_demo(settings, engine)
        engine.start()
        try:
            warm_seconds, warm = _update(engine, "warm-up", model, _records(10, "warm", 0))
            result["first_update_seconds"] = {"records": 10, "seconds": round(warm_seconds, 3),
                                              "state": warm.state.value}
            seconds, job = _update(engine, "timed", model, _records(records, "timed", 10))
            with engine.store.read() as conn:
                evidence = db.get_job(conn, job.job_id).evidence
                dataset = db.dataset_for_model_version(conn, model, job.result_version)
            result["update"] = {
                "state": job.state.value, "seconds": round(seconds, 3), "stages": _stage_seconds(engine, job.job_id),
                "strategy": evidence.get("update", {}).get("strategy"),
                "gate": {c["name"]: c["value"] for c in evidence["verification"].get("checks", [])
                         if c["name"] in ("learned", "utility")},
                "stability_gap": (evidence.get("update", {}).get("stability") or {}).get("gap")}

            # The exact baseline: the same data, trained from scratch with the registered recipe.
            frame = engine.catalog.frame(dataset.path)
            train_frame = frame[frame["split"] == "train"]
            test_frame = digits_frame().query("split == 'test'")
            new_frame = frame[frame["record_id"].str.startswith("timed-")]
            task = ClassificationTask(10)
            updated = engine.registry.load_model(model, job.result_version)
            train(task, digits_cnn(seed), _examples(train_frame.iloc[:64]), DIGITS_RECIPE.__class__(
                **{**vars(DIGITS_RECIPE), "epochs": 1}))  # warm-up of the training loop
            started = time.perf_counter()
            joint_model = train(task, digits_cnn(seed), _examples(train_frame), DIGITS_RECIPE)
            joint_seconds = time.perf_counter() - started
            result["joint"] = {"seconds": round(joint_seconds, 3), "train_records": len(train_frame)}
            result["speedup_vs_joint"] = round(joint_seconds / seconds, 2)
            result["accuracy"] = {  # test split: never trained on by either model
                "update": {"test": accuracy(task, updated, _examples(test_frame)),
                           "new_records": accuracy(task, updated, _examples(new_frame))},
                "joint": {"test": accuracy(task, joint_model, _examples(test_frame)),
                          "new_records": accuracy(task, joint_model, _examples(new_frame))}}

            one_seconds, one = _update(engine, "single", model, _records(5, "single", 200))
            started = time.perf_counter()
            outcomes = [engine.submit_update(UpdateSubmission(f"co-{i}", model, records=_records(
                5, f"co{i}", 300 + 5 * i))) for i in range(coalesced)]
            jobs = {j for o in outcomes for j in o.job_ids}
            views = _wait(engine, sorted(jobs))
            many_seconds = time.perf_counter() - started
            result["coalescing"] = {
                "one_update": {"seconds": round(one_seconds, 3), "state": one.state.value},
                f"{coalesced}_updates": {"seconds": round(many_seconds, 3), "jobs": len(jobs),
                                         "states": sorted({v.state.value for v in views})},
                "uncoalesced_estimate_seconds": round(coalesced * one_seconds, 3)}
            result["all_succeeded"] = all(v.state is JobState.SUCCEEDED for v in (warm, job, one, *views))
        finally:
            engine.stop(30)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--coalesced", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run(args.records, args.coalesced, args.seed)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0 if result.get("all_succeeded") else 1


if __name__ == "__main__":
    sys.exit(main())
