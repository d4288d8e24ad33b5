"""Honest timing for the benchmarks: warm-up first, the cost unit, and a retrain timed in this process.

Issue 9 ("costs are flattered"): a speed-up divides two times measured under the same conditions, or it
means nothing on a shared machine. So every harness run

1. pays torch's lazy one-off costs first (:func:`warm_up`: optimiser modules, the autograd engine, the
   model's own first forward/backward, which :func:`fwd_bwd_seconds` also measures as the cost unit);
2. retrains from scratch on Dr IN THIS PROCESS (:func:`timed_retrain`), after the warm-up, and divides
   by that time. No time read from a cache divides anything (a cached model's recorded training time was
   measured by another process under another load: 1.8 s to 72 s for the same digits recipe).

``retrain`` run as a method through the same harness then reads about 1.0x against it.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from unlearn.data import ExampleSet
from unlearn.tasks import TaskAdapter
from unlearn.training import TrainRecipe, train_from_scratch


def warm_up(device: torch.device) -> None:
    """Pay torch's lazy one-off costs (optimizer modules, autograd engine) before anything is timed."""
    parameter = torch.zeros(4, device=device, requires_grad=True)
    for optimizer in (torch.optim.Adam([parameter]), torch.optim.AdamW([parameter]), torch.optim.SGD([parameter], lr=0.1)):
        (parameter * 2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def fwd_bwd_seconds(task: TaskAdapter, model: nn.Module, examples: ExampleSet, batch_size: int,
                    repeats: int = 5) -> float:
    """Median wall time of one forward+backward pass over ``examples`` (the cost unit of a request).

    Run in the model's current mode; gradients are cleared afterwards.
    """
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in examples.batches(batch_size, next(model.parameters()).device):
            model.zero_grad(set_to_none=True)
            task.batch_loss(model, batch).backward()
        timings.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return statistics.median(timings)


def timed_retrain(task: TaskAdapter, factory, retain: ExampleSet, recipe: TrainRecipe,
                  device: torch.device) -> tuple[nn.Module, float]:
    """Retrain from scratch on ``retain`` with ``recipe`` now, in this process; the model and its seconds.

    Training is deterministic per recipe seed (:mod:`unlearn.training`), so this model IS the retrained
    reference: it is what a cache would have returned, and timing it costs nothing extra.
    """
    started = time.perf_counter()
    model = train_from_scratch(task, factory, retain, recipe, device)
    return model, time.perf_counter() - started
