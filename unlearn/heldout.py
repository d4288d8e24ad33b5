"""A model version's scores on never-trained ``tune`` records, precomputed once per version.

``ssd-auto`` (and any method that first asks "is the untouched model already at the never-seen level?")
compares the forget set's per-example losses with the ``tune`` records' losses on the unchanged weights,
and measures the unchanged model's ``tune`` accuracy as its utility reference. Neither depends on the
request: both are a function of the model version and its never-trained records. Computed per request,
they cost a forward pass over ``tune`` (hundreds of records) for a forget set of three; precomputed in the
background after a version is registered (beside I_D, ``service.prefetch``), the request pays only its
forget set.

:class:`HeldOutScores` holds the per-record loss (as :func:`unlearn.membership.membership_losses` computes it:
per target token, eval mode) and correctness of a set of records, each keyed by an opaque record key (the
service uses the keyed tombstone hash, never a raw record id), so a job selects the records of ITS tune
split from a version's pool: a request's own never-trained records leave the job's tune split, the rest
is the same. :class:`HeldOutCache` stores them keyed by (weights digest, dataset digest); a file written for
other weights or data is never used.

Exactness: the scores are the same numbers a per-request pass computes, up to the floating-point effect of
batching the records differently (eval mode: no dropout, BatchNorm on running statistics; per-example
results do not depend on the other records of the batch).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unlearn.atomic_files import partial_path
from unlearn.data import ExampleSet
from unlearn.errors import CacheMismatchError, InvalidDataError
from unlearn.importance import weights_digest
from unlearn.tasks import TaskAdapter, eval_batch_size, eval_losses_and_correct, eval_mode


@dataclass(frozen=True)
class HeldOutScores:
    """Per-record loss (per target token) and correctness of one model's weights, in the records' order."""

    keys: np.ndarray  # str [N]
    losses: np.ndarray  # float64 [N]
    correct: np.ndarray  # bool [N]

    def __post_init__(self) -> None:
        if not len(self.keys) == len(self.losses) == len(self.correct):
            raise InvalidDataError("scores", "keys, losses and correctness differ in length")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def accuracy(self) -> float:
        if len(self) == 0:
            raise InvalidDataError("scores", "accuracy of an empty set is undefined")
        return float(self.correct.mean())

    def select(self, keys: np.ndarray) -> HeldOutScores | None:
        """The scores of ``keys`` in that order, or None when any of them is not held (then compute)."""
        position = {key: index for index, key in enumerate(self.keys.tolist())}
        try:
            index = np.fromiter((position[key] for key in np.asarray(keys).tolist()), dtype=np.int64, count=len(keys))
        except KeyError:
            return None
        return HeldOutScores(self.keys[index], self.losses[index], self.correct[index])


def provenance(scores: HeldOutScores | None) -> str:
    """Where a method's unchanged-model tune scores came from, for its details."""
    return "precomputed for the model version" if scores is not None else "computed for this request"


@torch.no_grad()
def score(task: TaskAdapter, model: nn.Module, examples: ExampleSet, keys: np.ndarray | None = None,
          batch_size: int | None = None) -> HeldOutScores:
    """Loss per target token and correctness of every example, eval mode; the model's mode is restored.
    ``keys`` name the records (positions when None: scores that are not cached)."""
    keys = np.arange(len(examples)) if keys is None else np.asarray(keys).astype(str)
    if len(examples) != len(keys):
        raise InvalidDataError("keys", f"{len(keys)} key(s) for {len(examples)} example(s)")
    if len(examples) == 0:
        raise InvalidDataError("examples", "scores of an empty set are undefined")
    device = next(iter(model.parameters())).device
    losses, correct = [], []
    with eval_mode(model):
        for batch in examples.batches(eval_batch_size(task, batch_size), device):
            summed, right = eval_losses_and_correct(task, model, batch)  # one forward pass for both
            losses.append((summed / task.target_lengths(batch).clamp_min(1)).double().cpu())
            correct.append(right.cpu())
    return HeldOutScores(keys, torch.cat(losses).numpy(), torch.cat(correct).numpy().astype(bool))


class HeldOutCache:
    """Scores stored as ``.npz`` files (no pickles), one per (weights digest, dataset digest)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, weights: str, dataset: str) -> Path:
        key = hashlib.sha256(json.dumps(["heldout", weights, dataset]).encode()).hexdigest()[:32]
        return self.directory / f"heldout-{key}.npz"

    def load(self, model: nn.Module, dataset_digest: str) -> HeldOutScores | None:
        """The stored scores of this model's weights on this data set, or None when nothing is stored."""
        weights = weights_digest(model)
        path = self.path(weights, dataset_digest)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                recorded = (str(stored["weights"]), str(stored["dataset"]))
                scores = HeldOutScores(stored["keys"].astype(str), stored["losses"].astype(np.float64),
                                       stored["correct"].astype(bool))
        except Exception as error:  # a torn or foreign file must never be trusted
            raise CacheMismatchError(f"held-out scores {path.name} are unreadable: {error}") from error
        if recorded != (weights, dataset_digest):
            raise CacheMismatchError(f"held-out scores {path.name} were computed for other weights or data")
        return scores

    def store(self, scores: HeldOutScores, model: nn.Module, dataset_digest: str) -> Path:
        weights = weights_digest(model)
        path = self.path(weights, dataset_digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(path)
        with open(partial, "wb") as handle:
            np.savez(handle, keys=scores.keys.astype(str), losses=scores.losses, correct=scores.correct,
                     weights=np.array(weights), dataset=np.array(dataset_digest))
        partial.replace(path)  # atomic: readers see the whole file or none
        return path
