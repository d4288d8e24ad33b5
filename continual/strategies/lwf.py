"""``lwf``: Learning without Forgetting, knowledge distillation from the current version (Li & Hoiem,
ECCV 2016, arXiv 1606.09282).

    L = L_new(x, y) + alpha * T^2 * KL(softmax(f*(x) / T) || softmax(f(x) / T))

on the update's inputs x, with f* the frozen teacher. The teacher is ALWAYS the model the update starts
from, i.e. the lineage's current (post-erasure) version: the request has no other model to offer.
Needs no stored data (CONTINUAL.md).

What is distilled: for classifiers, the logits of the classes the teacher knows; ``request.new_classes``
(classes this update introduces) are left out, since the teacher never learned them and its near-zero
probability for them would fight the new labels (the class-incremental reading of LwF, as Mammoth's
``lwf``). For causal LMs, the next-token distributions at the prompt positions (real tokens that do not
predict an answer token): the teacher knows the language of the questions but not the new answers.

Mutates in place: no (works on a copy; the teacher is another copy).

Differences from the paper: the paper adds a new head per task and distils the old heads' outputs; here
the head is shared (single-head class-incremental or domain-incremental updates), so the distillation is
restricted to the teacher's classes (classifiers) or positions (causal LMs) as described above. No
warm-up stage training the new head alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from continual.losses import distill_loss, keep_columns, output_rows
from continual.registry import CAUSAL_LM, CLASSIFICATION, UpdateRequest, UpdateResult, register
from continual.training import (
    copy_for_update,
    decaying_schedule,
    frozen_copy,
    make_update_optimizer,
    model_device,
    seeded,
    task_loss,
    update_batches,
    update_plan,
)
from unlearn.config import require


@dataclass(frozen=True)
class LwFConfig:
    """Hyper-parameters of LwF (arXiv 1606.09282, Sec. 3).

    alpha: weight of the distillation term, paper symbol lambda_o. Default 0.5 (CONTINUAL.md; the paper
        uses 1 with a separate head per task).
    temperature: distillation temperature T (paper: T = 2, after Hinton et al.). Default 2.
    epochs: passes over the update; 0 (default) = the request's ``update_epochs``.
    lr_scale: multiplies the original recipe's learning rate (default 1).
    """

    alpha: float = 0.5
    temperature: float = 2.0
    epochs: int = 0
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        require(0 <= self.alpha <= 1000, "alpha", f"must be in [0, 1000], got {self.alpha}")
        require(0.05 <= self.temperature <= 100, "temperature", f"must be in [0.05, 100], got {self.temperature}")
        require(0 <= self.epochs <= 10_000, "epochs", f"must be in [0, 10000] (0 = the request's), got {self.epochs}")
        require(0 < self.lr_scale <= 100, "lr_scale", f"must be in (0, 100], got {self.lr_scale}")


def lwf_loss(new_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, alpha: float,
             temperature: float) -> torch.Tensor:
    """L_new + alpha * T^2 * KL(teacher || student) on already selected rows (the maths the tests pin)."""
    return new_loss + alpha * distill_loss(student, teacher, temperature)


@register("lwf", LwFConfig, tasks=(CLASSIFICATION, CAUSAL_LM))
def lwf(model: nn.Module, request: UpdateRequest, config: LwFConfig) -> UpdateResult:
    """Learning without Forgetting: distil the current version's outputs on the update's inputs."""
    task, device = request.task, model_device(model)
    plan = update_plan(request, config.epochs, config.lr_scale)
    teacher = frozen_copy(model)  # the current version: the only model the request can offer
    work = copy_for_update(model)
    optimizer = make_update_optimizer(request, work.parameters(), plan.lr)
    schedule = decaying_schedule(optimizer, plan.steps)
    shuffle = torch.Generator().manual_seed(request.seed)
    excluded = tuple(sorted(set(request.new_classes)))
    step, distill_total = 0, 0.0
    work.train()
    with seeded(request.seed + 2, device):
        for epoch in range(plan.epochs):
            for _, batch in update_batches(request.update, plan.batch_size, shuffle, device):
                outputs = task.outputs(work, batch)
                with torch.no_grad():
                    teacher_outputs = task.outputs(teacher, batch)
                student_rows = keep_columns(output_rows(outputs, batch, "context"), excluded)
                teacher_rows = keep_columns(output_rows(teacher_outputs, batch, "context"), excluded)
                new_loss = task_loss(task, outputs, batch)
                loss = lwf_loss(new_loss, student_rows, teacher_rows, config.alpha, config.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                distill_total += float((loss - new_loss).detach())
                request.after_step(work, step)
            request.report((epoch + 1) / plan.epochs, f"epoch {epoch + 1}/{plan.epochs}")
    work.eval()
    return UpdateResult(work, details={"strategy": "lwf", "seed": request.seed, "epochs": plan.epochs, "steps": step,
                                       "lr": plan.lr, "alpha": config.alpha, "temperature": config.temperature,
                                       "distilled_classes_excluded": list(excluded),
                                       "mean_distill_term": distill_total / max(step, 1)})
