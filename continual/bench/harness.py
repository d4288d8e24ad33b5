"""The benchmark's one loop: a strategy's lineage through a scenario's updates, measured.

A :class:`Scenario` (built by :mod:`continual.bench.digits` or :mod:`continual.bench.fictitious`) holds the
base model, the updates, the data state before each update (retain data, erasures so far), the evaluation
data of every task and the tune data. :func:`run_lineage` takes one strategy through it:

    for each update u = 1..T:
        erase (if the scenario erases before u): the lineage's model through the erasure chain, its buffer
            purged (not timed: erasure is another job);
        measure old-task accuracy just before the update;
        run ONE registry call with an OldTaskProbe as the request's monitor (old-task accuracy every k steps);
        time it, minus the probe's own seconds;
        erased stays erased (:func:`keep_erased`): every erasure made so far is re-checked on the result, and
            one that regressed is erased again (timed with the update: the service's update job does this);
        R row u: accuracy on every task's evaluation data; the scenario's extra per-update metrics.

Timing: :func:`warm_up` pays torch's one-off costs before anything is timed, every strategy is timed in
this process, and nothing divides by a cached or remembered duration. ``joint`` (the denominator) runs in
the same process as the strategy and ``finetune`` (:func:`compare`).
"""

from __future__ import annotations

import copy
import hashlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from continual import registry
from continual.buffer import ReplayBuffer
from continual.examples import join
from continual.metrics import DEFINITIONS, OldTaskProbe, UpdateTrace, summary
from unlearn.data import ExampleSet
from unlearn.tasks import TaskAdapter, accuracy, collect
from unlearn.training import TrainRecipe


def subject_hash(subject_id: str) -> str:
    """The benchmark's stand-in for the service's keyed subject hash (a fixed key: this is test data)."""
    return hashlib.sha256(f"lethe-bench|{subject_id}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Keyed:
    """Examples with their record ids and subject hashes (row-aligned)."""

    examples: ExampleSet
    record_ids: tuple[str, ...]
    subject_hashes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.examples)

    def join(self, other: Keyed) -> Keyed:
        return Keyed(join(self.examples, other.examples), self.record_ids + other.record_ids,
                     self.subject_hashes + other.subject_hashes)

    def keep(self, mask: list[bool]) -> Keyed:
        index = [i for i, kept in enumerate(mask) if kept]
        return Keyed(self.examples.subset(index), tuple(self.record_ids[i] for i in index),
                     tuple(self.subject_hashes[i] for i in index))


@dataclass(frozen=True)
class Erasure:
    """One erasure request between updates: what to forget, and how the lineage erases it.

    ``erase(model) -> (model, evidence)`` runs the scenario's erasure (the method chain); the buffer is
    purged of ``record_ids`` / ``subject_hashes`` / ``classes``.
    """

    name: str
    erase: Callable[[nn.Module], tuple[nn.Module, dict]]
    record_ids: frozenset[str] = frozenset()
    subject_hashes: frozenset[str] = frozenset()
    classes: frozenset[int] = frozenset()
    # The service's update gate, check 3 (service.sealed.recheck_erasures): the erasure re-checked on the
    # lineage's model after every later update, ``model -> {"passed": bool, ...measurements}``; None: not re-checked.
    recheck: Callable[[nn.Module], dict] | None = None
    # Its escalation of a regression (service.updates._reerase): the erasure's approximate methods again on the
    # updated model, ``(model, retain data now) -> (the re-erased model, or None when no method passed the
    # gate; evidence)``.
    reerase: Callable[[nn.Module, Keyed], tuple[nn.Module | None, dict]] | None = None


@dataclass
class Stage:
    """Update u of a scenario, and the data state just before it."""

    update: Keyed
    retain: Keyed  # the lineage's training data before the update (after every erasure so far)
    tune: ExampleSet  # what strategies may select on (never an evaluation set)
    new_classes: tuple[int, ...] = ()
    erasures_before: tuple[Erasure, ...] = ()
    erased_subject_hashes: frozenset[str] = frozenset()
    erased_record_ids: frozenset[str] = frozenset()
    erased_classes: frozenset[int] = frozenset()


@dataclass
class Scenario:
    name: str
    seed: int
    task: TaskAdapter
    base_model: nn.Module
    base_train: Keyed  # what the base model was trained on (fills the replay buffer at the start)
    stages: list[Stage]
    eval_sets: list[ExampleSet]  # task j's evaluation data (R's columns)
    recipe: TrainRecipe
    model_factory: Callable[[int], nn.Module]
    update_epochs: int
    probe_every: int
    buffer_capacity: int
    splits: dict[str, str]  # which split each reported number comes from
    per_update: Callable[[str, int, nn.Module], dict] | None = None  # (strategy, u, model) -> extra metrics
    # When an earlier erasure is erased again after an update (keep_erased): "on-regression" (the service's
    # update job on classifiers) or "after-every-update" (the service's default on causal LMs, the policy's
    # reerase_after_update: each update ends with the erasure's approximate method run again, which stops at
    # once when its own stop rule already holds on the tune people).
    reerase: str = "on-regression"
    device: torch.device = torch.device("cpu")
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class LineageRun:
    strategy: str
    r_matrix: list[list[float]]
    traces: list[UpdateTrace]
    update_seconds: list[float]
    per_update: list[dict]
    details: list[dict]
    erasures: list[dict]
    before_rows: list[list[float]] = field(default_factory=list)  # every task's accuracy just before update u
    rechecks: list[list[dict]] = field(default_factory=list)  # per update: each earlier erasure re-checked
    final_model: nn.Module | None = None

    def metrics(self) -> dict:
        result = summary(self.r_matrix, self.traces if self.traces else None)
        result.update(seconds=sum(self.update_seconds), update_seconds=self.update_seconds)
        return result


def warm_up(task: TaskAdapter, model: nn.Module, examples: ExampleSet, batch_size: int) -> None:
    """Pay torch's lazy one-off costs (autograd engine, optimiser modules, kernels) before any timing."""
    work = copy.deepcopy(model).train()
    for optimizer in (torch.optim.Adam(work.parameters(), lr=0.0), torch.optim.AdamW(work.parameters(), lr=0.0),
                      torch.optim.SGD(work.parameters(), lr=0.0)):
        for batch in examples.subset(list(range(min(len(examples), 2 * batch_size)))).batches(batch_size):
            batch = {k: v.to(next(work.parameters()).device) for k, v in batch.items()}
            optimizer.zero_grad(set_to_none=True)
            task.batch_loss(work, batch).backward()
            optimizer.step()


def initial_buffer(scenario: Scenario) -> ReplayBuffer:
    """The lineage's buffer at the start: a reservoir over the base model's training data, with its logits."""
    buffer = ReplayBuffer(scenario.buffer_capacity, seed=scenario.seed)
    logits, _ = collect(scenario.task, scenario.base_model, scenario.base_train.examples)
    buffer.offer(scenario.base_train.examples, logits, scenario.base_train.record_ids,
                 scenario.base_train.subject_hashes)
    return buffer


def evaluate_row(scenario: Scenario, model: nn.Module) -> list[float]:
    return [accuracy(scenario.task, model, examples) for examples in scenario.eval_sets]


def run_lineage(scenario: Scenario, strategy: str, params: dict | None) -> LineageRun:
    """One strategy through every update of ``scenario`` (module docstring)."""
    spec = registry.get(strategy)
    registry.parse_config(strategy, params, scenario.task)  # fail before any work on bad parameters
    model = copy.deepcopy(scenario.base_model)
    buffer = initial_buffer(scenario) if spec.stores == "buffer" else None
    state = None
    run = LineageRun(strategy, [evaluate_row(scenario, model)], [], [], [], [], [])
    done: list[Erasure] = []  # the erasures this lineage made (approximately or not), re-checked after updates
    for u, stage in enumerate(scenario.stages, start=1):
        for erasure in stage.erasures_before:
            if strategy != "joint":  # joint retrains on the purged retain data anyway
                model, evidence = erasure.erase(model)
                run.erasures.append({"before_update": u, "request": erasure.name, **evidence})
                done.append(erasure)
            if buffer is not None:
                buffer.purge(erasure.record_ids, erasure.subject_hashes, erasure.classes)
        run.before_rows.append(evaluate_row(scenario, model))  # after any erasure: where the update starts
        probe = OldTaskProbe(scenario.task, {j: scenario.eval_sets[j] for j in range(u)}, scenario.probe_every)
        before = probe.measure(model, 0)
        probe.seconds = 0.0
        request = registry.UpdateRequest(
            task=scenario.task, update=stage.update.examples, update_record_ids=stage.update.record_ids,
            update_subject_hashes=stage.update.subject_hashes, recipe=scenario.recipe,
            update_epochs=scenario.update_epochs, retain=stage.retain.examples, tune=stage.tune, buffer=buffer,
            state=state, model_factory=scenario.model_factory, new_classes=stage.new_classes,
            erased_subject_hashes=stage.erased_subject_hashes, erased_record_ids=stage.erased_record_ids,
            erased_classes=stage.erased_classes, seed=scenario.seed + 1000 * u,
            monitor=None if spec.exact else probe)
        started = time.perf_counter()
        result = registry.run(strategy, model, request, params)
        seconds = time.perf_counter() - started - probe.seconds
        model, buffer, state = result.model, result.buffer, result.state
        if not spec.exact:  # the end of the update counts as "during" too (it is where training stopped)
            run.traces.append(UpdateTrace(u, before, probe.records + [probe.measure(model, -1)]))
        model, rechecks, reerase_seconds = keep_erased(done, model, stage.retain.join(stage.update),
                                                       always=scenario.reerase == "after-every-update")
        run.update_seconds.append(seconds + reerase_seconds)  # the update job pays its re-erasures
        run.rechecks.append(rechecks)
        run.r_matrix.append(evaluate_row(scenario, model))
        run.per_update.append(scenario.per_update(strategy, u, model) if scenario.per_update else {})
        run.details.append(_evidence(result.details))
    run.final_model = model
    return run


REERASE_POLICIES = ("on-regression", "after-every-update")


def keep_erased(erasures: list[Erasure], model: nn.Module, retain: Keyed,
                always: bool = False) -> tuple[nn.Module, list[dict], float]:
    """Erased stays erased, as the service's update job does it: each erasure in ``erasures`` that has a
    ``recheck`` is checked on ``model`` (the update's result); one that regressed (or every one, when
    ``always``) is erased again with its ``reerase`` (the model it returns replaces ``model``; when no method
    passes, ``model`` stays and the record says so, where the service would refuse the update). Returns the
    model, one record per re-checked erasure, and the seconds the re-erasures took (the update job pays them;
    the checks are the gate's).

    Differences from the service: each regressed erasure is erased again on its own (the service runs one
    chain over every regressed set together), and a failed re-erasure keeps the updated model so the lineage
    can go on (the service registers nothing)."""
    records, seconds = [], 0.0
    for erasure in erasures:
        if erasure.recheck is None:
            continue
        check = erasure.recheck(model)
        record: dict[str, Any] = {"request": erasure.name, "recheck": check, "reerased": False}
        if (always or not check["passed"]) and erasure.reerase is not None:
            started = time.perf_counter()
            erased, evidence = erasure.reerase(model, retain)
            took = time.perf_counter() - started
            seconds += took
            record.update(reerase={**evidence, "passed": erased is not None, "seconds": took})
            if erased is not None:
                model = erased
                record.update(reerased=True, recheck_after=erasure.recheck(model))
        records.append(record)
    return model, records, seconds


def _evidence(details: dict) -> dict:
    """The strategy's details without the long lists (frozen parameter names, WiSE-FT trials)."""
    kept = {k: v for k, v in details.items() if k not in ("frozen_parameters",)}
    if "wise_ft" in kept:
        kept["wise_ft"] = {k: v for k, v in kept["wise_ft"].items() if k != "trials"}
    return kept


def machine() -> str:
    import os

    threads = torch.get_num_threads()
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other work), torch {torch.__version__}, "
            f"{threads} torch thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def compare(scenario: Scenario, strategy: str, params: dict | None,
            finish: Callable[[dict, dict[str, LineageRun]], dict] | None = None) -> dict:
    """``joint``, ``finetune`` and ``strategy`` through the scenario in this process; the benchmark's JSON.

    ``finish(result, runs)`` adds the scenario's own keys and its targets."""
    warm_up(scenario.task, scenario.base_model, scenario.stages[0].update.examples, scenario.recipe.batch_size)
    runs: dict[str, LineageRun] = {}
    for name in ("joint", "finetune", strategy):
        if name not in runs:
            runs[name] = run_lineage(scenario, name, params if name == strategy else None)
    ours, joint, finetune = runs[strategy].metrics(), runs["joint"].metrics(), runs["finetune"].metrics()
    result = {
        "scenario": scenario.name, "strategy": strategy, "seed": scenario.seed, "params": params or {},
        **{key: ours[key] for key in ("r_matrix", "acc", "bwt", "forgetting", "min_acc", "wc_acc", "stability_gap",
                                      "stability_gaps", "seconds", "update_seconds")},
        "joint_acc": joint["acc"], "joint_seconds": joint["seconds"], "finetune_acc": finetune["acc"],
        "cost_vs_joint": ours["seconds"] / joint["seconds"],
        "finetune": finetune, "joint": joint,
        "per_update": runs[strategy].per_update, "details": runs[strategy].details,
        "erasures": runs[strategy].erasures, "before_update_rows": runs[strategy].before_rows,
        "erasure_rechecks": runs[strategy].rechecks, "reerase_policy": scenario.reerase,
        "update_epochs": scenario.update_epochs, "probe_every_steps": scenario.probe_every,
        "buffer_capacity": scenario.buffer_capacity if registry.get(strategy).stores == "buffer" else None,
        "eval_sizes": [len(examples) for examples in scenario.eval_sets],
        "splits": scenario.splits, "definitions": DEFINITIONS, "machine": machine(), "device": str(scenario.device),
        **scenario.notes,
    }
    if finish is not None:
        result.update(finish(result, runs))
    return result
