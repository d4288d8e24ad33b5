"""``hft``: Half Fine-Tuning (Hui et al., 2024, arXiv 2404.18466).

At each update, freeze a randomly chosen half of the model's parameter matrices and fine-tune the other
half on the update (L = L_new). The frozen half keeps the current version's values exactly, which is where
the paper's reduced forgetting comes from; the backward pass skips the frozen matrices' weight gradients,
which is where its ~30% saving in training time comes from. Stores nothing.

Which half (the paper selects within each category of parameters, e.g. half of the attention and half of
the FFN matrices of every block):

- a *matrix* is a parameter with two or more dimensions (linear and convolution weights, embeddings);
- matrices are grouped by the module that contains their module (``transformer.h.0.attn`` holds
  ``c_attn.weight`` and ``c_proj.weight``; ``transformer.h.0.mlp`` holds ``c_fc`` and ``c_proj``; a
  CNN's ``features`` holds its convolutions): within each group, floor(n/2) matrices are frozen at random;
  the odd ones left over (one per group of odd size) are pooled and half of those frozen, so exactly
  floor(N/2) of the N matrices are frozen;
- a bias follows the weight of its module; other vectors (normalisation scales and shifts) keep training.

The draw uses ``random.Random(request.seed)``; the seed and the frozen names are in ``details`` (the job's
evidence).

Mutates in place: no (works on a copy; the freezing is on the copy, and the returned model has every
parameter trainable again).

Differences from the paper: the grouping rule above generalises the paper's per-block attention/FFN
categories to any architecture; the paper's LLaMA blocks have no biases.
"""

from __future__ import annotations

import random
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
from unlearn.errors import InvalidDataError
from unlearn.registry import trainable_flags


@dataclass(frozen=True)
class HFTConfig:
    """Hyper-parameters of HFT (arXiv 2404.18466).

    epochs: passes over the update; 0 (default) = the request's ``update_epochs``.
    lr_scale: multiplies the original recipe's learning rate (default 1).
    """

    epochs: int = 0
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        require(0 <= self.epochs <= 10_000, "epochs", f"must be in [0, 10000] (0 = the request's), got {self.epochs}")
        require(0 < self.lr_scale <= 100, "lr_scale", f"must be in (0, 100], got {self.lr_scale}")


def matrix_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter matrices (dim >= 2) by the module that contains their module, in ``named_parameters`` order."""
    groups: dict[str, list[str]] = {}
    for name, parameter in model.named_parameters():
        if parameter.dim() >= 2:
            parts = name.split(".")
            groups.setdefault(".".join(parts[:-2]), []).append(name)
    return groups


def choose_frozen_half(model: nn.Module, seed: int) -> list[str]:
    """The names of the matrices to freeze: floor(n/2) per group, then half of the odd leftovers. Only trainable
    matrices count: one the model was registered with frozen stays frozen anyway (``copy_for_update``)."""
    rng = random.Random(seed)
    frozen, leftovers = [], []
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    for members in matrix_groups(model).values():
        members = [name for name in members if name in trainable]
        order = rng.sample(members, len(members))
        half = len(members) // 2
        frozen.extend(order[:half])
        if len(members) % 2:
            leftovers.append(order[half])
    frozen.extend(rng.sample(leftovers, len(leftovers) // 2))
    return sorted(frozen)


def freeze(model: nn.Module, frozen_matrices: list[str]) -> list[str]:
    """Set ``requires_grad = False`` on the chosen matrices and their modules' biases; returns every frozen name."""
    chosen = set(frozen_matrices)
    frozen = []
    for name, parameter in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if name in chosen or (parameter.dim() < 2 and name.endswith(".bias") and f"{owner}.weight" in chosen):
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


@register("hft", HFTConfig, tasks=(CLASSIFICATION, CAUSAL_LM))
def hft(model: nn.Module, request: UpdateRequest, config: HFTConfig) -> UpdateResult:
    """Half fine-tuning: train a random half of the parameter matrices, freeze the other half."""
    task, device = request.task, model_device(model)
    plan = update_plan(request, config.epochs, config.lr_scale)
    work = copy_for_update(model)
    registered = trainable_flags(work)
    matrices = choose_frozen_half(work, request.seed)
    if not matrices:
        raise InvalidDataError("model", "hft needs at least two trainable parameter matrices to freeze half of them")
    frozen = freeze(work, matrices)
    trainable = [p for p in work.parameters() if p.requires_grad]
    optimizer = make_update_optimizer(request, trainable, plan.lr)
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
    for name, parameter in work.named_parameters():  # the flags as registered, not this update's half
        parameter.requires_grad_(registered[name])
    work.eval()
    total_matrices = sum(len(members) for members in matrix_groups(work).values())
    return UpdateResult(work, details={"strategy": "hft", "seed": request.seed, "epochs": plan.epochs, "steps": step,
                                       "lr": plan.lr, "frozen_matrices": matrices, "frozen_parameters": frozen,
                                       "matrices": total_matrices})
