"""``joint``: retrain from scratch on the current retain data plus the update, the exact upper bound.

CONTINUAL.md, "Joint retrain": a fresh initialisation ``model_factory(recipe.seed)`` trained with the model's
original recipe on ``retain`` + ``update``. The retain data is the lineage's data AFTER every erasure, so
the result never saw an erased record: exact. Every benchmark reports it, and its time is the denominator
of every speed-up. The training loop is the project's original one for the task kind:
:func:`unlearn.training.train` for classifiers, :func:`unlearn.lm.model.train_lm` (linear learning-rate
decay) for causal LMs.

Mutates in place: no (the caller's model is not even read, beyond its device).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from continual.examples import join
from continual.registry import CAUSAL_LM, CLASSIFICATION, UpdateRequest, UpdateResult, register, task_kind
from continual.training import model_device
from unlearn.config import require
from unlearn.training import train


@dataclass(frozen=True)
class JointConfig:
    """seed_offset: added to the recipe's seed for the fresh initialisation and shuffling (0 = the original
    seed policy: same seed, new data)."""

    seed_offset: int = 0

    def __post_init__(self) -> None:
        require(0 <= self.seed_offset < 2**31, "seed_offset", f"must be in [0, 2**31), got {self.seed_offset}")


@register("joint", JointConfig, tasks=(CLASSIFICATION, CAUSAL_LM), exact=True)
def joint(model: nn.Module, request: UpdateRequest, config: JointConfig) -> UpdateResult:
    """Retrain from scratch on the retain data plus the update (exact upper bound)."""
    retain = request.require_retain("joint")
    factory = request.require_factory("joint")
    recipe = replace(request.recipe, seed=request.recipe.seed + config.seed_offset)
    data = join(retain, request.update)
    fresh = factory(recipe.seed).to(model_device(model))
    if task_kind(request.task) == CAUSAL_LM:
        from unlearn.lm.model import train_lm  # imports transformers: only LM jobs pay for it

        train_lm(request.task, fresh, data, recipe)
    else:
        train(request.task, fresh, data, recipe, progress=request.report)
    return UpdateResult(fresh.eval(), details={"strategy": "joint", "seed": recipe.seed, "epochs": recipe.epochs,
                                               "examples": len(data)}, exact=True)
