"""Scenario ``fictitious-subjects``: erase 10% of the training people from a tiny GPT (issue 5).

``nice python -m unlearn.bench --method npo --scenario fictitious-subjects --seed 0 --json``

Data (:mod:`unlearn.lm.fictitious`): 120 fictitious people, 100 trained on and 20 held out, five questions
each. The run's seed draws the forget people (``numpy.random.default_rng(4000 + seed)``, 10 of the 100) and
seeds the models. The original GPT is trained on every training person, the retain-only reference on the
other 90, both with :data:`unlearn.lm.fictitious.LM_RECIPE` and cached by recipe, architecture, data and
seed under ``<cache>/lm/`` with the seconds their training took (``retrain_seconds`` stays a measurement).

The request holds ``forget`` (the forget people's questions), ``retain`` (the other training people's),
``holdout`` (the held-out people's; methods that stop at a forgetting target use its exact-match level as
the "never seen" level), the GPT factory and recipe.

Result (the classifier scenarios' keys, with the LM's M): ``original`` / ``retrained`` / ``unlearned`` hold
:class:`unlearn.lm.metrics.LMMetrics` (forget/retain/holdout ROUGE-L recall, forget truth ratio, model
utility, MIA AUC with the LOSS and Min-K% attacks); top level ``forget_quality`` (KS p-value of the forget
truth ratios, unlearned vs retain-only), ``forget_quality_original`` (the same for the original model),
``avg_gap`` (mean |unlearned - retain-only| over :data:`GAP_METRICS`), ``unlearn_seconds``,
``retrain_seconds``, ``speedup``, ``cost_vs_fwd_bwd``, ``memorisation`` (the original model on its training
answers: greedy exact match and ROUGE-L recall) and ``targets`` (issue 5's targets, each a boolean).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unlearn import registry
from unlearn.bench import default_cache_dir, fwd_bwd_seconds
from unlearn.errors import InvalidParameterError
from unlearn.lm.fictitious import LM_RECIPE, LM_SPEC, load_fictitious_subjects
from unlearn.lm.metrics import evaluate_lm, forget_quality, rouge_l_recall
from unlearn.lm.model import GPTFactory, LMCache

SCENARIO = "fictitious-subjects"
FORGET_FRACTION = 0.10
GAP_METRICS = ("forget_rouge", "retain_rouge", "holdout_rouge", "model_utility", "mia_auc")
TIMING_BATCH_SIZE = 32
# Issue 5's targets.
FORGET_QUALITY_TARGET = 0.05
UTILITY_FRACTION = 0.9
ROUGE_TOLERANCE = 0.1
MIA_TOLERANCE = 0.05
SPEEDUP_TARGET = 10.0


def run_lm_subjects(method: str, scenario_name: str, seed: int, forget_class: int = 3,
                    params: dict[str, Any] | None = None, device: torch.device | None = None,
                    cache_dir: Path | None = None) -> dict[str, Any]:
    """One erasure request on the fictitious-subjects GPT; ``forget_class`` is ignored (run_benchmark's signature)."""
    if scenario_name != SCENARIO:
        raise InvalidParameterError("scenario", f"this runner only knows {SCENARIO!r}")
    device = device or torch.device("cpu")
    cache_dir = cache_dir or default_cache_dir()
    torch.manual_seed(seed)
    data = load_fictitious_subjects(cache_dir)
    task = data.task
    rng = np.random.default_rng(4000 + seed)
    forget_subjects = sorted(int(s) for s in rng.choice(data.train_subjects, round(FORGET_FRACTION * len(data.train_subjects)),
                                                        replace=False))
    retain_subjects = [s for s in data.train_subjects if s not in set(forget_subjects)]
    train, forget, retain = (data.examples(s) for s in (data.train_subjects, forget_subjects, retain_subjects))
    holdout = data.examples(data.holdout_subjects)

    factory = GPTFactory(len(data.tokenizer), LM_SPEC, data.tokenizer.eos_token_id)
    recipe = replace(LM_RECIPE, seed=seed)
    models = LMCache(cache_dir)
    original, original_meta = models.get_or_train("original", task, factory, train, recipe, device)
    retrained, retrained_meta = models.get_or_train("retrained", task, factory, retain, recipe, device)

    config = registry.parse_config(method, params)
    batch_size = getattr(config, "batch_size", TIMING_BATCH_SIZE)
    request = registry.UnlearnRequest(task=task, forget=forget, retain=retain, tune=holdout,
                                      model_factory=factory, recipe=recipe, seed=seed)
    unit = fwd_bwd_seconds(task, original, forget, batch_size)  # also warms up autograd before the timing
    started = time.perf_counter()
    result = registry.run(method, original, request, params)
    unlearn_seconds = time.perf_counter() - started

    splits = [data.split(s) for s in (forget_subjects, retain_subjects, data.holdout_subjects)]
    (before, before_forget), (gold, gold_forget), (after, after_forget) = (
        evaluate_lm(task, model, *splits) for model in (original, retrained, result.model))
    quality = forget_quality(after_forget.truth_ratio, gold_forget.truth_ratio)
    retrain_seconds = float(retrained_meta["train_seconds"])
    targets = {
        "forget_quality": quality >= FORGET_QUALITY_TARGET,
        "model_utility": after.model_utility >= UTILITY_FRACTION * before.model_utility,
        "forget_rouge": abs(after.forget_rouge - gold.forget_rouge) <= ROUGE_TOLERANCE,
        "mia_auc": abs(after.mia_auc_loss - gold.mia_auc_loss) <= MIA_TOLERANCE
                   and abs(after.mia_auc_min_k - gold.mia_auc_min_k) <= MIA_TOLERANCE,
        "speedup": retrain_seconds / unlearn_seconds >= SPEEDUP_TARGET,
    }
    return {
        "scenario": scenario_name, "method": method, "seed": seed, "train": "plain", "forget_class": None,
        "forget_size": len(forget), "retain_size": len(retain), "holdout_size": len(holdout),
        "forget_subjects": forget_subjects,
        "original": before.as_dict(), "retrained": gold.as_dict(), "unlearned": after.as_dict(),
        "forget_quality": quality,
        "forget_quality_original": forget_quality(before_forget.truth_ratio, gold_forget.truth_ratio),
        "avg_gap": statistics.fmean(abs(after.as_dict()[k] - gold.as_dict()[k]) for k in GAP_METRICS),
        "unlearn_seconds": unlearn_seconds, "retrain_seconds": retrain_seconds,
        "speedup": retrain_seconds / unlearn_seconds,
        "cost_vs_fwd_bwd": unlearn_seconds / unit, "fwd_bwd_seconds": unit,
        "memorisation": memorisation(task, original, data.split(data.train_subjects)),
        "targets": targets, "target_reached": result.target_reached, "message": result.message,
        "details": {k: v for k, v in result.details.items() if k != "search"},
        "device": str(device), "original_train_seconds": float(original_meta["train_seconds"]),
    }


def memorisation(task, model, split) -> dict[str, float]:
    """Greedy answers of ``model`` on ``split``: exact match (after stripping spaces) and ROUGE-L recall."""
    generations = task.generate(model, split.answers, 12)
    exact = [g.strip() == r.strip() for g, r in zip(generations, split.references)]
    rouge = [rouge_l_recall(r, g) for g, r in zip(generations, split.references)]
    return {"exact_match": statistics.fmean(exact), "rouge_l": statistics.fmean(rouge)}
