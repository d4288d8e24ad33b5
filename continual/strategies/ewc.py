"""``ewc``: online Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017, arXiv 1612.00796; online
form: Schwarz et al., "Progress & Compress", ICML 2018).

    L = L_new + (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2

theta* is the model the update starts from (the lineage's current, post-erasure version; the request
offers no other). F is the online diagonal Fisher: F_t = gamma * F_{t-1} + F_new.

Where F comes from, deletion-aware (CONTINUAL.md: EWC stores a Fisher and an anchor, both derived from
training data):

- the Fisher is :func:`unlearn.importance.estimate_importance` (variant ``fisher``), the same code SSD
  uses, never a second implementation: the mean over mini-batches of the squared gradient of the batch-mean
  loss, in eval mode. With ``fisher_batch_size = 1`` (the default) those are per-sample squares, i.e. the
  empirical Fisher, on the scale the reference lambda was tuned for; larger batches square batch means and
  give smaller values (state the batch size with any lambda);
- at the end of an update, F_t = gamma * F_used + F(update data at the new weights) is returned as
  ``UpdateResult.state``, bound to the new weights' digest (:class:`~continual.state.StrategyState`);
- the next update uses that state only if it starts from exactly those weights. After an erasure (or any
  other job) the digest differs, so F is recomputed on the current retain data at the current version,
  which covers every earlier task's remaining data in one pass (``details["fisher_source"]`` says which).

Mutates in place: no (works on a copy).

Differences from the paper: the Fisher is the empirical one (squared gradients of the labelled loss), not
the expectation over the model's predictive distribution; after an erasure, the sum over earlier tasks is
one Fisher over their remaining data at the current weights (gamma then applies from the next update on).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from continual.registry import CAUSAL_LM, CLASSIFICATION, UpdateRequest, UpdateResult, register
from continual.state import StrategyState
from continual.training import (
    copy_for_update,
    decaying_schedule,
    make_update_optimizer,
    model_device,
    seeded,
    update_batches,
    update_plan,
)
from unlearn.config import require
from unlearn.errors import InvalidDataError
from unlearn.importance import Importance, estimate_importance

STRATEGY = "ewc"


@dataclass(frozen=True)
class EWCConfig:
    """Hyper-parameters of online EWC (arXiv 1612.00796; Schwarz et al. 2018).

    lam: penalty strength, paper symbol lambda. Reference default 10 (Mammoth ``ewc_on``).
    gamma: decay of the running Fisher, paper symbol gamma (online EWC). Reference default 1.
    fisher_batch_size: mini-batch size of the Fisher estimate (1 = per-sample squares, the empirical Fisher:
        default). Not a paper hyper-parameter.
    epochs: passes over the update; 0 (default) = the request's ``update_epochs``.
    lr_scale: multiplies the original recipe's learning rate (default 1).
    """

    lam: float = 10.0
    gamma: float = 1.0
    fisher_batch_size: int = 1
    epochs: int = 0
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        require(0 <= self.lam <= 1e9, "lam", f"must be in [0, 1e9], got {self.lam}")
        require(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1], got {self.gamma}")
        require(1 <= self.fisher_batch_size <= 65536, "fisher_batch_size",
                f"must be in [1, 65536], got {self.fisher_batch_size}")
        require(0 <= self.epochs <= 10_000, "epochs", f"must be in [0, 10000] (0 = the request's), got {self.epochs}")
        require(0 < self.lr_scale <= 100, "lr_scale", f"must be in (0, 100], got {self.lr_scale}")


def ewc_penalty(model: nn.Module, anchor: dict[str, Tensor], fisher: Importance, lam: float) -> Tensor:
    """(lambda / 2) * sum_i F_i (theta_i - theta*_i)^2 over the parameters ``fisher`` covers."""
    total = None
    for name, parameter in model.named_parameters():
        if name in fisher:
            term = (fisher[name] * (parameter - anchor[name]).pow(2)).sum()
            total = term if total is None else total + term
    if total is None:
        raise InvalidDataError("state", "the Fisher covers none of the model's parameters")
    return 0.5 * lam * total


def current_fisher(model: nn.Module, request: UpdateRequest, batch_size: int) -> tuple[Importance, str]:
    """F_{t-1} for this update: the carried state if it belongs to ``model``'s weights, else a fresh
    Fisher over the retain data at ``model`` (the current version)."""
    device = model_device(model)
    state = request.state
    if state is not None and state.belongs_to(STRATEGY, model):
        return {name: tensor.to(device) for name, tensor in state.tensors.items()}, "carried"
    if request.retain is None or len(request.retain) == 0:
        reason = "no carried state" if state is None else "the carried state belongs to other weights"
        raise InvalidDataError("retain", f"ewc needs the retain data to compute the Fisher at the current version "
                               f"({reason})")
    source = "recomputed (no carried state)" if state is None else "recomputed (carried state belongs to other weights)"
    return estimate_importance(request.task, model, request.retain, batch_size, "fisher"), source


@register("ewc", EWCConfig, tasks=(CLASSIFICATION, CAUSAL_LM), stores="state")
def ewc(model: nn.Module, request: UpdateRequest, config: EWCConfig) -> UpdateResult:
    """Online EWC: a quadratic penalty anchored at the current version, weighted by the running Fisher."""
    task, device = request.task, model_device(model)
    plan = update_plan(request, config.epochs, config.lr_scale)
    work = copy_for_update(model)
    fisher, source = current_fisher(work, request, config.fisher_batch_size)  # before any change: at theta*
    anchor = {name: parameter.detach().clone() for name, parameter in work.named_parameters()}
    optimizer = make_update_optimizer(request, work.parameters(), plan.lr)
    schedule = decaying_schedule(optimizer, plan.steps)
    shuffle = torch.Generator().manual_seed(request.seed)
    step, penalty_total = 0, 0.0
    work.train()
    with seeded(request.seed + 2, device):
        for epoch in range(plan.epochs):
            for _, batch in update_batches(request.update, plan.batch_size, shuffle, device):
                penalty = ewc_penalty(work, anchor, fisher, config.lam)
                loss = task.batch_loss(work, batch) + penalty
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                penalty_total += float(penalty.detach())
                request.after_step(work, step)
            request.report((epoch + 1) / plan.epochs, f"epoch {epoch + 1}/{plan.epochs}")
    work.eval()
    fisher_new = estimate_importance(task, work, request.update, config.fisher_batch_size, "fisher")
    running = {name: config.gamma * fisher[name] + fisher_new[name] for name in fisher}  # F_t = gamma F_{t-1} + F_new
    state = StrategyState.bound_to(STRATEGY, work, running)
    return UpdateResult(work, state=state, details={
        "strategy": "ewc", "seed": request.seed, "epochs": plan.epochs, "steps": step, "lr": plan.lr,
        "lam": config.lam, "gamma": config.gamma, "fisher_batch_size": config.fisher_batch_size,
        "fisher_source": source, "mean_penalty": penalty_total / max(step, 1),
        "fisher_mean": float(torch.cat([f.flatten() for f in running.values()]).mean())})
