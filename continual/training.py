"""The small, shared pieces of every strategy's loop; each strategy keeps its own loop (STYLE.md).

- :func:`update_plan`: epochs, learning rate, batch size and optimiser of an update, from the model's
  original recipe, the request's ``update_epochs`` and the strategy's ``epochs`` / ``lr_scale``;
- :func:`update_batches`: one seeded, shuffled pass over the update. A last batch of ONE example is merged
  into the batch before it: batch norm cannot normalise a single example in training mode (PyTorch raises),
  and one example would weigh as much as a full batch in that step;
- :func:`make_update_optimizer` with :func:`decaying_schedule`: the recipe's optimiser at the update's
  learning rate, warmed up linearly over the first 20% of the steps, then decayed linearly to 0 (as
  :func:`unlearn.lm.model.train_lm`: the end of an update is what is registered, and a decayed rate settles
  there instead of oscillating);
- :func:`seeded`: dropout and every other use of torch's global RNG inside a strategy draw from a forked
  RNG seeded with the request's seed, so the same seed gives the same weights and the caller's RNG is left
  as it was;
- :func:`task_loss`: the task's training objective from outputs already computed (strategies that reuse
  the outputs for a second term, e.g. DER++ storing logits, need it).

Seeds within one update: shuffling ``seed``, buffer sampling ``seed + 1``, dropout ``seed + 2``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from continual.registry import CAUSAL_LM, UpdateRequest, task_kind
from unlearn.data import Batch, ExampleSet
from unlearn.lm.task import answer_token_log_probs
from unlearn.registry import copy_model
from unlearn.tasks import TaskAdapter
from unlearn.training import make_optimizer


@dataclass(frozen=True)
class UpdatePlan:
    """How one update trains: ``epochs`` passes of ``steps_per_epoch`` batches of ``batch_size``."""

    epochs: int
    lr: float
    batch_size: int
    steps_per_epoch: int

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def update_plan(request: UpdateRequest, epochs: int, lr_scale: float) -> UpdatePlan:
    """``epochs`` 0 means the request's ``update_epochs``; the learning rate is the recipe's times ``lr_scale``."""
    epochs = epochs or request.update_epochs
    batch_size = request.recipe.batch_size
    return UpdatePlan(epochs, request.recipe.lr * lr_scale, batch_size, len(batch_slices(len(request.update), batch_size)))


def batch_slices(count: int, batch_size: int, order: Tensor | None = None) -> list[Tensor]:
    """Index batches of ``order`` (default 0..count-1); a trailing batch of one joins the one before it."""
    order = torch.arange(count) if order is None else order
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def update_batches(examples: ExampleSet, batch_size: int, generator: torch.Generator,
                   device: torch.device) -> Iterator[tuple[Tensor, Batch]]:
    """One shuffled pass: (row indices, batch on ``device``) per step, the order drawn from ``generator``."""
    order = torch.randperm(len(examples), generator=generator)
    for index in batch_slices(len(examples), batch_size, order):
        yield index, {name: tensor[index].to(device) for name, tensor in examples.tensors.items()}


def make_update_optimizer(request: UpdateRequest, params, lr: float) -> torch.optim.Optimizer:
    """The original recipe's optimiser (Adam, AdamW or SGD with momentum) and weight decay at ``lr``."""
    return make_optimizer(replace(request.recipe, lr=lr), params)


WARMUP_FRACTION = 0.2


def decaying_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first :data:`WARMUP_FRACTION` of ``total_steps``, then linear decay to 0
    (call ``step()`` after each optimiser step).

    Why the warm-up: Adam's first steps move every parameter by about the learning rate whatever its
    gradient, and at the start of an update that jolt is what makes old-task accuracy dip (the stability
    gap); ramping the rate up lets the moment estimates settle first.
    """
    total = max(total_steps, 1)
    warmup = max(1, round(WARMUP_FRACTION * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(total - warmup, 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run the block with torch's RNG (CPU, and ``device`` if CUDA) forked and seeded; restored afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


def copy_for_update(model: nn.Module) -> nn.Module:
    """The copy a strategy trains (the caller's model is never changed); frozen parameters stay frozen, as in
    every unlearning method (:func:`unlearn.registry.copy_model` says why)."""
    return copy_model(model)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A teacher or anchor: a copy of the current version in eval mode without gradients."""
    teacher = copy.deepcopy(model).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def task_loss(task: TaskAdapter, outputs: Tensor, batch: Batch) -> Tensor:
    """The training objective from computed outputs: mean cross-entropy (classification) or the mean NLL
    over every answer token of the batch (causal LM), i.e. ``task.batch_loss`` without a second forward pass."""
    if task_kind(task) == CAUSAL_LM:
        log_probs, mask = answer_token_log_probs(outputs, batch["input_ids"], batch["answer_mask"])
        return -(log_probs * mask).sum() / mask.sum().clamp_min(1.0)
    return F.cross_entropy(outputs, batch["labels"])
