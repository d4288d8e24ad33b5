"""Joining example sets whose sequences were padded to different widths.

A causal-LM example set is right-padded to its own longest sequence (:meth:`unlearn.lm.task.CausalLMTask.encode`),
so the retain data, an update and the replay buffer usually disagree on the width. Joining them pads the
sequence fields on the right with zeros: padding is never attended (``attention_mask`` 0) and never a
target (``answer_mask`` 0), so its token id does not matter. Classification fields must match exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError

# Per-position fields of causal-LM examples (and their stored logits, [N, L, V]).
SEQUENCE_FIELDS = ("input_ids", "attention_mask", "answer_mask")


def pad_width(tensor: Tensor, width: int) -> Tensor:
    """Right-pad dimension 1 of ``tensor`` with zeros to ``width``."""
    missing = width - tensor.shape[1]
    if missing <= 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 2) + [0, missing]  # F.pad lists the last dimension first
    return F.pad(tensor, pad)


def is_sequence_field(name: str, tensor: Tensor) -> bool:
    return name in SEQUENCE_FIELDS or (name == "logits" and tensor.dim() == 3)


def join_tensors(name: str, first: Tensor, second: Tensor) -> Tensor:
    """``torch.cat`` along rows, padding a sequence field to the wider of the two."""
    if is_sequence_field(name, first) and first.dim() == second.dim() and first.dim() >= 2:
        width = max(first.shape[1], second.shape[1])
        first, second = pad_width(first, width), pad_width(second, width)
    if first.shape[1:] != second.shape[1:] or first.dtype != second.dtype:
        raise InvalidDataError(name, f"cannot join rows of shape {tuple(first.shape[1:])} ({first.dtype}) with "
                               f"rows of shape {tuple(second.shape[1:])} ({second.dtype})")
    return torch.cat([first, second])


def join(first: ExampleSet, second: ExampleSet) -> ExampleSet:
    """Rows of ``first`` then ``second``; both must have the same fields."""
    if set(first.tensors) != set(second.tensors):
        raise InvalidDataError("examples", f"cannot join sets with fields {sorted(first.tensors)} and "
                               f"{sorted(second.tensors)}")
    return ExampleSet({name: join_tensors(name, first[name], second[name]) for name in first.tensors})


def stack_batches(batches: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """One batch made of several (for a single forward pass), and each part padded to its width.

    Sequence fields are right-padded to the widest part; the returned parts are the inputs as the combined
    batch holds them, so a loss computed on a slice of the combined outputs can read its part's fields.
    """
    names = set(batches[0])
    if any(set(batch) != names for batch in batches):
        raise InvalidDataError("batch", "cannot stack batches with different fields")
    padded = []
    for batch in batches:
        part = {}
        for name, tensor in batch.items():
            if is_sequence_field(name, tensor):
                width = max(other[name].shape[1] for other in batches)
                tensor = pad_width(tensor, width)
            part[name] = tensor
        padded.append(part)
    combined = {name: torch.cat([part[name] for part in padded]) for name in batches[0]}
    return combined, padded
