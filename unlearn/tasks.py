"""Task adapters: the one place that knows how a model's outputs become losses and predictions.

Every method is written against :class:`TaskAdapter`, so the same SSD or gradient-ascent code runs on a
classifier today and on a causal language model (answer-token losses, prompt masked) later.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn.data import Batch, ExampleSet
from unlearn.errors import InvalidDataError


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, its mode restored after: ``model.eval()``, then
    ``model.train(was_training)``, as the callers did by hand.

    A model none of whose modules is in training mode (a served version) is left alone: the two switches walk
    every module, which on a small model costs more than a forward pass over a few records (about 0.4 ms of a
    steady-state erasure's 2.3 ms check on the digits CNN).
    """
    switch = any(module.training for module in model.modules())
    was_training = model.training
    if switch:
        model.eval()
    try:
        yield model
    finally:
        if switch:
            model.train(was_training)


class TaskAdapter(Protocol):
    """What a method may ask of a model, whatever the task."""

    name: str

    def outputs(self, model: nn.Module, batch: Batch) -> Tensor:
        """Raw model outputs (logits) for a batch."""

    def losses_from_outputs(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Loss of each example from already computed outputs, shape [batch]."""

    def per_example_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Negative log-likelihood of each example's target, shape [batch].

        Classification: the cross-entropy of the label, -log p(y|x). Causal LM: the NLL SUMMED over the
        answer tokens (prompt masked), i.e. -log pi(y|x) of the whole answer, as NPO needs it.
        """

    def target_lengths(self, batch: Batch) -> Tensor:
        """Number of target tokens per example (ones for classification), for length-normalised losses."""

    def batch_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The training objective on a batch (scalar): mean CE for classification, mean over answer tokens
        for causal LMs. SSD's Fisher differentiates this."""

    def output_energy(self, model: nn.Module, batch: Batch) -> Tensor:
        """Mean over the batch of the squared L2 norm of the outputs (LF-SSD's label-free objective)."""

    def correct(self, model: nn.Module, batch: Batch) -> Tensor:
        """Boolean per example: is the prediction right?"""

    def correct_from_outputs(self, outputs: Tensor, batch: Batch) -> Tensor:
        """:meth:`correct` from already computed outputs (one forward pass for losses and correctness)."""

    def validate(self, model: nn.Module, examples: ExampleSet, field: str) -> None:
        """Raise :class:`InvalidDataError` naming ``field`` when the examples cannot feed the model."""


_FITS: WeakKeyDictionary[nn.Module, set[tuple[int, tuple[int, ...]]]] = WeakKeyDictionary()
_FITS_LOCK = threading.Lock()
"""(class count, input shape) pairs each model (weakly held) was probed with and answered ``[batch, class
count]`` for: one probe per model, class count and shape in the process, shared by every ClassificationTask
(a service job builds a new task for a model object an earlier job already probed)."""


class ClassificationTask:
    """Any ``nn.Module`` mapping a float tensor batch ``inputs`` to logits; integer ``labels``."""

    name = "classification"

    def __init__(self, num_classes: int):
        if num_classes < 2:
            raise InvalidDataError("num_classes", f"a classifier needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes

    def outputs(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch["inputs"])

    def losses_from_outputs(self, outputs: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(outputs, batch["labels"], reduction="none")

    def per_example_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.losses_from_outputs(self.outputs(model, batch), batch)

    def target_lengths(self, batch: Batch) -> Tensor:
        return torch.ones(batch["labels"].shape[0], device=batch["labels"].device)

    def batch_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return F.cross_entropy(self.outputs(model, batch), batch["labels"])

    def output_energy(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.outputs(model, batch).pow(2).sum(dim=1).mean()

    def correct(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.correct_from_outputs(self.outputs(model, batch), batch)

    def correct_from_outputs(self, outputs: Tensor, batch: Batch) -> Tensor:
        return outputs.argmax(dim=1) == batch["labels"]

    def validate(self, model: nn.Module, examples: ExampleSet, field: str) -> None:
        if len(examples) == 0:
            raise InvalidDataError(field, "is empty")
        for name in ("inputs", "labels"):
            if name not in examples.tensors:
                raise InvalidDataError(field, f"missing tensor {name!r}")
        inputs, labels = examples["inputs"], examples["labels"]
        if not inputs.is_floating_point():
            raise InvalidDataError(field, f"inputs must be floating point, got {inputs.dtype}")
        # A sum is finite unless some element is NaN or inf (or the sum overflows: then look at each element);
        # one reduction instead of an element-wise mask, a tenth of the cost on every request.
        if not torch.isfinite(inputs.sum()) and not torch.isfinite(inputs).all():
            raise InvalidDataError(field, "inputs contain NaN or inf")
        if labels.dim() != 1 or labels.dtype != torch.long:
            raise InvalidDataError(field, "labels must be a 1-D int64 tensor")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise InvalidDataError(field, f"labels must lie in [0, {self.num_classes})")
        key = (self.num_classes, tuple(inputs.shape[1:]))
        with _FITS_LOCK:
            if key in _FITS.get(model, ()):  # this model already took inputs of this shape
                return
        device = next(iter(model.parameters())).device
        try:
            with eval_mode(model), torch.no_grad():
                logits = model(inputs[:1].to(device))
        except RuntimeError as error:  # the model's own shape check is the authority
            other = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != inputs.dtype})
            if other:  # a float64 (or half) model fed Lethe's float32 features: say that, not "shape"
                raise InvalidDataError(field, f"the model's parameters are {', '.join(other)} and its forward() does not "
                                       f"take {inputs.dtype} inputs: log it as float32 (model.float()) or cast the "
                                       f"inputs inside forward(): {error}")
            raise InvalidDataError(field, f"inputs of shape {tuple(inputs.shape[1:])} do not fit the model: {error}")
        if not isinstance(logits, Tensor):  # (logits, features), a dict, a HF output object: common, and not ours
            raise InvalidDataError(field, f"the model's forward() returned a {type(logits).__name__}, not one tensor; "
                                   f"Lethe needs forward(inputs) to return the logits [batch, {self.num_classes}] alone "
                                   "(register a wrapper module whose forward returns them)")
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise InvalidDataError(field, f"model gives outputs of shape {tuple(logits.shape)}, "
                                   f"expected [batch, {self.num_classes}]")
        with _FITS_LOCK:
            _FITS.setdefault(model, set()).add(key)


EVAL_BATCH_SIZE = 256
"""Rows per no-grad evaluation pass unless the task names its own (``eval_batch_size``)."""


def eval_batch_size(task: TaskAdapter, batch_size: int | None = None) -> int:
    """``batch_size`` when given, else the task's ``eval_batch_size`` when it has one, else :data:`EVAL_BATCH_SIZE`."""
    return batch_size if batch_size is not None else getattr(task, "eval_batch_size", EVAL_BATCH_SIZE)


def eval_losses_and_correct(task: TaskAdapter, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Per-example loss (as ``losses_from_outputs``) and correctness (as ``correct_from_outputs``) of one
    evaluation pass. A task with its own ``eval_losses_and_correct`` computes them its way (a causal LM: the
    output layer on the answer positions only, :meth:`unlearn.lm.task.CausalLMTask.answer_logits`); otherwise
    both come from the task's full outputs."""
    own = getattr(task, "eval_losses_and_correct", None)
    if own is not None:
        return own(model, batch)
    outputs = task.outputs(model, batch)
    return task.losses_from_outputs(outputs, batch), task.correct_from_outputs(outputs, batch)


@torch.no_grad()
def accuracy(task: TaskAdapter, model: nn.Module, examples: ExampleSet, batch_size: int | None = None) -> float:
    """Fraction of examples the model gets right, in eval mode; the model's mode is restored."""
    if len(examples) == 0:
        raise InvalidDataError("examples", "accuracy of an empty set is undefined")
    device = next(iter(model.parameters())).device
    right = 0
    with eval_mode(model):
        for batch in examples.batches(eval_batch_size(task, batch_size), device):
            right += int(task.correct(model, batch).sum())
    return right / len(examples)


@torch.no_grad()
def accuracy_without_classes(task: TaskAdapter, model: nn.Module, examples: ExampleSet, classes: tuple[int, ...],
                             batch_size: int = 256) -> float:
    """Accuracy when the model may not predict ``classes`` (their logits masked out), eval mode.

    For class erasure, this measured on the ORIGINAL model estimates what a model retrained without those
    classes reaches on the classes that stay: a retrained model never predicts an erased class, so the
    original's mistakes into it are not the retrained model's. (On the tabular MLP of the benchmark the
    original's plain kept-class accuracy was 2 to 5 points below the retrained model's, its masked accuracy
    0 to 2.3 points.) Classification only: the outputs must be ``[batch, classes]`` logits.
    """
    if len(examples) == 0:
        raise InvalidDataError("examples", "accuracy of an empty set is undefined")
    device = next(iter(model.parameters())).device
    right = 0
    with eval_mode(model):
        for batch in examples.batches(batch_size, device):
            logits = task.outputs(model, batch).clone()
            logits[:, list(classes)] = -torch.inf
            right += int((logits.argmax(dim=1) == batch["labels"]).sum())
    return right / len(examples)


@torch.no_grad()
def collect(task: TaskAdapter, model: nn.Module, examples: ExampleSet, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Per-example outputs and losses over a set, in eval mode, on the CPU."""
    device = next(iter(model.parameters())).device
    outputs, losses = [], []
    with eval_mode(model):
        for batch in examples.batches(batch_size, device):
            logits = task.outputs(model, batch)
            outputs.append(logits.cpu())
            losses.append(task.losses_from_outputs(logits, batch).cpu())
    return torch.cat(outputs), torch.cat(losses)
