"""``simnpo``: Simple Negative Preference Optimization (Fan et al., 2024, arXiv 2410.07163).

NPO without the reference model: the reward is the length-normalised log-likelihood, with a margin.
Objective (minimised), on forget mini-batches only (METHODS.md, Baselines):

    L(theta) = -(2 / beta) * E_Df[ log sigmoid( beta * l_theta(y|x) / |y| - delta ) ]
             =  (2 / beta) * E_Df[ softplus( delta - beta * l_theta(y|x) / |y| ) ]

with ``l_theta = -log pi_theta(y|x)`` the NLL summed over the answer tokens (``task.per_example_loss``) and
``|y|`` the number of answer tokens (``task.target_lengths``). Its gradient is GA's on the length-normalised
NLL, weighted by ``2 * sigmoid(delta - beta * l/|y|)``: it fades as an answer's per-token NLL grows, and
long answers are not favoured over short ones (the paper's point against NPO's reference reward).

Loop (one straight function below) as :mod:`unlearn.methods.npo`: stopped at the forgetting target of
:mod:`unlearn.forget_target` or after ``max_steps`` steps; gradients in eval mode.

Cost: one forward/backward pass over a forget mini-batch per step, plus the check. No reference model.

Mutates in place: no (works on a copy; the caller's model is unchanged).

Differences from the paper: the paper's full objective adds a retain NLL term (weight lambda); this is its
forget-only form, as METHODS.md defines the baseline; stopped at the forgetting target by default rather
than after a fixed number of epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn.data import Batch
from unlearn.forget_target import DEFAULT_STOP_AUC_MARGIN, DEFAULT_STOP_MIN_P, ForgetTarget
from unlearn.gradients import (
    batch_stream,
    make_unlearning_optimizer,
    trainable_parameters,
)
from unlearn.registry import (
    UnlearnRequest,
    UnlearnResult,
    copy_model,
    model_device,
    register,
    require,
)


@dataclass(frozen=True)
class SimNPOConfig:
    """Hyper-parameters of SimNPO (arXiv 2410.07163).

    beta: inverse temperature, paper symbol beta; paper default 4.5 (TOFU).
    delta: reward margin, paper symbol gamma (delta in METHODS.md); paper default 0.
    lr: learning rate of the unlearning optimiser. Lethe default 1e-3 with Adam for the benchmark's tiny
        GPT (paper 1e-5 for 7B models).
    optimizer: ``adam`` (torch defaults) or ``sgd`` (plain, no momentum).
    batch_size: forget mini-batch size. Lethe default 16.
    max_steps: upper bound on optimiser steps; the run usually stops earlier at the target.
    stop_at_target: stop as soon as the forgetting target is reached (:mod:`unlearn.forget_target`).
    class_forget_target: class erasure is done when forget accuracy <= this.
    stop_min_p, stop_auc_margin: record erasure is done when the forget set's per-example losses are
        indistinguishable from the never-trained ``tune`` records' (KS p-value >= stop_min_p and loss-attack
        AUC <= 0.5 + stop_auc_margin); the run also stops, with ``target_reached=False``, when it went beyond
        (:mod:`unlearn.forget_target`).
    """

    beta: float = 4.5
    delta: float = 0.0
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    batch_size: int = 16
    max_steps: int = 200
    stop_at_target: bool = True
    class_forget_target: float = 0.02
    stop_min_p: float = DEFAULT_STOP_MIN_P
    stop_auc_margin: float = DEFAULT_STOP_AUC_MARGIN

    def __post_init__(self) -> None:
        require(0 < self.beta <= 100, "beta", f"must be in (0, 100], got {self.beta}")
        require(-100 <= self.delta <= 100, "delta", f"must be in [-100, 100], got {self.delta}")
        require(0 < self.lr <= 1.0, "lr", f"must be in (0, 1], got {self.lr}")
        require(self.optimizer in ("adam", "sgd"), "optimizer", f"must be 'adam' or 'sgd', got {self.optimizer!r}")
        require(1 <= self.batch_size <= 65536, "batch_size", f"must be in [1, 65536], got {self.batch_size}")
        require(1 <= self.max_steps <= 10**6, "max_steps", f"must be in [1, 1e6], got {self.max_steps}")
        require(0 <= self.class_forget_target <= 1, "class_forget_target", "must be in [0, 1]")
        require(0 < self.stop_min_p < 1, "stop_min_p", "must be in (0, 1)")
        require(0 <= self.stop_auc_margin <= 0.5, "stop_auc_margin", "must be in [0, 0.5]")


def simnpo_loss_from_nll(nll: Tensor, lengths: Tensor, beta: float, delta: float) -> Tensor:
    """SimNPO's loss ``(2/beta) * mean softplus(delta - beta * nll / |y|)`` (= the -log sigmoid form)."""
    return (2.0 / beta) * F.softplus(delta - beta * nll / lengths).mean()


def simnpo_loss(task, model: nn.Module, forget_batch: Batch, beta: float, delta: float) -> Tensor:
    return simnpo_loss_from_nll(task.per_example_loss(model, forget_batch), task.target_lengths(forget_batch),
                                beta, delta)


@register("simnpo", SimNPOConfig, needs_retain=False)
def simnpo(model: nn.Module, request: UnlearnRequest, config: SimNPOConfig) -> UnlearnResult:
    """SimNPO on the forget set: length-normalised NPO without a reference model."""
    task, forget = request.task, request.forget
    work = copy_model(model)
    work.eval()  # gradients with frozen normalisation statistics, no dropout
    target = (ForgetTarget(task, request.tune, request.forget_classes, config.class_forget_target,
                           config.stop_min_p, config.stop_auc_margin, "simnpo")
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
        loss = simnpo_loss(task, work, next(forget_batches), config.beta, config.delta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        request.report(steps / max_steps, f"step {steps}: SimNPO loss {loss.item():.4f}")

    work.zero_grad(set_to_none=True)
    details = {"steps": steps, "epochs": steps / forget.num_batches(config.batch_size), "beta": config.beta,
               "delta": config.delta, "lr": config.lr, "optimizer": config.optimizer}
    if check is not None:
        details.update(check.details())
    return UnlearnResult(work, details=details, target_reached=None if check is None else check.reached)
