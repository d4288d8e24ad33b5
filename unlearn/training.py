"""The training recipe shared by original training, the retrain baseline and fine-tuning.

One straight loop (forward, loss, backward, step), deterministic for a given seed: the shuffling order
comes from a generator seeded by the recipe, and model initialisation from the factory's seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from unlearn.data import ExampleSet
from unlearn.errors import InvalidParameterError
from unlearn.gradient_restriction import gradient_restriction_penalty
from unlearn.tasks import TaskAdapter


@dataclass(frozen=True)
class TrainRecipe:
    """How a model was trained; the retrain baseline repeats it exactly on Dr.

    epochs: passes over the training set.
    batch_size: mini-batch size.
    lr: learning rate.
    weight_decay: L2 penalty (decoupled for AdamW).
    optimizer: ``adam``, ``adamw`` or ``sgd`` (momentum 0.9).
    seed: seeds model initialisation (through the factory) and the shuffling order.
    gradient_restriction: weight alpha_gr of IAU's gradient-restriction penalty (arXiv 2507.23257; paper value
        0.005, see :mod:`unlearn.gradient_restriction`); 0 trains without it.
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    seed: int = 0
    gradient_restriction: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0 \
                or not 0 <= self.gradient_restriction <= 1:
            raise InvalidParameterError("recipe", f"invalid training recipe {self}")


def make_optimizer(recipe: TrainRecipe, params) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)


def train(
    task: TaskAdapter,
    model: nn.Module,
    examples: ExampleSet,
    recipe: TrainRecipe,
    epochs: int | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> nn.Module:
    """Train ``model`` IN PLACE on ``examples`` with ``recipe`` (``epochs`` overrides the recipe's)."""
    device = next(iter(model.parameters())).device
    epochs = recipe.epochs if epochs is None else epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe, params)
    shuffle = torch.Generator().manual_seed(recipe.seed)
    model.train()
    for epoch in range(epochs):
        for batch in examples.batches(recipe.batch_size, device, shuffle_generator=shuffle):
            loss = task.batch_loss(model, batch)
            if recipe.gradient_restriction > 0:  # IAU's GR: + alpha_gr * sum_W ||grad_W loss||_2 (double backprop)
                loss = loss + recipe.gradient_restriction * gradient_restriction_penalty(loss, params)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if progress is not None:
            progress((epoch + 1) / epochs, f"epoch {epoch + 1}/{epochs}")
    model.eval()
    return model


def train_from_scratch(
    task: TaskAdapter,
    model_factory: Callable[[int], nn.Module],
    examples: ExampleSet,
    recipe: TrainRecipe,
    device: torch.device,
    progress: Callable[[float, str], None] | None = None,
) -> nn.Module:
    """A fresh initialisation from ``model_factory(recipe.seed)``, trained with ``recipe``."""
    model = model_factory(recipe.seed).to(device)
    return train(task, model, examples, recipe, progress=progress)
