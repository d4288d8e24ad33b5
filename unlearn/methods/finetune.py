"""``finetune``: continue training the original model on Dr only (a baseline, catastrophic forgetting).

Uses the original recipe's optimiser, learning rate and batch size for ``epochs`` passes over the retain
set (METHODS.md, Baselines). Mutates in place: no (works on a copy).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from unlearn.registry import UnlearnRequest, UnlearnResult, copy_model, register, require
from unlearn.training import train


@dataclass(frozen=True)
class FinetuneConfig:
    """epochs: passes over the retain set. lr_scale: multiplies the recipe's learning rate."""

    epochs: int = 5
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        require(1 <= self.epochs <= 1000, "epochs", "must be in [1, 1000]")
        require(0 < self.lr_scale <= 100, "lr_scale", "must be in (0, 100]")


@register("finetune", FinetuneConfig, needs_retain=True)
def finetune(model: nn.Module, request: UnlearnRequest, config: FinetuneConfig) -> UnlearnResult:
    """Fine-tune on the retain set only."""
    retain = request.require_retain("finetune")
    recipe = request.require_recipe("finetune")
    recipe = replace(recipe, lr=recipe.lr * config.lr_scale, seed=recipe.seed + request.seed)
    work = copy_model(model)
    train(request.task, work, retain, recipe, epochs=config.epochs, progress=lambda f, m: request.report(f, m))
    return UnlearnResult(work, details={"epochs": config.epochs, "lr": recipe.lr})
