"""``retrain``: exact unlearning by retraining from scratch on Dr with the original recipe.

The gold standard every other method is measured against: a NEW initialisation from the model factory
(seeded by the recipe's seed policy), the same optimiser, learning rate, batch size and epochs, trained on
the retain set only. Its result is labelled exact.

Mutates in place: no (the caller's model is not even read, beyond its device).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from unlearn.registry import UnlearnRequest, UnlearnResult, model_device, register, require
from unlearn.training import train_from_scratch


@dataclass(frozen=True)
class RetrainConfig:
    """seed_offset: added to the recipe's seed (0 = the original seed policy: same seed, new data)."""

    seed_offset: int = 0

    def __post_init__(self) -> None:
        require(0 <= self.seed_offset < 2**31, "seed_offset", "must be in [0, 2**31)")


@register("retrain", RetrainConfig, needs_retain=True, exact=True, needs_training=True)
def retrain(model: nn.Module, request: UnlearnRequest, config: RetrainConfig) -> UnlearnResult:
    """Retrain from scratch on the retain set (exact unlearning)."""
    retain = request.require_retain("retrain")
    factory, recipe = request.require_training("retrain")
    if config.seed_offset:
        from dataclasses import replace

        recipe = replace(recipe, seed=recipe.seed + config.seed_offset)
    fresh = train_from_scratch(request.task, factory, retain, recipe, model_device(model),
                               progress=lambda f, m: request.report(f, m))
    return UnlearnResult(fresh, details={"epochs": recipe.epochs, "seed": recipe.seed}, exact=True)
