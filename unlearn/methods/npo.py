"""``npo``: Negative Preference Optimization (Zhang, Lin, Bai, Mei, 2024, arXiv 2404.05868).

Objective (minimised), on forget mini-batches only, against the frozen original model pi_ref:

    L(theta) = -(2 / beta) * E_Df[ log sigmoid( -beta * (log pi_theta(y|x) - log pi_ref(y|x)) ) ]
             =  (2 / beta) * E_Df[ softplus( beta * (nll_ref - nll_theta) ) ]

with ``nll = -log pi(y|x)`` from ``task.per_example_loss``: the label's cross-entropy for classifiers, the
NLL summed over the answer tokens for causal LMs (sequence-summed log-probabilities, as the paper uses).
Its gradient is ``2 * sigmoid(beta * (nll_ref - nll_theta))`` times gradient ascent's: NPO starts as GA
and slows down on examples already pushed far from the reference, which is what keeps it from collapsing.

The reference NLLs depend only on the forget examples and the original weights, so they are computed once,
before the first update, in eval mode and without gradients; that is the frozen copy of the paper
without keeping a second model in memory.

Loop (one straight function below) as :mod:`unlearn.methods.ga`: stopped at the forgetting target of
:mod:`unlearn.forget_target` or after ``max_steps`` steps; gradients in eval mode.

Cost: one forward pass over Df for the reference, then one forward/backward pass over a forget mini-batch
per step, plus the check (a forward pass over Df per step).

Mutates in place: no (works on a copy; the caller's model is unchanged).

Differences from the paper: the classifier form uses log p(y|x) of the label; stopped at the forgetting
target by default rather than after a fixed number of epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn.data import Batch, ExampleSet
from unlearn.forget_target import DEFAULT_STOP_AUC_MARGIN, DEFAULT_STOP_MIN_P, ForgetTarget, run_outcome
from unlearn.gradients import batch_stream, make_unlearning_optimizer, trainable_parameters
from unlearn.registry import UnlearnRequest, UnlearnResult, copy_model, model_device, register, require
from unlearn.tasks import TaskAdapter, eval_mode

REFERENCE_NLL = "npo_reference_nll"  # the extra per-example field NPO adds to its forget set


@dataclass(frozen=True)
class NPOConfig:
    """Hyper-parameters of NPO (arXiv 2404.05868).

    beta: inverse temperature, paper symbol beta; paper default 0.1.
    lr: learning rate of the unlearning optimiser. Lethe default 3e-4 with Adam. On the digits benchmark's
        held-out sample 1e-4 kept about 0.4 points more accuracy on record erasure (the same on class
        erasure) but needed 2.5x the steps, and about 220 steps on a small MLP; 1e-3 damaged held-out
        accuracy by up to 4 points in two steps. (LLM work uses 1e-5 with AdamW.)
    optimizer: ``adam`` (torch defaults) or ``sgd`` (plain, no momentum).
    batch_size: forget mini-batch size. Lethe default 32.
    max_steps: upper bound on optimiser steps (mini-batches); the run usually stops earlier at the target
        (digits CNN class erasure: about 14 steps; a 64-32-10 MLP on 400 digits: about 65).
    stop_at_target: stop as soon as the forgetting target is reached (:mod:`unlearn.forget_target`).
    class_forget_target: class erasure is done when forget accuracy <= this (a retrained model scores 0).
    stop_min_p, stop_auc_margin: record erasure is done when the forget set's per-example losses are
        indistinguishable from the never-trained ``tune`` records' (KS p-value >= stop_min_p and loss-attack
        AUC <= 0.5 + stop_auc_margin); the run also stops, with ``target_reached=False``, when it went beyond
        (:mod:`unlearn.forget_target`).
    """

    beta: float = 0.1
    lr: float = 3e-4
    optimizer: Literal["adam", "sgd"] = "adam"
    batch_size: int = 32
    max_steps: int = 200
    stop_at_target: bool = True
    class_forget_target: float = 0.02
    stop_min_p: float = DEFAULT_STOP_MIN_P
    stop_auc_margin: float = DEFAULT_STOP_AUC_MARGIN

    def __post_init__(self) -> None:
        require(0 < self.beta <= 100, "beta", f"must be in (0, 100], got {self.beta}")
        require(0 < self.lr <= 1.0, "lr", f"must be in (0, 1], got {self.lr}")
        require(self.optimizer in ("adam", "sgd"), "optimizer", f"must be 'adam' or 'sgd', got {self.optimizer!r}")
        require(1 <= self.batch_size <= 65536, "batch_size", f"must be in [1, 65536], got {self.batch_size}")
        require(1 <= self.max_steps <= 10**6, "max_steps", f"must be in [1, 1e6], got {self.max_steps}")
        require(0 <= self.class_forget_target <= 1, "class_forget_target", "must be in [0, 1]")
        require(0 < self.stop_min_p < 1, "stop_min_p", "must be in (0, 1)")
        require(0 <= self.stop_auc_margin <= 0.5, "stop_auc_margin", "must be in [0, 0.5]")


def npo_loss_from_nll(nll: Tensor, reference_nll: Tensor, beta: float) -> Tensor:
    """NPO's loss ``(2/beta) * mean softplus(beta * (nll_ref - nll))`` (= the paper's -log sigmoid form)."""
    return (2.0 / beta) * F.softplus(beta * (reference_nll - nll)).mean()


def npo_loss(task: TaskAdapter, model: nn.Module, forget_batch: Batch, beta: float) -> Tensor:
    """NPO's loss on a forget mini-batch carrying the reference NLLs (see :func:`with_reference_nll`)."""
    return npo_loss_from_nll(task.per_example_loss(model, forget_batch), forget_batch[REFERENCE_NLL], beta)


@torch.no_grad()
def with_reference_nll(task: TaskAdapter, reference_model: nn.Module, forget: ExampleSet,
                       batch_size: int) -> ExampleSet:
    """``forget`` plus each example's NLL under the reference model (eval mode; the mode is restored)."""
    device = model_device(reference_model)
    with eval_mode(reference_model):
        nll = torch.cat([task.per_example_loss(reference_model, batch).detach().cpu()
                         for batch in forget.batches(batch_size, device)])
    return ExampleSet({**forget.tensors, REFERENCE_NLL: nll})


@register("npo", NPOConfig, needs_retain=False)
def npo(model: nn.Module, request: UnlearnRequest, config: NPOConfig) -> UnlearnResult:
    """Negative Preference Optimization on the forget set against the frozen original model."""
    task, forget = request.task, request.forget
    work = copy_model(model)
    work.eval()  # gradients with frozen normalisation statistics, no dropout
    target = (ForgetTarget(task, request.tune, request.forget_classes, config.class_forget_target,
                           config.stop_min_p, config.stop_auc_margin, "npo")
              if config.stop_at_target else None)
    forget_with_reference = with_reference_nll(task, work, forget, config.batch_size)  # before any update
    params = trainable_parameters(work)
    optimizer = make_unlearning_optimizer(config.optimizer, params, config.lr)
    forget_batches = batch_stream(forget_with_reference, config.batch_size, model_device(work),
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
        loss = npo_loss(task, work, next(forget_batches), config.beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        request.report(steps / max_steps, f"step {steps}: NPO loss {loss.item():.4f}")

    work.zero_grad(set_to_none=True)
    details = {"steps": steps, "epochs": steps / forget.num_batches(config.batch_size), "beta": config.beta,
               "lr": config.lr, "optimizer": config.optimizer}
    if check is not None:
        details.update(check.details())
    reached, message = run_outcome(check, steps, max_steps)
    return UnlearnResult(work, details=details, target_reached=reached, message=message)
