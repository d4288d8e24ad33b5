"""The classifier benchmark: any registered method, or the service's escalation chain, on any family.

``python -m unlearn.bench --method auto --scenario tabular-random --seed 0 --json``

A run (:func:`run_benchmark`) is :func:`prepare` (the family's records and split, the original model, the
retrained reference) followed by :func:`run_method` (one method, or ``auto``). A sweep prepares each
scenario and seed once and runs every method against it.

EVIDENCE RULE (issue 9). The records of a family are training records (the original model's training
set: ``forget`` = Df and ``retain`` = Dr) or never-trained records, which :func:`unlearn.splits.audit_mask`
deals, by keyed hash of the record id (:data:`unlearn.splits.BENCH_SPLIT_KEY`), into

- ``tune``: the only never-trained records a METHOD sees (:attr:`UnlearnRequest.tune`: stop rules, the
  alpha search of ``ssd-auto``). Nothing reported is measured on ``tune``.
- ``audit``: never seen by any method. EVERY reported number is computed on training records
  (``forget``, ``retain``) and ``audit`` only: the accuracies (``test_acc`` and ``test_retain_acc`` are
  accuracies on ``audit``, the latter on its records of the kept classes), both membership attacks (the SSD
  entropy attack is fit on retain vs audit; the loss attack scores forget vs audit), ``avg_gap`` and the
  gate (:func:`unlearn.gate.judge`: utility on audit's kept classes, membership of forget vs audit).

:attr:`Prepared.record_ids` records which record ids fed the request and which fed evaluation, and
:meth:`Prepared.evidence` asserts the rule on every run (``tune`` disjoint from every evaluation set,
``audit`` disjoint from every request set); ``tests/unlearn/test_bench.py`` checks it too. Every result says
which split each metric comes from (``splits``).

Costs (:mod:`unlearn.bench.timing`): the retrain reference is trained in this process, after a warm-up,
and timed: ``retrain_seconds``. A method is timed on its own. A method that reads the full training set's
importance I_D (the SSD family) gets a FRESH :class:`~unlearn.importance.TrainImportance`, as on a newly
registered model version: its first run pays I_D (``first_request_seconds``; the Fisher pass it really ran
is ``train_importance_seconds``); it is then run again with I_D in memory, the steady state
(``unlearn_seconds``). ``speedup`` = retrain / steady state; ``speedup_first_request`` = retrain / first.

``--method auto`` runs :func:`unlearn.chain.run_chain` with :func:`unlearn.chain.default_chain` for the
task, judged by :func:`unlearn.gate.judge` with the default :class:`~unlearn.gate.GatePolicy`: the service's
escalation and gate, not a copy. ``attempts`` lists every try; ``unlearned`` is the first result the gate
passed (when none passed, the original model: a rejected job changes nothing). Its seconds are the chain's
wall time, gates included, with I_D paid on the first request.

Trained original models come from :class:`unlearn.cache.ModelCache`. ``training="gr"`` trains the original
and the retrained model with IAU's gradient restriction (``gradient_restriction=0.005``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unlearn import registry
from unlearn.bench.families import Family, Records, check_records, get_family
from unlearn.bench.scenarios import DEFAULT_FORGET_CLASS, parse_scenario, select_forget
from unlearn.bench.timing import fwd_bwd_seconds, timed_retrain, warm_up
from unlearn.cache import ModelCache
from unlearn.chain import default_chain, run_chain
from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError, InvalidParameterError
from unlearn.evaluation import ClassificationMetrics, avg_gap, evaluate_classifier
from unlearn.gate import GatePolicy, GateResult, judge, without_classes
from unlearn.gradient_restriction import DEFAULT_ALPHA_GR
from unlearn.importance import TrainImportance
from unlearn.registry import UnlearnRequest
from unlearn.splits import BENCH_SPLIT_KEY, audit_mask
from unlearn.tasks import ClassificationTask, accuracy, accuracy_without_classes
from unlearn.training import TrainRecipe

AUTO = "auto"
TRAININGS = ("plain", "gr")  # gr: the same recipe with IAU's gradient restriction (arXiv 2507.23257)
TIMING_BATCH_SIZE = 64
REQUEST_SETS = ("train", "forget", "retain", "tune")
"""What a method may see: training records (I_D is over train = forget + retain) and ``tune``."""
EVALUATION_SETS = ("forget", "retain", "audit")
"""What every reported number is computed on."""
METRIC_SPLITS = {
    "forget_acc": "forget (training records erased)",
    "retain_acc": "retain (training records kept)",
    "test_acc": "audit (never trained, never seen by the method)",
    "test_retain_acc": "audit, records of the classes that stay",
    "mia": "entropy attack fit on retain vs audit, scored on forget",
    "mia_loss_auc": "loss attack, forget vs audit",
    "gate": "utility on audit (kept classes); membership forget vs audit",
}


@dataclass
class Prepared:
    """One scenario and seed, ready for methods: data sets, original model and retrained reference."""

    scenario: str
    family: Family
    seed: int
    forget_class: int | None
    training: str
    task: ClassificationTask
    recipe: TrainRecipe
    forget_classes: tuple[int, ...] | None
    sets: dict[str, ExampleSet]
    record_ids: dict[str, np.ndarray]
    original: nn.Module
    original_from_cache: bool
    retrained: nn.Module
    retrain_seconds: float
    device: torch.device
    policy: GatePolicy
    before: ClassificationMetrics | None = None
    gold: ClassificationMetrics | None = None
    original_gate: GateResult | None = None
    retrained_gate: GateResult | None = None
    utility_before: float | None = None
    original_threads: int | None = None  # torch threads the (cached) original was trained with; None: unknown or GPU

    def request(self, importance: TrainImportance) -> UnlearnRequest:
        """The request a method gets: built from :data:`REQUEST_SETS` only (never ``audit``)."""
        return UnlearnRequest(task=self.task, forget=self.sets["forget"], retain=self.sets["retain"],
                              tune=self.sets["tune"], train_importance=importance,
                              model_factory=self.family.model_factory, recipe=self.recipe,
                              forget_classes=self.forget_classes, seed=self.seed)

    def fresh_importance(self) -> TrainImportance:
        """I_D of a newly registered model version: nothing computed yet, no disk cache."""
        return TrainImportance(self.task, self.sets["train"])

    def measure(self, model: nn.Module) -> ClassificationMetrics:
        """Every reported metric: on forget, retain and audit (:data:`EVALUATION_SETS`) only."""
        return evaluate_classifier(self.task, model, self.sets["forget"], self.sets["retain"], self.sets["audit"],
                                   self.forget_classes)

    def utility_set(self) -> ExampleSet:
        return without_classes(self.sets["audit"], self.forget_classes)

    def gate(self, model: nn.Module) -> GateResult:
        """:func:`unlearn.gate.judge` of ``model`` against the original, on forget and audit."""
        return judge(self.task, self.original, model, self.sets["forget"], self.utility_set(), self.sets["audit"],
                     self.policy, forget_classes=self.forget_classes, utility_before=self.utility_before)

    def evidence(self) -> dict[str, Any]:
        """Which records fed the request and which fed evaluation; raises if the evidence rule is broken."""
        request = {name: set(self.record_ids[name]) for name in REQUEST_SETS}
        evaluation = {name: set(self.record_ids[name]) for name in EVALUATION_SETS}
        tune_in_evaluation = sum(len(request["tune"] & ids) for ids in evaluation.values())
        audit_in_request = sum(len(evaluation["audit"] & ids) for ids in request.values())
        if tune_in_evaluation or audit_in_request:
            raise AssertionError(f"evidence rule broken: {tune_in_evaluation} tune records in evaluation, "
                                 f"{audit_in_request} audit records in the request")
        return {"request_sets": {name: len(ids) for name, ids in request.items()},
                "evaluation_sets": {name: len(ids) for name, ids in evaluation.items()},
                "tune_records_in_evaluation": tune_in_evaluation, "audit_records_in_request": audit_in_request,
                "split_key": "BENCH_SPLIT_KEY"}


def split_indices(records: Records) -> dict[str, np.ndarray]:
    """Positions of the ``train``, ``tune`` and ``audit`` records (tune/audit by keyed hash of the record id)."""
    train = np.flatnonzero(records.trained)
    never = np.flatnonzero(~records.trained)
    audit = audit_mask(records.record_ids[never], BENCH_SPLIT_KEY)
    return {"train": train, "tune": never[~audit], "audit": never[audit]}


def prepare(scenario: str, seed: int, forget_class: int | None = DEFAULT_FORGET_CLASS,
            device: torch.device | None = None, cache_dir: Path | None = None, training: str = "plain",
            policy: GatePolicy | None = None, family: Family | None = None) -> Prepared:
    """Load the family, split its records, get the original model and retrain the reference (timed).

    ``scenario`` is ``<family>-<selector>``; ``family`` runs the harness on any model and data set that is
    not one of :data:`unlearn.bench.families.FAMILIES` (its ``name`` must be the scenario's family part).
    """
    if training not in TRAININGS:
        raise InvalidParameterError("train", f"must be one of {list(TRAININGS)}, got {training!r}")
    if family is None:
        family = get_family(parse_scenario(scenario)[0])
    else:
        parse_scenario(scenario, (family.name,))
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    task = family.task()
    records = family.load_records()
    check_records(family, records)
    index = split_indices(records)
    for split in ("tune", "audit"):
        if len(index[split]) == 0:
            raise InvalidDataError(f"family.{family.name}", f"no never-trained record falls in {split} "
                                   f"({len(index['tune']) + len(index['audit'])} never-trained records in all)")
    train_index = index["train"]
    selection = select_forget(scenario, records.labels[train_index], records.subject_ids[train_index],
                              family.num_classes, seed, DEFAULT_FORGET_CLASS if forget_class is None else forget_class)
    forget_mask = np.zeros(len(train_index), dtype=bool)
    forget_mask[selection.positions] = True
    index.update(forget=train_index[forget_mask], retain=train_index[~forget_mask])
    sets = {name: family.examples(records, positions) for name, positions in index.items()}
    record_ids = {name: records.record_ids[positions] for name, positions in index.items()}

    recipe = family.recipe if training == "plain" else replace(family.recipe, gradient_restriction=DEFAULT_ALPHA_GR)
    recipe = replace(recipe, seed=seed)
    task.validate(family.model_factory(recipe.seed), sets["train"], f"family.{family.name}")  # logits [batch, classes]
    cached = ModelCache(cache_dir).trained(family.namespace, task, family.model_factory, sets["train"], recipe,
                                           device, "original", family.architecture)
    warm_up(device)
    fwd_bwd_seconds(task, cached.model, sets["forget"], TIMING_BATCH_SIZE, repeats=2)  # the architecture's first pass
    retrained, retrain_seconds = timed_retrain(task, family.model_factory, sets["retain"], recipe, device)
    prepared = Prepared(scenario, family, seed, forget_class if selection.forget_classes else None, training, task,
                        recipe, selection.forget_classes, sets, record_ids, cached.model, cached.hit, retrained,
                        retrain_seconds, device, policy or GatePolicy())
    prepared.original_threads = cached.meta.get("torch_threads")
    prepared.evidence()
    prepared.utility_before = (accuracy_without_classes(task, prepared.original, prepared.utility_set(),
                                                        prepared.forget_classes)
                               if prepared.forget_classes else accuracy(task, prepared.original, prepared.utility_set()))
    prepared.before, prepared.gold = prepared.measure(prepared.original), prepared.measure(retrained)
    prepared.original_gate, prepared.retrained_gate = prepared.gate(prepared.original), prepared.gate(retrained)
    return prepared


def refusal(prepared: Prepared, method: str) -> str | None:
    """Why ``method`` cannot serve this scenario (task, model or erasure kind), or None."""
    reason = registry.unsupported_reason(method, prepared.task.name, prepared.original)
    if reason is None and registry.get(method).erases == "classes" and not prepared.forget_classes:
        reason = f"method {method!r} erases whole classes only; this scenario erases records"
    return reason


def run_method(prepared: Prepared, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``method`` (or :data:`AUTO`) on the prepared scenario; the result dict (module docstring)."""
    if method == AUTO:
        return _run_auto(prepared, params)
    config = registry.parse_config(method, params)
    reason = refusal(prepared, method)
    if reason is not None:
        raise InvalidParameterError("method", reason)
    batch_size = getattr(config, "batch_size", TIMING_BATCH_SIZE)
    unit = fwd_bwd_seconds(prepared.task, prepared.original, prepared.sets["forget"], batch_size)
    importance = prepared.fresh_importance()
    started = time.perf_counter()
    result = registry.run(method, prepared.original, prepared.request(importance), params)
    first_seconds = time.perf_counter() - started
    importance_seconds = importance.compute_seconds
    steady_seconds = first_seconds
    if importance.computed:  # the method read I_D: run it again with I_D in memory (the steady state)
        started = time.perf_counter()
        result = registry.run(method, prepared.original, prepared.request(importance), params)
        steady_seconds = time.perf_counter() - started
    output = _common(prepared, method, result.model, steady_seconds, unit)
    output.update(
        first_request_seconds=first_seconds,
        speedup_first_request=prepared.retrain_seconds / first_seconds,
        cost_vs_fwd_bwd_first_request=first_seconds / unit,
        train_importance_seconds=importance_seconds,
        train_importance_passes=[{"batch_size": b, "variant": v} for b, v in importance.computed],
        target_reached=result.target_reached, message=result.message,
        details={k: v for k, v in result.details.items() if k != "search"},
        exact=result.exact,
    )
    return output


def _run_auto(prepared: Prepared, params: dict[str, Any] | None) -> dict[str, Any]:
    if params:
        raise InvalidParameterError("params", "--method auto runs the default chain with each method's defaults")
    chain = default_chain(prepared.task.name, has_training=True)
    unit = fwd_bwd_seconds(prepared.task, prepared.original, prepared.sets["forget"], TIMING_BATCH_SIZE)
    importance = prepared.fresh_importance()
    started = time.perf_counter()
    outcome = run_chain(prepared.original, prepared.request(importance), chain,
                        lambda result: prepared.gate(result.model))
    seconds = time.perf_counter() - started
    chosen = outcome.chosen
    model = outcome.result.model if outcome.result is not None else prepared.original
    output = _common(prepared, AUTO, model, seconds, unit, gate=chosen.gate if chosen else None)
    last = outcome.attempts[-1] if outcome.attempts else None
    output.update(
        first_request_seconds=seconds, speedup_first_request=prepared.retrain_seconds / seconds,
        train_importance_seconds=importance.compute_seconds,
        chain=[name for name, _ in chain], chosen=chosen.method if chosen else None,
        attempts=[_attempt(a) for a in outcome.attempts],
        target_reached=chosen.target_reached if chosen else (last.target_reached if last else None),
        message=(chosen.message if chosen else "no method of the chain passed the gate; the model is unchanged"),
        details={"attempt_seconds": [a.seconds for a in outcome.attempts]},
        exact=bool(outcome.result is not None and outcome.result.exact),
    )
    if chosen is None and last is not None and last.gate is not None:
        output["gate"] = last.gate.as_dict()
        output["gate"]["passed"] = False
    return output


def _attempt(attempt) -> dict[str, Any]:
    summary = attempt.summary()
    return {"method": summary["method"], "params": summary["params"], "target_reached": summary["target_reached"],
            "gate_passed": summary["gate_passed"], "failures": summary["failures"], "seconds": summary["seconds"],
            "error": summary["error"], "message": summary["message"]}


def _common(prepared: Prepared, method: str, model: nn.Module, seconds: float, unit: float,
            gate: GateResult | None = None) -> dict[str, Any]:
    after = prepared.measure(model)
    gate = gate if gate is not None else prepared.gate(model)
    sizes = {name: len(examples) for name, examples in prepared.sets.items()}
    return {
        "scenario": prepared.scenario, "family": prepared.family.name, "method": method, "seed": prepared.seed,
        "train": prepared.training, "forget_class": prepared.forget_class,
        "forget_size": sizes["forget"], "retain_size": sizes["retain"], "tune_size": sizes["tune"],
        "audit_size": sizes["audit"],
        "original": prepared.before.as_dict(), "retrained": prepared.gold.as_dict(), "unlearned": after.as_dict(),
        "avg_gap": avg_gap(after, prepared.gold),
        "unlearn_seconds": seconds, "retrain_seconds": prepared.retrain_seconds,
        "speedup": prepared.retrain_seconds / seconds, "cost_vs_fwd_bwd": seconds / unit, "fwd_bwd_seconds": unit,
        "gate": gate.as_dict(),
        "gate_retrained": _gate_summary(prepared.retrained_gate),
        "gate_original": _gate_summary(prepared.original_gate),
        "splits": METRIC_SPLITS, "evidence": prepared.evidence(),
        "original_from_cache": prepared.original_from_cache, "original_threads": prepared.original_threads,
        "recipe": asdict(prepared.recipe), "device": str(prepared.device), "threads": torch.get_num_threads(),
    }


def _gate_summary(gate: GateResult | None) -> dict[str, Any] | None:
    if gate is None:
        return None
    return {"passed": gate.passed, "failures": list(gate.failures),
            "checks": {c.name: c.value for c in gate.checks}}


def run_benchmark(method: str, scenario_name: str, seed: int, forget_class: int = DEFAULT_FORGET_CLASS,
                  params: dict[str, Any] | None = None, device: torch.device | None = None,
                  cache_dir: Path | None = None, training: str = "plain", family: Family | None = None
                  ) -> dict[str, Any]:
    """One run: :func:`prepare` then :func:`run_method` (the CLI's entry; the signature of every runner).
    ``family``: a family that is not one of :data:`unlearn.bench.families.FAMILIES` (held-out, or yours)."""
    if method != AUTO:
        registry.parse_config(method, params)  # fail fast, before any training
    prepared = prepare(scenario_name, seed, forget_class, device, cache_dir, training, family=family)
    return run_method(prepared, method, params)


