"""``ga``: Gradient Ascent on the forget set, the simplest unlearning baseline (METHODS.md, Baselines).

Objective (minimised): ``L(theta) = -E_Df[l]``, with ``l`` the task's training objective on a forget
mini-batch (``task.batch_loss``: mean cross-entropy for classifiers, mean answer-token NLL for causal
LMs). Descending L raises the forget loss.

Loop (one straight function below): shuffled forget mini-batches, forward, loss, backward, optimiser step;
before every step the forgetting target of :mod:`unlearn.forget_target` is checked and the run stops as
soon as it is reached, or after ``max_steps`` steps. Gradients are taken in eval mode
(normalisation layers use their running statistics, no dropout), so forget-only batches never overwrite
the running statistics the retained data depend on.

Cost: one forward/backward pass over a forget mini-batch per step, plus the check (a forward pass over
Df per step; one over the held-out sample at the start, for record erasure).

Mutates in place: no (works on a copy; the caller's model is unchanged).

Differences from the paper: GA is usually run for a fixed number of epochs; Lethe stops at the forgetting
target by default (``stop_at_target=false`` restores a fixed schedule of ``max_steps`` steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from unlearn.data import Batch
from unlearn.forget_target import DEFAULT_STOP_AUC_MARGIN, DEFAULT_STOP_MIN_P, ForgetTarget, run_outcome
from unlearn.gradients import batch_stream, make_unlearning_optimizer, trainable_parameters
from unlearn.registry import UnlearnRequest, UnlearnResult, copy_model, model_device, register, require
from unlearn.tasks import TaskAdapter


@dataclass(frozen=True)
class GAConfig:
    """Hyper-parameters of gradient ascent (a baseline without a single source paper; METHODS.md).

    lr: learning rate of the unlearning optimiser. Lethe default 3e-4 with Adam. On the digits benchmark's
        held-out sample 1e-4 kept about 0.4 points more accuracy on record erasure (the same on class
        erasure) but needed 2.5x the steps, and about 220 steps on a small MLP; 1e-3 damaged held-out
        accuracy by up to 4 points in two steps. (LLM work uses 1e-5 with AdamW.)
    optimizer: ``adam`` (torch defaults) or ``sgd`` (plain, no momentum).
    batch_size: forget mini-batch size. Lethe default 32 (the digits training batch size).
    max_steps: upper bound on optimiser steps (mini-batches); the run usually stops earlier at the target
        (digits CNN class erasure: about 14 steps; a 64-32-10 MLP on 400 digits: about 65).
    stop_at_target: stop as soon as the forgetting target is reached (:mod:`unlearn.forget_target`).
    class_forget_target: class erasure is done when forget accuracy <= this (a retrained model scores 0).
    stop_min_p, stop_auc_margin: record erasure is done when the forget set's per-example losses are
        indistinguishable from the never-trained ``tune`` records' (KS p-value >= stop_min_p and loss-attack
        AUC <= 0.5 + stop_auc_margin); the run also stops, with ``target_reached=False``, when it went beyond
        (:mod:`unlearn.forget_target`).
    """

    lr: float = 3e-4
    optimizer: Literal["adam", "sgd"] = "adam"
    batch_size: int = 32
    max_steps: int = 200
    stop_at_target: bool = True
    class_forget_target: float = 0.02
    stop_min_p: float = DEFAULT_STOP_MIN_P
    stop_auc_margin: float = DEFAULT_STOP_AUC_MARGIN

    def __post_init__(self) -> None:
        require(0 < self.lr <= 1.0, "lr", f"must be in (0, 1], got {self.lr}")
        require(self.optimizer in ("adam", "sgd"), "optimizer", f"must be 'adam' or 'sgd', got {self.optimizer!r}")
        require(1 <= self.batch_size <= 65536, "batch_size", f"must be in [1, 65536], got {self.batch_size}")
        require(1 <= self.max_steps <= 10**6, "max_steps", f"must be in [1, 1e6], got {self.max_steps}")
        require(0 <= self.class_forget_target <= 1, "class_forget_target", "must be in [0, 1]")
        require(0 < self.stop_min_p < 1, "stop_min_p", "must be in (0, 1)")
        require(0 <= self.stop_auc_margin <= 0.5, "stop_auc_margin", "must be in [0, 0.5]")


def ga_loss(task: TaskAdapter, model: nn.Module, forget_batch: Batch) -> Tensor:
    """``-E_Df[l]`` on one forget mini-batch (descending it is gradient ascent on the forget loss)."""
    return -task.batch_loss(model, forget_batch)


@register("ga", GAConfig, needs_retain=False)
def ga(model: nn.Module, request: UnlearnRequest, config: GAConfig) -> UnlearnResult:
    """Gradient ascent on the forget set, stopped at the forgetting target."""
    task, forget = request.task, request.forget
    work = copy_model(model)
    work.eval()  # gradients with frozen normalisation statistics, no dropout
    target = (ForgetTarget(task, request.tune, request.forget_classes, config.class_forget_target,
                           config.stop_min_p, config.stop_auc_margin, "ga")
              if config.stop_at_target else None)
    params = trainable_parameters(work)
    optimizer = make_unlearning_optimizer(config.optimizer, params, config.lr)
    forget_batches = batch_stream(forget, config.batch_size, model_device(work),
                                  torch.Generator().manual_seed(request.seed))
    max_steps = config.max_steps

    steps, check = 0, None
    while True:
        if config.stop_at_target:
            check = target.check(work, forget)
            if target.done(check):
                break
        if steps >= max_steps:
            break
        loss = ga_loss(task, work, next(forget_batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        request.report(steps / max_steps, f"step {steps}: forget loss {-loss.item():.4f}")

    work.zero_grad(set_to_none=True)
    details = {"steps": steps, "epochs": steps / forget.num_batches(config.batch_size), "lr": config.lr,
               "optimizer": config.optimizer}
    if check is not None:
        details.update(check.details())
    reached, message = run_outcome(check, steps, max_steps)
    return UnlearnResult(work, details=details, target_reached=reached, message=message)
