"""Scenarios ``fictitious-subjects``, ``fictitious-customers`` and ``fictitious-patients``: erase 10% of the
training people from a tiny causal LM (issues 5 and 9).

``python -m unlearn.bench --method auto --scenario fictitious-subjects --seed 0 --json``

On a CPU the original is trained (once, then cached) at torch's thread count of the run that first needs it, and
the same seed trains a different original at another count (``original_threads`` in the result says which): the
documented tables say which count their originals had (docs/results/lm.md, "The named seeds on fresh originals").

The scenarios are the three LM families of :data:`unlearn.lm.fictitious.LM_FAMILIES`: biographies on a
GPT-2-style model (every LM default was tuned there), customer records on a Llama-style model of the same size
(``unseen-kd``'s weights were chosen on seeds 0-1 of both), and patient records on a GPT-NeoX-style model of the
same size, held out (nothing was chosen on it). Everything below holds for all three; "GPT" means any of them.

Data (:mod:`unlearn.lm.fictitious`): 200 fictitious people, five questions each; 100 trained on, 100 never
trained on and split by keyed hash into ``tune`` and ``audit`` people. The run's seed draws the 10 forget
people among the 100 trained ones (``numpy.random.default_rng(4000 + seed)``) and seeds the models.

Who sees what (:class:`PeopleSplits`, checked by :func:`check_no_metric_on_tune` before anything runs):

- the method: ``forget`` (the forget people's questions), ``retain`` (the other 90 training people's),
  ``tune`` (the tune people's; methods stop when the forget answers' NLL looks like theirs), the GPT factory
  and the recipe;
- the evaluation and the gate: the forget, retained and ``audit`` people. Every membership number (the LOSS
  and Min-K% attacks' AUC, the KS test of answer NLLs, the gate's membership checks) is forget against
  audit; no metric touches a tune person.

Models: the original GPT is trained on the 100 training people with the family's recipe (both families:
:data:`unlearn.lm.fictitious.LM_RECIPE`; :func:`unlearn.lm.model.train_lm`: AdamW, learning rate decayed
linearly to 0) and cached; its training
time divides nothing. The retain-only reference is RETRAINED IN THIS PROCESS with the same function, recipe
and seed on the 90 retained people, after the warm-up and right after the unlearning run, and timed:
``retrain_seconds`` and ``speedup`` compare two wall times measured under the same load. It is also the
gold model the metrics compare with. ``--method retrain`` is that same retrain (the original recipe,
schedule included; its speed-up is 1 by construction). The registry's ``retrain`` (the last method of the
``auto`` chain) repeats it exactly: :func:`train_lm` is :func:`unlearn.training.train` with AdamW and the
linear decay that :data:`~unlearn.lm.fictitious.LM_RECIPE` names (see :func:`registry_retrain_matches`).

``--method auto`` runs the default escalation chain for causal LMs (:data:`unlearn.chain.DEFAULT_CHAINS`
``["causal_lm"]``) judged by :func:`unlearn.gate.judge` with the default :class:`unlearn.gate.GatePolicy`:
utility on the retained people (teacher-forced exact match), membership of the forget people against the
audit people. Its JSON adds ``attempts``, ``chain`` and ``chosen`` (the method that shipped; None when no
attempt passed), as the classifier harness's ``auto`` does; every JSON has ``gate`` (the gate's verdict on the
result) and ``exact``, so single methods and chains read alike.

Result: ``original`` / ``retrained`` / ``unlearned`` hold :class:`unlearn.lm.metrics.LMMetrics`; top level
``forget_quality`` (KS p-value of the forget truth ratios, unlearned vs the in-process retrain),
``forget_quality_original``, ``avg_gap`` (mean |unlearned - retrained| over :data:`GAP_METRICS`),
``unlearn_seconds``, ``retrain_seconds``, ``speedup``, ``cost_vs_fwd_bwd``, ``membership`` (the unlearned
model's forget-vs-audit test), ``memorisation`` (the original model on its training answers), and
``targets`` (issue 9's four, each a boolean) with ``targets_met``.

Two costs, as for SSD: ``unlearn_seconds`` and ``speedup`` are the FIRST request on a model version. They
include what the service computes once per version and keeps (:mod:`service.prefetch`,
:func:`service.pipeline.measure`): the original's scores on the tune people (``UnlearnRequest.tune_scores``,
read by the LM methods' first stop check) and its retained-answer accuracy (the gate's utility reference).
``steady_state`` gives the same run without them (``unlearn_seconds``, ``speedup``, ``per_version_seconds``):
both are timed in this process, the per-version part right before the chain; the chain runs once. The
targets are judged on the first request. Before anything is timed, one untimed request on other people
(:func:`warm_up_request`, ``warm_up_seconds``) pays what a process pays once, as a running service has by its
second request and as the retrain, timed after the chain, finds it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unlearn import registry
from unlearn.bench import default_cache_dir, fwd_bwd_seconds, warm_up
from unlearn.chain import default_chain, run_chain
from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError, InvalidParameterError
from unlearn.gate import GatePolicy, GateResult, judge
from unlearn.heldout import score
from unlearn.lm.fictitious import LM_FAMILIES, FictitiousSubjects, LMFamily, lm_scenario, load_family
from unlearn.lm.metrics import LM_METRIC_SPLITS, ParaphraseProbe, evaluate_lm, forget_quality, rouge_l_recall
from unlearn.lm.model import GPTFactory, LMCache, train_lm
from unlearn.registry import UnlearnRequest, UnlearnResult
from unlearn.tasks import accuracy
from unlearn.training import TrainRecipe

SCENARIOS = tuple(LM_FAMILIES)
CHAIN_TASK = "causal_lm"  # the key of unlearn.chain.DEFAULT_CHAINS (the service's task type)
FORGET_FRACTION = 0.10
GAP_METRICS = ("forget_rouge", "retain_rouge", "audit_rouge", "model_utility", "mia_auc")
TIMING_BATCH_SIZE = 32
# Issue 9's targets (evaluated on the audit people).
FORGET_QUALITY_TARGET = 0.05
UTILITY_FRACTION = 0.9
MIA_AUC_MARGIN = 0.1
SPEEDUP_TARGET = 10.0


@dataclass(frozen=True)
class PeopleSplits:
    """The four disjoint groups of people of one run (subject ids)."""

    forget: tuple[int, ...]
    retain: tuple[int, ...]
    tune: tuple[int, ...]
    audit: tuple[int, ...]

    def __post_init__(self) -> None:
        groups = {"forget": self.forget, "retain": self.retain, "tune": self.tune, "audit": self.audit}
        for name, group in groups.items():
            if not group:
                raise InvalidDataError(name, "the benchmark needs at least one person in every group")
        names = list(groups)
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                shared = set(groups[first]) & set(groups[second])
                if shared:
                    raise InvalidDataError(f"{first}/{second}", f"people {sorted(shared)[:5]} are in both groups")


def people_splits(data: FictitiousSubjects, seed: int) -> PeopleSplits:
    """Forget = a seeded 10% of the training people; retain = the rest; tune and audit from the data set."""
    rng = np.random.default_rng(4000 + seed)
    count = round(FORGET_FRACTION * len(data.train_subjects))
    forget = tuple(sorted(int(s) for s in rng.choice(data.train_subjects, count, replace=False)))
    retain = tuple(s for s in data.train_subjects if s not in set(forget))
    return PeopleSplits(forget, retain, data.tune_subjects, data.audit_subjects)


def subjects_of(examples: ExampleSet | None) -> set[int]:
    return set() if examples is None else {int(s) for s in examples["subject_id"].tolist()}


def check_no_metric_on_tune(request: UnlearnRequest, evaluated: dict[str, ExampleSet]) -> None:
    """Issue 9's rule: no metric is computed on data a method stopped or searched on.

    A method sees ``request.tune``; the evaluation sees ``evaluated`` (name -> example set). Raises
    :class:`InvalidDataError` when a person of the tune set appears in any evaluated set, or when the audit set
    (the never-seen reference) contains a person the method saw in any role.
    """
    tune = subjects_of(request.tune)
    for name, examples in evaluated.items():
        shared = tune & subjects_of(examples)
        if shared:
            raise InvalidDataError(name, f"people {sorted(shared)[:5]} are in the method's tune set and would "
                                   "be scored: no metric may use data a method stopped or searched on")
    audit = subjects_of(evaluated.get("audit"))
    seen = subjects_of(request.forget) | subjects_of(request.retain) | tune
    if audit & seen:
        raise InvalidDataError("audit", f"people {sorted(audit & seen)[:5]} of the audit set reach the method")


def registry_retrain_matches(recipe: TrainRecipe) -> bool:
    """Whether the registry's ``retrain`` repeats :func:`unlearn.lm.model.train_lm` exactly.

    :func:`train_lm` is :func:`unlearn.training.train` with AdamW and the learning rate decayed linearly to 0,
    whatever the recipe says; the registry's ``retrain`` trains with the recipe as it is. So they agree
    (bit for bit, ``tests/unlearn/test_lm_contract.py``) when the recipe names that optimiser and schedule, as
    :data:`~unlearn.lm.fictitious.LM_RECIPE` does; otherwise the ``auto`` chain leaves the registry's
    ``retrain`` out (a retrain without the decay is not the original recipe: it stops at 85-90% memorisation
    and would be judged against a model it is not).
    """
    return (recipe.optimizer == "adamw" and recipe.lr_schedule == "linear" and recipe.warmup_steps == 0
            and recipe.gradient_restriction == 0)


def timed_retrain(task, factory: GPTFactory, retain: ExampleSet, recipe: TrainRecipe,
                  device: torch.device) -> tuple[torch.nn.Module, float]:
    """A fresh GPT trained on ``retain`` exactly as the original was (same function, recipe and seed), timed."""
    started = time.perf_counter()
    model = factory(recipe.seed).to(device)
    train_lm(task, model, retain, recipe)
    return model.eval(), time.perf_counter() - started


WARM_UP_STEPS = 3


def warm_up_request(method: str, params: dict[str, Any] | None, original, request: UnlearnRequest,
                    data: FictitiousSubjects, people: PeopleSplits, policy: GatePolicy) -> float:
    """One untimed request before anything is timed; its wall time (reported as ``warm_up_seconds``).

    What a process pays once and a running service has paid by its second request: lazy imports, the kernels
    for these shapes, the optimiser's first use, the statistics' first calls. On biographies seed 0 (two
    threads) three requests in a row in a fresh process took 10.1, 9.4 and 8.9 s; the retrain, timed after the
    chain, runs in the warm process. So first the method (for ``auto``, the chain's first) runs
    :data:`WARM_UP_STEPS` optimiser steps, stop check included, on as many OTHER training people as the forget
    set holds (the first retained ones), and the gate judges the result. Nothing it computes is kept: the timed
    request starts from the same original and computes all it needs itself. A method without a ``max_steps``
    is not run here (it could be a whole request); the gate still is.
    """
    started = time.perf_counter()
    task = request.task
    others = people.retain[: len(people.forget)]
    rest = tuple(subject for subject in people.retain if subject not in set(others))
    forget, retain = data.examples(others), data.examples(rest)
    first, first_params = default_chain(CHAIN_TASK)[0] if method == "auto" else (method, dict(params or {}))
    probe = ParaphraseProbe(task, data.split(others), data.split(people.audit))
    short = {**first_params, "max_steps": WARM_UP_STEPS}
    try:
        registry.parse_config(first, short)
    except InvalidParameterError:  # no step budget to shorten
        model = original
    else:
        model = registry.run(first, original, replace(request, forget=forget, retain=retain), short).model
    judge(task, original, model, forget, retain, data.examples(people.audit), policy, knowledge=probe)
    return time.perf_counter() - started


def run_lm_subjects(method: str, scenario_name: str, seed: int, forget_class: int = 3,
                    params: dict[str, Any] | None = None, device: torch.device | None = None,
                    cache_dir: Path | None = None, family: LMFamily | None = None) -> dict[str, Any]:
    """One erasure request on an LM family's model; ``forget_class`` is ignored (run_benchmark's signature).

    ``family``: one of your own (``python -m unlearn.bench --family module:function``), whose one scenario is
    ``<its schema's name>-subject``; otherwise ``scenario_name`` names one of :data:`SCENARIOS`.
    """
    if family is not None:
        if scenario_name != lm_scenario(family):
            raise InvalidParameterError("scenario", f"unknown scenario {scenario_name!r} for this LM family; known: "
                                                    f"{lm_scenario(family)}")
    elif scenario_name not in LM_FAMILIES:
        raise InvalidParameterError("scenario", f"this runner only knows {', '.join(SCENARIOS)}")
    if method == "auto" and params:
        raise InvalidParameterError("params", "'auto' runs the default chain with its own parameters")
    device = device or torch.device("cpu")
    cache_dir = cache_dir or default_cache_dir()
    torch.manual_seed(seed)
    family, data, factory = load_family(scenario_name, cache_dir, family)
    task = data.task
    people = people_splits(data, seed)
    forget, retain, tune, audit = (data.examples(group) for group in
                                   (people.forget, people.retain, people.tune, people.audit))
    train = data.examples(data.train_subjects)
    recipe = replace(family.recipe, seed=seed)
    original, original_meta = LMCache(cache_dir).get_or_train("original", task, factory, train, recipe, device)

    request = UnlearnRequest(task=task, forget=forget, retain=retain, tune=tune, model_factory=factory,
                             recipe=recipe, seed=seed)
    check_no_metric_on_tune(request, {"forget": forget, "retain": retain, "audit": audit})
    policy = GatePolicy()
    splits = [data.split(group) for group in (people.forget, people.retain, people.audit)]
    probe = ParaphraseProbe(task, splits[0], splits[2])  # the gate's knowledge check: this data has paraphrases
    utility_before = None  # the original's retained accuracy; measured per model version below (not for retrain)

    def gate(result: UnlearnResult) -> GateResult:
        return judge(task, original, result.model, forget, retain, audit, policy, utility_before=utility_before,
                     knowledge=probe)

    batch_size = TIMING_BATCH_SIZE if method in ("auto", "retrain") else getattr(
        registry.parse_config(method, params), "batch_size", TIMING_BATCH_SIZE)
    warm_up(device)
    unit = fwd_bwd_seconds(task, original, forget, batch_size)  # also warms up autograd before the timing
    warm_up_seconds = (warm_up_request(method, params, original, request, data, people, policy)
                       if method != "retrain" else 0.0)  # the retrain's own first steps are its warm-up
    torch.manual_seed(seed)  # as before the warm-up (the methods draw from their own seeded generators anyway)
    attempts, chain, chosen, precompute_seconds = None, None, None, 0.0
    if method == "retrain":  # the original recipe, in this process: the unlearned model IS the retrain
        retrained, retrain_seconds = timed_retrain(task, factory, retain, recipe, device)
        result, unlearn_seconds = UnlearnResult(retrained, details={"recipe": "train_lm, as the original"},
                                                exact=True), retrain_seconds
        verdict = gate(result)
    else:
        # What the service keeps per model version (service.prefetch, service.pipeline.measure): the original's
        # scores on the tune people and its retained-answer accuracy. A first request on a new version pays them
        # (unlearn_seconds adds them); later requests do not (steady_state).
        started = time.perf_counter()
        request = replace(request, tune_scores=score(task, original, tune))
        utility_before = accuracy(task, original, retain)  # the gate's utility reference, as judge computes it
        precompute_seconds = time.perf_counter() - started
        started = time.perf_counter()
        if method == "auto":
            chain = default_chain(CHAIN_TASK, registry_retrain_matches(recipe))
            outcome = run_chain(original, request, chain, gate)
            unlearn_seconds = time.perf_counter() - started  # the whole chain, its gate evaluations included
            attempts = [a.summary() for a in outcome.attempts]
            chosen = outcome.chosen.method if outcome.chosen is not None else None
            last = outcome.chosen or next((a for a in reversed(outcome.attempts) if a.gate is not None), None)
            if outcome.result is not None:
                result = outcome.result
            else:  # nothing passed: report the original model (what the service would keep serving)
                result = UnlearnResult(original, details={"chain": "no attempt passed the gate"},
                                       target_reached=False, message="chain ended without a verified result")
            verdict = last.gate if last is not None and outcome.result is not None else gate(result)
        else:
            result = registry.run(method, original, request, params)
            unlearn_seconds = time.perf_counter() - started
            verdict = gate(result)
        retrained, retrain_seconds = timed_retrain(task, factory, retain, recipe, device)

    (before, before_forget, _), (gold, gold_forget, gold_membership), (after, after_forget, membership) = (
        evaluate_lm(task, model, *splits) for model in (original, retrained, result.model))
    quality = forget_quality(after_forget.truth_ratio, gold_forget.truth_ratio)
    steady_seconds = unlearn_seconds
    unlearn_seconds += precompute_seconds  # the first request on a new model version
    speedup = retrain_seconds / unlearn_seconds
    targets = {
        "forget_quality": quality >= FORGET_QUALITY_TARGET,
        "model_utility": after.model_utility >= UTILITY_FRACTION * before.model_utility,
        "mia_auc": abs(after.mia_auc - 0.5) <= MIA_AUC_MARGIN,
        "speedup": speedup >= SPEEDUP_TARGET,
    }
    out = {
        "scenario": scenario_name, "method": method, "params": params or {}, "seed": seed, "train": "plain",
        "forget_class": None, "forget_size": len(forget), "retain_size": len(retain), "tune_size": len(tune),
        "audit_size": len(audit),
        "people": {"forget": list(people.forget), "tune": list(people.tune), "audit": list(people.audit)},
        "original": before.as_dict(), "retrained": gold.as_dict(), "unlearned": after.as_dict(),
        "forget_quality": quality,
        "forget_quality_original": forget_quality(before_forget.truth_ratio, gold_forget.truth_ratio),
        "avg_gap": statistics.fmean(abs(after.as_dict()[k] - gold.as_dict()[k]) for k in GAP_METRICS),
        "unlearn_seconds": unlearn_seconds, "retrain_seconds": retrain_seconds, "speedup": speedup,
        "cost_vs_fwd_bwd": unlearn_seconds / unit, "fwd_bwd_seconds": unit, "warm_up_seconds": warm_up_seconds,
        "steady_state": {"unlearn_seconds": steady_seconds, "speedup": retrain_seconds / steady_seconds,
                         "per_version_seconds": precompute_seconds,
                         "per_version": "the original's tune-people scores and retained-answer accuracy"},
        "membership": membership.as_dict(), "membership_retrained": gold_membership.as_dict(),
        "memorisation": memorisation(task, original, data.split(data.train_subjects)),
        "targets": targets, "targets_met": all(targets.values()), "splits": LM_METRIC_SPLITS,
        "target_reached": result.target_reached, "message": result.message,
        "details": {k: v for k, v in result.details.items() if k != "search"},
        "gate": {"passed": verdict.passed, "failures": list(verdict.failures),
                 "checks": [c.as_dict() for c in verdict.checks]},
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "original_threads": original_meta.get("torch_threads"),  # what the cached original was trained with
    }
    out["exact"] = bool(result.exact)
    if attempts is not None:  # as the classifier harness's auto: the chain, what shipped (None: nothing passed)
        out.update(chain=[name for name, _ in chain], chosen=chosen, attempts=attempts)
    return out


def memorisation(task, model, split) -> dict[str, float]:
    """Greedy answers of ``model`` on ``split``: exact match (after stripping spaces) and ROUGE-L recall."""
    generations = task.generate(model, split.answers, 12)
    exact = [g.strip() == r.strip() for g, r in zip(generations, split.references)]
    rouge = [rouge_l_recall(r, g) for g, r in zip(generations, split.references)]
    return {"exact_match": statistics.fmean(exact), "rouge_l": statistics.fmean(rouge)}
