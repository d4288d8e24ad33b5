"""Example sets: named tensors that share their first dimension, validated once, batched in order.

A task adapter decides which fields it reads (``inputs``/``labels`` for classification; a causal-LM
adapter reads token ids and masks), so the rest of the library never looks inside a batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from unlearn.errors import InvalidDataError

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class ExampleSet:
    """A set of examples stored as tensors with a common first dimension (the example index)."""

    tensors: Mapping[str, Tensor]

    def __post_init__(self) -> None:
        if not self.tensors:
            raise InvalidDataError("examples", "an example set needs at least one tensor")
        sizes = {name: int(t.shape[0]) for name, t in self.tensors.items()}
        if len(set(sizes.values())) != 1:
            raise InvalidDataError("examples", f"tensors disagree on the number of examples: {sizes}")

    def __len__(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def subset(self, indices: Sequence[int] | Tensor) -> ExampleSet:
        index = torch.as_tensor(indices, dtype=torch.long)
        return ExampleSet({name: t[index] for name, t in self.tensors.items()})

    def concat(self, other: ExampleSet) -> ExampleSet:
        if set(self.tensors) != set(other.tensors):
            raise InvalidDataError("examples", "cannot concatenate sets with different fields")
        return ExampleSet({n: torch.cat([self.tensors[n], other.tensors[n]]) for n in self.tensors})

    def batches(
        self,
        batch_size: int,
        device: torch.device | None = None,
        shuffle_generator: torch.Generator | None = None,
    ) -> Iterator[Batch]:
        """Yield batches in order, or in the order drawn from ``shuffle_generator`` when given.

        Batching is explicit and deterministic: the same set, batch size and generator state give
        the same batches, which SSD's batch-size-dependent importance relies on.
        """
        if batch_size <= 0:
            raise InvalidDataError("batch_size", f"must be positive, got {batch_size}")
        count = len(self)
        order = (
            torch.randperm(count, generator=shuffle_generator)
            if shuffle_generator is not None
            else torch.arange(count)
        )
        for start in range(0, count, batch_size):
            index = order[start : start + batch_size]
            yield {name: t[index].to(device) if device else t[index] for name, t in self.tensors.items()}

    def num_batches(self, batch_size: int) -> int:
        return (len(self) + batch_size - 1) // batch_size

    def digest(self) -> str:
        """SHA-256 over field names, dtypes, shapes and bytes: identifies a data set in cache keys."""
        digest = hashlib.sha256()
        for name in sorted(self.tensors):
            tensor = self.tensors[name].detach().cpu().contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return digest.hexdigest()


def classification_examples(inputs: Tensor, labels: Tensor) -> ExampleSet:
    """Build a classification example set, converting dtypes (float32 inputs, int64 labels)."""
    return ExampleSet({"inputs": torch.as_tensor(inputs).float(), "labels": torch.as_tensor(labels).long()})
