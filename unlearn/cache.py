"""One cache of trained models for the whole ``unlearn`` package (benchmarks, demos, tests).

A trained model is fully determined by what built it: the architecture, the training recipe (seed
included), the training data and the training code. :class:`ModelCache` keys an entry by exactly that,
``namespace`` (the architecture's name) + ``kind`` (a label such as ``original``) + ``spec`` (any
JSON-able description: recipe, architecture settings) + the data's digest + :data:`TRAINING_CODE_VERSION`,
and stores it in a directory of its own under ``<cache>/models/``:

- ``weights.safetensors`` (or whatever the :class:`Codec` writes: a causal LM's ``save_pretrained``
  directory layout fits as well);
- ``meta.json``: the key's parts and ``train_seconds``, how long building took when it was built. That
  number is informational: **nothing may divide by it**. It was measured once, under whatever load the
  machine had then; a benchmark times its own retrain in the same process (issue 9, "honest costs").
  Beside it ``torch_threads``, torch's intra-op threads when the model was trained on a CPU (None on a GPU):
  the same seed and recipe train a different model at another thread count (the CPU kernels' reductions
  are ordered by thread), so a benchmark reports the count its cached original was trained with, and
  per-seed numbers reproduce at the same count. It is not part of the key: a process with another count
  reuses the entry (and says so through the benchmarks' ``original_threads``).

Entries are written to a temporary directory and renamed into place, so a concurrent reader sees a whole
entry or none. An entry whose weights do not load into the model the codec builds raises
:class:`~unlearn.errors.CacheMismatchError` instead of being used.

The cache directory is ``LETHE_CACHE_DIR`` (default ``.cache/lethe``), :func:`default_cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from unlearn.data import ExampleSet
from unlearn.errors import CacheMismatchError
from unlearn.tasks import TaskAdapter
from unlearn.training import TrainRecipe, train_from_scratch

TRAINING_CODE_VERSION = 2
"""Part of every key; bump it when the training loop's results change. 2: dropout drawn from a generator
seeded by the recipe, and a lone last example merged into the previous batch (issue 9)."""


def training_threads(device: torch.device) -> int | None:
    """Torch's intra-op threads for a model trained on ``device`` now: they change a CPU training's result
    (module docstring); None on a GPU."""
    return torch.get_num_threads() if torch.device(device).type == "cpu" else None


def default_cache_dir() -> Path:
    """``LETHE_CACHE_DIR``, default ``.cache/lethe`` (relative to the working directory)."""
    return Path(os.environ.get("LETHE_CACHE_DIR", ".cache/lethe"))


@dataclass(frozen=True)
class Codec:
    """How one kind of model is written to and read from an entry directory.

    ``save(model, directory)`` writes the weights; ``load(directory, device)`` returns the model (raising
    anything on a mismatch, which the cache turns into :class:`CacheMismatchError`).
    """

    save: Callable[[nn.Module, Path], None]
    load: Callable[[Path, torch.device], nn.Module]


def state_dict_codec(build_empty: Callable[[], nn.Module]) -> Codec:
    """A codec for plain ``nn.Module`` s: the state dict as ``weights.safetensors``, loaded into
    ``build_empty()`` (a freshly constructed model of the same architecture) with strict key checking."""

    def save(model: nn.Module, directory: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(directory / "weights.safetensors"))

    def load(directory: Path, device: torch.device) -> nn.Module:
        model = build_empty().to(device)
        state = load_file(str(directory / "weights.safetensors"))
        model.load_state_dict({k: v.to(device) for k, v in state.items()})
        return model

    return Codec(save, load)


@dataclass(frozen=True)
class CachedModel:
    """A model from the cache: ``hit`` says whether it was read (True) or built now (False)."""

    model: nn.Module
    meta: dict[str, Any]
    hit: bool
    path: Path


class ModelCache:
    """Trained models on disk, keyed by what determines their weights (module docstring)."""

    def __init__(self, directory: str | Path | None = None):
        self.root = Path(directory) if directory is not None else default_cache_dir()
        self.directory = self.root / "models"

    @staticmethod
    def key(namespace: str, kind: str, spec: Mapping[str, Any], data_digest: str) -> str:
        text = json.dumps([TRAINING_CODE_VERSION, namespace, kind, spec, data_digest], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def entry(self, namespace: str, kind: str, spec: Mapping[str, Any], data_digest: str) -> Path:
        return self.directory / f"{namespace}-{kind}-{self.key(namespace, kind, spec, data_digest)}"

    def get_or_build(self, namespace: str, kind: str, spec: Mapping[str, Any], data_digest: str,
                     build: Callable[[], nn.Module], codec: Codec, device: torch.device) -> CachedModel:
        """The cached model, or ``build()`` (timed) stored under the key and returned."""
        path = self.entry(namespace, kind, spec, data_digest)
        meta_path = path / "meta.json"
        if meta_path.exists():
            try:
                model = codec.load(path, device)
                meta = json.loads(meta_path.read_text())
            except Exception as error:  # a torn, foreign or stale entry must never be used
                raise CacheMismatchError(f"cached model {path} does not fit: {error}") from error
            return CachedModel(model.eval(), meta, True, path)
        started = time.perf_counter()
        model = build()
        seconds = time.perf_counter() - started
        meta = {"namespace": namespace, "kind": kind, "spec": spec, "data_digest": data_digest,
                "training_code_version": TRAINING_CODE_VERSION, "train_seconds": seconds,
                "train_seconds_note": "informational: measured once when built; never divide by it",
                "device": str(device), "torch_threads": training_threads(device)}
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            codec.save(model, staging)
            (staging / "meta.json").write_text(json.dumps(meta, default=str))
            try:
                staging.rename(path)  # atomic: readers see the whole entry or none
            except OSError:  # another process stored the same entry first: theirs is identical
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return CachedModel(model.eval(), meta, False, path)

    def trained(self, namespace: str, task: TaskAdapter, factory: Callable[[int], nn.Module], examples: ExampleSet,
                recipe: TrainRecipe, device: torch.device, kind: str = "original",
                spec: Mapping[str, Any] | None = None) -> CachedModel:
        """``train_from_scratch(task, factory, examples, recipe)`` through the cache.

        ``namespace`` names the architecture ``factory`` builds; ``spec`` adds whatever else determines
        it (architecture settings); the recipe and the data digest are always part of the key.
        """
        full_spec = {"recipe": asdict(recipe), **(dict(spec) if spec else {})}
        return self.get_or_build(
            namespace, kind, full_spec, examples.digest(),
            build=lambda: train_from_scratch(task, factory, examples, recipe, device),
            codec=state_dict_codec(lambda: factory(recipe.seed)), device=device)
