"""The training recipe shared by original training, the retrain baseline and fine-tuning.

One straight loop (forward, loss, backward, step), deterministic for a given seed: the shuffling order
comes from a generator seeded by the recipe, and model initialisation from the factory's seed.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

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
        for name, valid, rule in (("epochs", self.epochs >= 1, "must be >= 1"),
                                  ("batch_size", self.batch_size >= 1, "must be >= 1"),
                                  ("lr", self.lr > 0, "must be > 0"),
                                  ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
                                  ("gradient_restriction", 0 <= self.gradient_restriction <= 1, "must be in [0, 1]")):
            if not valid:
                raise InvalidParameterError(name, f"{rule}, got {getattr(self, name)!r}")


def recipe_from_values(values: Mapping[str, Any]) -> TrainRecipe:
    """A :class:`TrainRecipe` from loosely typed values, converted by the dataclass's field types.

    Recipes reach the service as JSON or a ``google.protobuf.Struct``, where every number is a float: an
    ``int`` field accepts an integral float (``300.0`` becomes ``300``), never ``300.5``; a ``float`` field
    accepts any finite number; a ``Literal`` field one of its values. An unknown key, a wrong type or a value
    out of range raises :class:`InvalidParameterError` naming the field: a recipe is never silently replaced by
    defaults (the retrain baseline must repeat exactly the training the client describes).
    """
    hints = typing.get_type_hints(TrainRecipe)
    known = {item.name for item in fields(TrainRecipe)}
    converted: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known:
            raise InvalidParameterError(name, f"unknown recipe field; known: {', '.join(sorted(known))}")
        converted[name] = _convert(name, hints[name], value)
    return TrainRecipe(**converted)


def _convert(name: str, kind: Any, value: Any) -> Any:
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise InvalidParameterError(name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise InvalidParameterError(name, f"must be a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameterError(name, f"must be a finite number, got {value!r}")
    if kind is int:
        if value != int(value):
            raise InvalidParameterError(name, f"must be an integer, got {value!r}")
        return int(value)
    if kind is float:
        return float(value)
    raise TypeError(f"TrainRecipe.{name} has a type recipe_from_values does not convert: {kind!r}")


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
