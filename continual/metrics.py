"""Continual-learning metrics: the R matrix, ACC, BWT, forgetting, and the stability gap.

Definitions (CONTINUAL.md, METHODS.md "Continual learning metrics"; :data:`DEFINITIONS` carries them into
every benchmark output). Tasks are numbered 0..T: task 0 is the model's original data, task i the data of
update i; row i of R is measured after update i (row 0: before any update).

- ``R[i][j]``: accuracy on task j's evaluation data after update i.
- ``ACC = mean_{j=0..T} R[T][j]``.
- ``BWT = mean_{j<T} (R[T][j] - R[j][j])`` (backward transfer; negative = forgetting).
- ``forgetting = mean_{j<T} f_j``, ``f_j = max_{l<T} R[l][j] - R[T][j]`` (Chaudhry et al., ECCV 2018).
- Stability gap (De Lange et al., ICLR 2023, arXiv 2205.13452): old-task accuracy is measured every k steps
  DURING each update (:class:`OldTaskProbe`) and at its end.

  - ``min_acc``: for each old task j < T, the minimum accuracy measured during any later update
    (u > j: probes and end of update), averaged over j;
  - ``wc_acc = (1/K) R[T][T] + (1 - 1/K) min_acc`` with K = T + 1 tasks (worst-case accuracy);
  - ``stability_gap``: per update u, the accuracy on the pooled old tasks' data (0..u-1) just before the
    update minus the minimum pooled accuracy measured during it; the reported value is the worst (largest)
    over the updates, and ``stability_gaps`` lists every update's.

  A preempted or time-boxed job stops mid-update: the stability gap is what such an early stop would ship.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.tasks import TaskAdapter, eval_mode

DEFINITIONS = {
    "r_matrix": "R[i][j] = accuracy on task j's evaluation data after update i; row 0 = before any update, "
                "task 0 = the original data",
    "acc": "ACC = mean over j = 0..T of R[T][j]",
    "bwt": "BWT = mean over j < T of (R[T][j] - R[j][j])",
    "forgetting": "forgetting = mean over j < T of (max over l < T of R[l][j]) - R[T][j] (Chaudhry et al. 2018)",
    "min_acc": "min-ACC = mean over old tasks j < T of the minimum accuracy on task j measured during any later "
               "update (every k steps and at its end; De Lange et al. 2023)",
    "wc_acc": "WC-ACC = (1/K) R[T][T] + (1 - 1/K) min-ACC, K = T + 1 tasks",
    "stability_gap": "max over updates u of (accuracy on the pooled data of tasks 0..u-1 just before update u) "
                     "minus (the minimum of that accuracy measured during update u)",
}


def acc(r_matrix: list[list[float]]) -> float:
    return statistics.fmean(r_matrix[-1])


def bwt(r_matrix: list[list[float]]) -> float:
    last = len(r_matrix) - 1
    if last == 0:
        raise InvalidDataError("r_matrix", "BWT needs at least one update")
    return statistics.fmean(r_matrix[last][j] - r_matrix[j][j] for j in range(last))


def forgetting(r_matrix: list[list[float]]) -> float:
    last = len(r_matrix) - 1
    if last == 0:
        raise InvalidDataError("r_matrix", "forgetting needs at least one update")
    return statistics.fmean(max(r_matrix[l][j] for l in range(last)) - r_matrix[last][j] for j in range(last))


@dataclass
class ProbeRecord:
    step: int
    per_task: dict[int, float]
    pooled: float


@dataclass
class UpdateTrace:
    """Old-task accuracies of one update: before it, every k steps during it, and at its end."""

    update: int
    before: ProbeRecord
    during: list[ProbeRecord] = field(default_factory=list)

    def minimum_pooled(self) -> float:
        return min(record.pooled for record in self.during) if self.during else self.before.pooled

    def gap(self) -> float:
        return self.before.pooled - self.minimum_pooled()


class OldTaskProbe:
    """A :class:`continual.registry.StepMonitor`: every ``every_steps`` steps, the accuracy of the model being
    trained on each old task's evaluation data, and on their pooled data.

    The seconds it spends are counted in ``seconds`` so a benchmark can leave them out of the update's time.
    Eval mode during the measurement; the model's mode and weights are left as they were.
    """

    def __init__(self, task: TaskAdapter, old_tasks: dict[int, ExampleSet], every_steps: int, batch_size: int = 512):
        if every_steps < 1:
            raise InvalidDataError("every_steps", f"must be >= 1, got {every_steps}")
        self.task = task
        self.old_tasks = old_tasks
        self.every_steps = every_steps
        self.batch_size = batch_size
        self.seconds = 0.0
        self.records: list[ProbeRecord] = []

    @torch.no_grad()
    def measure(self, model: nn.Module, step: int) -> ProbeRecord:
        started = time.perf_counter()
        device = next(iter(model.parameters())).device
        per_task, right, total = {}, 0, 0
        with eval_mode(model):
            for index, examples in self.old_tasks.items():
                hits = sum(int(self.task.correct(model, batch).sum())
                           for batch in examples.batches(self.batch_size, device))
                per_task[index] = hits / len(examples)
                right, total = right + hits, total + len(examples)
        self.seconds += time.perf_counter() - started
        return ProbeRecord(step, per_task, right / total)

    def __call__(self, model: nn.Module, step: int) -> None:
        self.records.append(self.measure(model, step))


def min_acc(r_matrix: list[list[float]], traces: list[UpdateTrace]) -> float:
    """Mean over old tasks j < T of the minimum accuracy measured during updates u > j (probes and ends)."""
    last = len(r_matrix) - 1
    minima = []
    for j in range(last):
        seen = [r_matrix[u][j] for u in range(j + 1, last + 1)]
        for trace in traces:
            if trace.update > j:
                seen.extend(record.per_task[j] for record in trace.during if j in record.per_task)
        minima.append(min(seen))
    return statistics.fmean(minima)


def wc_acc(r_matrix: list[list[float]], minimum: float) -> float:
    tasks = len(r_matrix)
    return r_matrix[-1][-1] / tasks + (1 - 1 / tasks) * minimum


def summary(r_matrix: list[list[float]], traces: list[UpdateTrace] | None) -> dict:
    """Every metric of the module docstring (stability metrics None without traces), with definitions."""
    result = {"r_matrix": r_matrix, "acc": acc(r_matrix), "bwt": bwt(r_matrix), "forgetting": forgetting(r_matrix),
              "min_acc": None, "wc_acc": None, "stability_gap": None, "stability_gaps": None}
    if traces:
        minimum = min_acc(r_matrix, traces)
        gaps = [trace.gap() for trace in traces]
        result.update(min_acc=minimum, wc_acc=wc_acc(r_matrix, minimum), stability_gap=max(gaps), stability_gaps=gaps)
    return result
