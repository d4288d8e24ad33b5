"""Parameter importance for the SSD family, and a cache for the training set's importance.

SSD (Foster et al., AAAI 2024, arXiv 2308.07707, Sec. 3) approximates the diagonal of the Fisher
information by squared gradients: for every mini-batch, back-propagate the batch-MEAN loss and add
``grad**2`` per parameter, then divide by the number of batches. These are squares of batch gradients,
not per-sample squares, so the value depends on the batch size: D and Df must use the same one, which is
why the batch size is an explicit argument and part of the cache key.

LF-SSD (arXiv 2402.19308) is label-free: it differentiates ``||f(x)||_2^2`` (mean over the batch of the
squared output norm) and accumulates ``|grad|`` instead of ``grad**2``.

Both are computed in ``model.eval()`` (batch-norm running statistics, no dropout), as the paper's
reference does, and the model's mode is restored afterwards.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unlearn.atomic_files import partial_path
from unlearn.data import ExampleSet
from unlearn.errors import CacheMismatchError, Cancelled, InvalidDataError
from unlearn.tasks import TaskAdapter, eval_mode

Variant = Literal["fisher", "label_free"]
Importance = dict[str, Tensor]
VARIANTS: tuple[str, ...] = ("fisher", "label_free")


def estimate_importance(
    task: TaskAdapter,
    model: nn.Module,
    examples: ExampleSet,
    batch_size: int,
    variant: Variant = "fisher",
    should_stop: Callable[[], bool] | None = None,
) -> Importance:
    """Importance of every trainable parameter element over ``examples`` (see module docstring).

    Parameters that receive no gradient get zero importance. The result lives on the model's device.
    ``should_stop`` is asked before every batch; when it answers True the pass is abandoned with
    :class:`unlearn.errors.Cancelled` (a background precomputation giving way to a real request).
    """
    if variant not in VARIANTS:
        raise InvalidDataError("variant", f"unknown importance variant {variant!r}")
    if len(examples) == 0:
        raise InvalidDataError("examples", "importance of an empty set is undefined")
    device = next(iter(model.parameters())).device
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    totals = [torch.zeros_like(p) for p in params]
    batches = 0
    with eval_mode(model):
        for batch in examples.batches(batch_size, device):
            if should_stop is not None and should_stop():
                raise Cancelled("importance estimation was cancelled")
            if variant == "fisher":
                objective = task.batch_loss(model, batch)
            else:
                objective = task.output_energy(model, batch)
            grads = torch.autograd.grad(objective, params, allow_unused=True)
            for total, grad in zip(totals, grads):
                if grad is not None:
                    total.add_(grad.pow(2) if variant == "fisher" else grad.abs())
            batches += 1
    return {name: total / batches for (name, _), total in zip(named, totals)}


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the model's state dict (names, dtypes, shapes, bytes), buffers included."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.dim() else
                          tensor.reshape(1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ImportanceCache:
    """Full-training-set importance stored as safetensors files, one per key.

    The key is (weights digest, dataset digest, batch size, variant): I_D does not depend on the request,
    so it is computed once per model version and a request only pays for its forget-set pass. A file whose
    recorded key or tensors do not match the model raises :class:`CacheMismatchError` instead of being
    used; a damaged file is treated the same way.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @staticmethod
    def key(weights: str, dataset: str, batch_size: int, variant: str) -> str:
        text = json.dumps([weights, dataset, batch_size, variant])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.directory / f"importance-{key}.safetensors"

    def load(self, model: nn.Module, dataset_digest: str, batch_size: int, variant: str) -> Importance | None:
        """The cached importance for this model and data, or None when nothing is stored."""
        weights = weights_digest(model)
        path = self.path(self.key(weights, dataset_digest, batch_size, variant))
        if not path.exists():
            return None
        return self._read(path, model, weights, dataset_digest, batch_size, variant)

    def _read(self, path: Path, model: nn.Module, weights: str, dataset: str, batch_size: int,
              variant: str) -> Importance:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except Exception as error:  # a torn or foreign file must never be trusted
            raise CacheMismatchError(f"importance cache {path.name} is unreadable: {error}") from error
        expected = {"weights": weights, "dataset": dataset, "batch_size": str(batch_size), "variant": variant}
        if {k: metadata.get(k) for k in expected} != expected:
            raise CacheMismatchError(f"importance cache {path.name} was computed for other weights or data")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(params) != set(tensors) or any(tensors[n].shape != p.shape for n, p in params.items()):
            raise CacheMismatchError(f"importance cache {path.name} does not match the model's parameters")
        device = next(iter(model.parameters())).device
        return {n: t.to(device) for n, t in tensors.items()}

    def store(self, importance: Importance, model: nn.Module, dataset_digest: str, batch_size: int,
              variant: str) -> Path:
        weights = weights_digest(model)
        path = self.path(self.key(weights, dataset_digest, batch_size, variant))
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"weights": weights, "dataset": dataset_digest, "batch_size": str(batch_size),
                    "variant": variant}
        partial = partial_path(path)
        save_file({n: t.detach().cpu().contiguous() for n, t in importance.items()}, str(partial), metadata)
        partial.replace(path)  # atomic: readers see the whole file or none
        return path


class TrainImportance:
    """I_D, the importance of the full training set D, for whichever method needs it.

    Bound to one data set; computed on first use per (model weights, batch size, variant) and kept in
    memory and, when a cache is given, on disk. ``last_seconds`` says what the last call cost (a lookup on
    a hit) and ``last_hit`` whether it was one; ``compute_seconds`` adds up the seconds of the Fisher passes
    actually run (misses only, the disk read of a hit excluded) and ``computed`` lists their
    ``(batch_size, variant)``, so a benchmark reports the importance pass a method really used.
    """

    def __init__(self, task: TaskAdapter, train: ExampleSet, cache: ImportanceCache | None = None):
        if len(train) == 0:
            raise InvalidDataError("train", "the full training set is empty")
        self.task = task
        self.train = train
        self.cache = cache
        self.dataset_digest = train.digest()
        self._memory: dict[tuple[str, int, str], Importance] = {}
        self.last_seconds = 0.0
        self.last_hit = False
        self.compute_seconds = 0.0
        self.computed: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self.train)

    def get(self, model: nn.Module, batch_size: int, variant: Variant = "fisher",
            should_stop: Callable[[], bool] | None = None) -> Importance:
        started = time.perf_counter()
        key = (weights_digest(model), batch_size, variant)
        importance = self._memory.get(key)
        if importance is None and self.cache is not None:
            importance = self.cache.load(model, self.dataset_digest, batch_size, variant)
        self.last_hit = importance is not None
        if importance is None:
            computing = time.perf_counter()
            importance = estimate_importance(self.task, model, self.train, batch_size, variant, should_stop)
            self.compute_seconds += time.perf_counter() - computing
            self.computed.append((batch_size, variant))
            if self.cache is not None:
                self.cache.store(importance, model, self.dataset_digest, batch_size, variant)
        self._memory[key] = importance
        self.last_seconds = time.perf_counter() - started
        return importance
