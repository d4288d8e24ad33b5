"""Several method configurations on an LM family's GPT, seed after seed, one retrain per seed.

``OMP_NUM_THREADS=1 nice python -m unlearn.bench.lm_sweep --seeds 0,1,2,3,4 --configs CONFIGS.json --json``
(``--scenario fictitious-customers`` for the second LM family; default ``fictitious-subjects``)

``CONFIGS.json`` holds a list of ``[method, params]`` pairs. Per seed, in one process: the original GPT
(cached), the retain-only GPT retrained with the original recipe (:func:`unlearn.bench.lm_subjects.
timed_retrain`, after the warm-up, timed), then every configuration, each timed and scored exactly as
:func:`unlearn.bench.lm_subjects.run_lm_subjects` scores a run (same people, same metrics, the same gate),
without paying one retrain per configuration. ``speedup`` divides that seed's retrain time by each run's
unlearning time; the retrain and the runs are measured minutes apart on a shared machine, so a run's
speed-up carries the load's drift (``make bench-lm`` measures the chosen configuration run by run).

``--cached-reference`` (exploration only) takes the retain-only GPT from the cache instead of retraining it
and reports ``speedup_estimate``: the recipe's optimiser steps (epochs x batches) over the run's cost in
training steps, a training step being timed on the spot (8 AdamW steps of the recipe's batch size). It is an
estimate, named as such, never a ``speedup``.

Each line of output is one run (``--json``: one JSON object per line; the last line summarises every
configuration: per-seed targets and how many seeds met all four).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import torch

from unlearn import registry
from unlearn.bench import default_cache_dir, warm_up
from unlearn.bench.lm_subjects import (
    FORGET_QUALITY_TARGET,
    MIA_AUC_MARGIN,
    SPEEDUP_TARGET,
    UTILITY_FRACTION,
    check_no_metric_on_tune,
    people_splits,
    timed_retrain,
)
from unlearn.gate import GatePolicy, judge
from unlearn.lm.fictitious import LM_FAMILIES, load_family
from unlearn.lm.metrics import ParaphraseProbe, evaluate_lm, forget_quality
from unlearn.lm.model import LMCache
from unlearn.registry import UnlearnRequest

PROBE_STEPS = 8


def training_step_seconds(task, model: torch.nn.Module, examples, batch_size: int) -> float:
    """Seconds per AdamW training step of ``batch_size`` on a copy of ``model`` (lr 0: nothing changes)."""
    probe = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=0.0)
    batches = [b for b, _ in zip(examples.batches(batch_size, None, torch.Generator().manual_seed(0)),
                                 range(PROBE_STEPS))]
    started = time.perf_counter()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        task.batch_loss(probe, batch).backward()
        optimizer.step()
    return (time.perf_counter() - started) / len(batches)


def sweep(seeds: list[int], configs: list[tuple[str, dict[str, Any]]], cached_reference: bool = False,
          device: torch.device | None = None, emit=print, scenario: str = "fictitious-subjects") -> dict[str, Any]:
    device = device or torch.device("cpu")
    cache = default_cache_dir()
    family, data, factory = load_family(scenario, cache)
    task = data.task
    models = LMCache(cache)
    policy = GatePolicy()
    warm_up(device)
    runs = []
    for seed in seeds:
        people = people_splits(data, seed)
        forget, retain, tune, audit = (data.examples(g) for g in (people.forget, people.retain, people.tune,
                                                                   people.audit))
        recipe = replace(family.recipe, seed=seed)
        original, _ = models.get_or_train("original", task, factory, data.examples(data.train_subjects), recipe, device)
        if cached_reference:
            retrained, _ = models.get_or_train("retrained", task, factory, retain, recipe, device)
            retrain_seconds = None
        else:
            retrained, retrain_seconds = timed_retrain(task, factory, retain, recipe, device)
        splits = [data.split(g) for g in (people.forget, people.retain, people.audit)]
        before, before_forget, _ = evaluate_lm(task, original, *splits)
        gold, gold_forget, _ = evaluate_lm(task, retrained, *splits)
        recipe_steps = recipe.epochs * retain.num_batches(recipe.batch_size)
        emit({"scenario": scenario, "seed": seed, "reference": True, "original": before.as_dict(),
              "retrained": gold.as_dict(),
              "retrain_seconds": retrain_seconds,
              "forget_quality_original": forget_quality(before_forget.truth_ratio, gold_forget.truth_ratio)})
        for method, params in configs:
            request = UnlearnRequest(task=task, forget=forget, retain=retain, tune=tune, model_factory=factory,
                                     recipe=recipe, seed=seed)
            check_no_metric_on_tune(request, {"forget": forget, "retain": retain, "audit": audit})
            step_seconds = training_step_seconds(task, original, retain, recipe.batch_size)
            started = time.perf_counter()
            result = registry.run(method, original, request, params)
            seconds = time.perf_counter() - started
            after, after_forget, membership = evaluate_lm(task, result.model, *splits)
            verdict = judge(task, original, result.model, forget, retain, audit, policy,
                            knowledge=ParaphraseProbe(task, splits[0], splits[2]))
            quality = forget_quality(after_forget.truth_ratio, gold_forget.truth_ratio)
            run = {
                "scenario": scenario, "seed": seed, "method": method, "params": params, "forget_quality": quality,
                "log_truth_ratio_shift": float(after_forget.truth_ratio.log().median()
                                               - gold_forget.truth_ratio.log().median()),
                "utility_ratio": after.model_utility / before.model_utility, "mia_auc": after.mia_auc,
                "mia_ks_p": after.mia_ks_p, "mia_auc_min_k": after.mia_auc_min_k, "unlearned": after.as_dict(),
                "unlearn_seconds": seconds, "cost_in_training_steps": seconds / step_seconds,
                "target_reached": result.target_reached, "message": result.message,
                "details": {k: v for k, v in result.details.items() if not isinstance(v, dict)},
                "gate_passed": verdict.passed, "gate_failures": list(verdict.failures),
                "gate_utility": [verdict.evidence["utility_acc_before"], verdict.evidence["utility_acc_after"]],
            }
            if retrain_seconds is None:
                run["speedup_estimate"] = recipe_steps * step_seconds / seconds
            else:
                run["speedup"] = retrain_seconds / seconds
            speed = run.get("speedup", run.get("speedup_estimate"))
            run["targets"] = {"forget_quality": quality >= FORGET_QUALITY_TARGET,
                              "model_utility": run["utility_ratio"] >= UTILITY_FRACTION,
                              "mia_auc": abs(after.mia_auc - 0.5) <= MIA_AUC_MARGIN,
                              "speedup": speed >= SPEEDUP_TARGET}
            run["targets_met"] = all(run["targets"].values())
            runs.append(run)
            emit(run)
    summary = []
    for method, params in configs:
        mine = [r for r in runs if r["method"] == method and r["params"] == params]
        summary.append({"method": method, "params": params, "seeds": [r["seed"] for r in mine],
                        "seeds_meeting_all_targets": sum(r["targets_met"] for r in mine),
                        "gate_passed": sum(r["gate_passed"] for r in mine),
                        "min_forget_quality": min(r["forget_quality"] for r in mine),
                        "mean_utility_ratio": statistics.fmean(r["utility_ratio"] for r in mine),
                        "max_abs_auc_gap": max(abs(r["mia_auc"] - 0.5) for r in mine)})
    return {"runs": len(runs), "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unlearn.bench.lm_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=tuple(LM_FAMILIES), default="fictitious-subjects")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--configs", required=True, help="a JSON file, or a JSON list, of [method, params] pairs")
    parser.add_argument("--cached-reference", action="store_true",
                        help="exploration: cached retain-only GPT, speed-up estimated, not measured")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    text = args.configs if args.configs.lstrip().startswith("[") else open(args.configs).read()
    configs = [(method, dict(params)) for method, params in json.loads(text)]
    emit = (lambda row: print(json.dumps(row), flush=True)) if args.json else (lambda row: print(row, flush=True))
    summary = sweep([int(s) for s in args.seeds.split(",")], configs, args.cached_reference, emit=emit,
                    scenario=args.scenario)
    print(json.dumps(summary) if args.json else summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
