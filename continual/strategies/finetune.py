"""``finetune``: naive fine-tuning on the update only, the lower bound every benchmark reports.

L = L_new(x, y) on the update's records (CONTINUAL.md, "Naive fine-tune"): what happens without any
anti-forgetting measure (catastrophic forgetting on class-incremental updates). Stores nothing.

Mutates in place: no (works on a copy; the caller's model is unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from continual.registry import CAUSAL_LM, CLASSIFICATION, UpdateRequest, UpdateResult, register
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


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of ``finetune`` (a baseline; no paper symbols).

    epochs: passes over the update; 0 (default) = the request's ``update_epochs``.
    lr_scale: multiplies the original recipe's learning rate (default 1).
    """

    epochs: int = 0
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        require(0 <= self.epochs <= 10_000, "epochs", f"must be in [0, 10000] (0 = the request's), got {self.epochs}")
        require(0 < self.lr_scale <= 100, "lr_scale", f"must be in (0, 100], got {self.lr_scale}")


@register("finetune", FinetuneConfig, tasks=(CLASSIFICATION, CAUSAL_LM))
def finetune(model: nn.Module, request: UpdateRequest, config: FinetuneConfig) -> UpdateResult:
    """Fine-tune on the update only (lower bound)."""
    task, device = request.task, model_device(model)
    plan = update_plan(request, config.epochs, config.lr_scale)
    work = copy_for_update(model)
    optimizer = make_update_optimizer(request, work.parameters(), plan.lr)
    schedule = decaying_schedule(optimizer, plan.steps)
    shuffle = torch.Generator().manual_seed(request.seed)
    step = 0
    work.train()
    with seeded(request.seed + 2, device):
        for epoch in range(plan.epochs):
            for _, batch in update_batches(request.update, plan.batch_size, shuffle, device):
                loss = task.batch_loss(work, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                request.after_step(work, step)
            request.report((epoch + 1) / plan.epochs, f"epoch {epoch + 1}/{plan.epochs}")
    work.eval()
    return UpdateResult(work, details={"strategy": "finetune", "seed": request.seed, "epochs": plan.epochs,
                                       "steps": step, "lr": plan.lr, "batch_size": plan.batch_size})
