"""The training recipe shared by original training, the retrain baseline and fine-tuning.

One straight loop (forward, loss, backward, clip-free step, schedule), deterministic for a given seed:

- model initialisation comes from the factory's seed (``model_factory(recipe.seed)``);
- the shuffling order comes from a generator seeded with ``recipe.seed``;
- every other random draw of the forward pass (dropout masks, stochastic depth, ...) comes from torch's
  global generator, which the loop FORKS and seeds with :func:`training_seed` for the duration of the run.
  Two trainings with the same recipe, data and seed therefore give bit-identical weights on one device, and
  the caller's global random state is the same after the call as before it. Without the fork, dropout drew
  from whatever state the process happened to be in, so "exact" retrain was not reproducible (issue 9).

BatchNorm cannot normalise a batch of one example in training mode (``BatchNorm1d`` raises "Expected more
than 1 value per channel"). An epoch's last batch is therefore never of size one: when the set size is
``k * batch_size + 1``, the single leftover example joins the previous batch (that batch has
``batch_size + 1`` examples). Every example is still seen once per epoch. :func:`epoch_batch_count` gives
the resulting number of steps per epoch, which the learning-rate schedule uses.

Learning-rate schedules (``TrainRecipe.lr_schedule``), as a multiplier of ``lr`` before optimiser step
``s`` (0-based) of ``total = epochs * epoch_batch_count`` steps, with ``w = warmup_steps``; the same
definitions as ``transformers.get_constant_schedule_with_warmup``, ``get_linear_schedule_with_warmup`` and
``get_cosine_schedule_with_warmup`` (0.5 cycles):

- warm-up, ``s < w``: ``s / w`` (the first step of a warm-up runs at lr 0, as in transformers);
- ``constant``: 1;
- ``linear``: ``max(0, (total - s) / (total - w))``; with ``w = 0`` that is ``1 - s / total``, the decay of
  :func:`unlearn.lm.model.train_lm` (so the LM benchmark's retrain can repeat the original recipe: with
  ``optimizer="adamw"`` the two loops are step for step the same whenever no epoch ends in a lone example,
  ``tests/unlearn/test_training.py`` pins it against a ``LambdaLR`` loop);
- ``cosine``: ``0.5 * (1 + cos(pi * (s - w) / (total - w)))``.

The default (``constant``, no warm-up) is the loop as it was before schedules existed.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from unlearn.data import Batch, ExampleSet
from unlearn.errors import InvalidParameterError
from unlearn.gradient_restriction import gradient_restriction_penalty
from unlearn.tasks import TaskAdapter

LR_SCHEDULES = ("constant", "linear", "cosine")
_DROPOUT_SEED_OFFSET = 0x5EED
"""Added to the recipe seed for the forked global generator, so dropout draws differ from the shuffling order's
and from the factory's initialisation draws (both also seeded with ``recipe.seed``)."""


@dataclass(frozen=True)
class TrainRecipe:
    """How a model was trained; the retrain baseline repeats it exactly on Dr.

    epochs: passes over the training set.
    batch_size: mini-batch size (an epoch's last batch is never of size one; see the module docstring).
    lr: peak learning rate.
    weight_decay: L2 penalty (decoupled for AdamW).
    optimizer: ``adam``, ``adamw`` or ``sgd`` (momentum 0.9).
    seed: seeds model initialisation (through the factory), the shuffling order and, through a forked
        generator, dropout (:func:`training_seed`).
    gradient_restriction: weight alpha_gr of IAU's gradient-restriction penalty (arXiv 2507.23257; paper value
        0.005, see :mod:`unlearn.gradient_restriction`); 0 trains without it.
    lr_schedule: ``constant`` (default), ``linear`` decay to 0, or ``cosine`` decay to 0 over the whole run
        (module docstring for the exact multipliers).
    warmup_steps: optimiser steps of linear warm-up from 0 before the schedule (0 = none).
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    seed: int = 0
    gradient_restriction: float = 0.0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        for name, valid, rule in (("epochs", self.epochs >= 1, "must be >= 1"),
                                  ("batch_size", self.batch_size >= 1, "must be >= 1"),
                                  ("lr", self.lr > 0, "must be > 0"),
                                  ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
                                  ("gradient_restriction", 0 <= self.gradient_restriction <= 1, "must be in [0, 1]")):
            if not valid:
                raise InvalidParameterError(name, f"{rule}, got {getattr(self, name)!r}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise InvalidParameterError("optimizer", f"must be 'adam', 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InvalidParameterError("lr_schedule", f"must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise InvalidParameterError("warmup_steps", f"must be a non-negative integer, got {self.warmup_steps!r}")


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


def training_seed(recipe: TrainRecipe) -> int:
    """The seed of the forked global generator during training (dropout and other forward-pass draws)."""
    return recipe.seed + _DROPOUT_SEED_OFFSET


def make_optimizer(recipe: TrainRecipe, params) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)


def lr_multiplier(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The factor applied to the peak learning rate before optimiser step ``step`` (module docstring)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise InvalidParameterError("lr_schedule", f"must be one of {list(LR_SCHEDULES)}, got {schedule!r}")


def epoch_batch_count(size: int, batch_size: int) -> int:
    """Optimiser steps per epoch over ``size`` examples: a lone last example joins the previous batch."""
    full, rest = divmod(size, batch_size)
    return full + (1 if rest > 1 or (rest == 1 and full == 0) else 0)


def epoch_batches(examples: ExampleSet, batch_size: int, device: torch.device,
                  shuffle: torch.Generator) -> Iterator[Batch]:
    """One epoch of shuffled batches; a size-one last batch is merged into the one before (BatchNorm)."""
    count = len(examples)
    order = torch.randperm(count, generator=shuffle)
    bounds = list(range(0, count, batch_size)) + [count]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    for start, end in zip(bounds[:-1], bounds[1:]):
        index = order[start:end]
        yield {name: t[index].to(device) for name, t in examples.tensors.items()}


def _fork_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


class Regulariser(Protocol):
    """A term added to every optimiser step's loss by :func:`train` (e.g. ``shrink-perturb``'s forget-loss
    floor). It must draw its randomness from a generator of its own."""

    def begin_epoch(self, model: nn.Module) -> None:
        """Called before each epoch's first step, with the current weights."""

    def __call__(self, model: nn.Module) -> Tensor | float:
        """The term for one step: a scalar with a graph to ``model``'s parameters, or 0.0 for none."""


def train(
    task: TaskAdapter,
    model: nn.Module,
    examples: ExampleSet,
    recipe: TrainRecipe,
    epochs: int | None = None,
    progress: Callable[[float, str], None] | None = None,
    regulariser: Regulariser | None = None,
) -> nn.Module:
    """Train ``model`` IN PLACE on ``examples`` with ``recipe`` (``epochs`` overrides the recipe's), adding
    ``regulariser``'s term to every step's loss when one is given.

    The schedule spans the epochs actually run. The caller's global random state is left as it was.
    """
    device = next(iter(model.parameters())).device
    epochs = recipe.epochs if epochs is None else epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe, params)
    total_steps = epochs * epoch_batch_count(len(examples), recipe.batch_size)
    shuffle = torch.Generator().manual_seed(recipe.seed)
    step = 0
    with torch.random.fork_rng(devices=_fork_devices(device)):
        torch.manual_seed(training_seed(recipe))  # dropout masks: reproducible per recipe seed
        model.train()
        for epoch in range(epochs):
            if regulariser is not None:
                regulariser.begin_epoch(model)
            for batch in epoch_batches(examples, recipe.batch_size, device, shuffle):
                for group in optimizer.param_groups:
                    group["lr"] = recipe.lr * lr_multiplier(recipe.lr_schedule, step, total_steps,
                                                            recipe.warmup_steps)
                loss = task.batch_loss(model, batch)
                if recipe.gradient_restriction > 0:  # IAU's GR: + alpha_gr * sum_W ||grad_W loss||_2 (double backprop)
                    loss = loss + recipe.gradient_restriction * gradient_restriction_penalty(loss, params)
                if regulariser is not None:
                    loss = loss + regulariser(model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
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
