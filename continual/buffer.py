"""A replay buffer that supports deletion: rows keyed by record id and subject hash, purged on erasure.

Experience replay and DER++ (Buzzega et al., arXiv 2004.07211) keep raw records, their labels and the
logits z the model gave them when they entered the buffer. All of it is personal data, so:

- every row carries the record id and the keyed subject hash of its record (the service's hashes, never a
  subject id), and :meth:`ReplayBuffer.purge` removes every row of the given record ids, subject hashes or
  classes, with its stored logits, in one call;
- the stored logits of the rows that REMAIN were computed by a model that had seen the erased data, so a
  purge marks them stale (``logits_stale``) and the next replay update recomputes them with its base model,
  the current post-erasure version (:meth:`refresh_logits`) before it trains: no cached logit predates the
  latest erasure on the lineage (CONTINUAL.md's invariant);
- the buffer persists as ``buffer.safetensors`` (the tensors) plus ``manifest.json`` (keys, counters, the
  field layout and the SHA-256 of the tensor file). :meth:`load` verifies all of it and refuses a buffer
  whose files do not match (:class:`~continual.errors.BufferIntegrityError`); a purged buffer is written
  as new files that replace the old ones, so no purged row survives on disk either.

Reservoir sampling (Vitter's algorithm R, as DER's reference): the n-th record ever offered (n counted from
0, ``seen``) takes a free slot while there is one, else replaces slot j with j drawn uniformly from [0, n]
when j < capacity. The draw for the n-th offer depends only on (``seed``, n), so a reloaded buffer continues
exactly as an unsaved one would. A record id that is already buffered is refreshed in place (its example
and logits replaced) and does not count as a new offer.

Causal-LM rows are right-padded to the widest sequence held (:mod:`continual.examples`); their stored logits
are [rows, width, vocabulary].
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from continual.errors import BufferIntegrityError
from continual.examples import is_sequence_field, pad_width
from unlearn.data import Batch, ExampleSet
from unlearn.errors import InvalidDataError, InvalidParameterError
from unlearn.tasks import TaskAdapter, eval_mode

FORMAT = "lethe-replay-buffer/1"
TENSORS_FILE = "buffer.safetensors"
MANIFEST_FILE = "manifest.json"
_EXAMPLE_PREFIX = "example."
_LOGITS = "logits"


class ReplayBuffer:
    """Reservoir of (example fields, stored logits z, record id, subject hash) rows; ``capacity`` rows at most.

    Mutates in place: :meth:`offer`, :meth:`purge` and :meth:`refresh_logits` change this object; strategies
    work on :meth:`copy` and return the buffer to persist.
    """

    def __init__(self, capacity: int, seed: int = 0):
        if not 1 <= capacity <= 10_000_000:
            raise InvalidParameterError("capacity", f"must be in [1, 1e7], got {capacity}")
        self.capacity = capacity
        self.seed = seed
        self.fields: dict[str, Tensor] = {}
        self.logits: Tensor | None = None
        self.record_ids: list[str] = []
        self.subject_hashes: list[str] = []
        self.seen = 0
        self.logits_stale = False

    def __len__(self) -> int:
        return len(self.record_ids)

    def copy(self) -> ReplayBuffer:
        return copy.deepcopy(self)

    # ---- filling ---------------------------------------------------------------------------------------
    def offer(self, examples: ExampleSet, logits: Tensor, record_ids: Sequence[str],
              subject_hashes: Sequence[str]) -> int:
        """Offer rows to the reservoir (module docstring); returns how many rows were written."""
        count = len(examples)
        if not (len(logits) == len(record_ids) == len(subject_hashes) == count):
            raise InvalidDataError("buffer", f"{count} examples, {len(logits)} logits, {len(record_ids)} record ids "
                                   f"and {len(subject_hashes)} subject hashes: they must match")
        if self.fields and set(self.fields) != set(examples.tensors):
            raise InvalidDataError("buffer", f"rows with fields {sorted(examples.tensors)} cannot join a buffer of "
                                   f"{sorted(self.fields)}")
        owners = list(self.record_ids)  # record id held by each slot once the plan is applied
        slot_of = {record: slot for slot, record in enumerate(owners)}
        plan = []
        for row in range(count):
            record = record_ids[row]
            if record in slot_of:  # already buffered: refresh in place, not a new offer
                plan.append((slot_of[record], row))
                continue
            offered = self.seen
            self.seen += 1
            if len(owners) < self.capacity:
                slot = len(owners)
                owners.append(record)
            else:
                slot = random.Random(self.seed * 1_000_000_007 + offered).randrange(offered + 1)
                if slot >= self.capacity:
                    continue
                del slot_of[owners[slot]]
                owners[slot] = record
            slot_of[record] = slot
            plan.append((slot, row))
        size = len(owners)
        if not plan:
            return 0
        self._grow(size, examples, logits)
        new_fields = {name: self._fit(name, tensor) for name, tensor in examples.tensors.items()}
        new_logits = self._fit(_LOGITS, logits.detach().to("cpu", torch.float32))
        for slot, row in plan:  # in order: a later row that drew the same slot wins, as in the sequential algorithm
            for name, tensor in new_fields.items():
                self.fields[name][slot] = tensor[row]
            self.logits[slot] = new_logits[row]
            self.record_ids[slot] = record_ids[row]
            self.subject_hashes[slot] = subject_hashes[row]
        return len(plan)

    def _grow(self, size: int, examples: ExampleSet, logits: Tensor) -> None:
        """Make room for ``size`` rows, and widen sequence fields to the incoming width."""
        incoming = {name: t.detach().cpu() for name, t in examples.tensors.items()}
        incoming[_LOGITS] = logits.detach().to("cpu", torch.float32)
        current = dict(self.fields)
        if self.logits is not None:
            current[_LOGITS] = self.logits
        grown = {}
        for name, new in incoming.items():
            old = current.get(name)
            if old is None:
                old = new.new_zeros((0, *new.shape[1:]))
            if is_sequence_field(name, new) and old.dim() >= 2:
                old = pad_width(old, max(old.shape[1], new.shape[1]))
            extra = size - old.shape[0]
            grown[name] = torch.cat([old, old.new_zeros((extra, *old.shape[1:]))]) if extra > 0 else old
        self.logits = grown.pop(_LOGITS)
        self.fields = grown
        self.record_ids.extend([""] * (size - len(self.record_ids)))
        self.subject_hashes.extend([""] * (size - len(self.subject_hashes)))

    def _fit(self, name: str, tensor: Tensor) -> Tensor:
        """``tensor`` (incoming rows) padded to the buffer's width for a sequence field, checked otherwise."""
        held = self.logits if name == _LOGITS else self.fields[name]
        tensor = tensor.detach().cpu()
        if is_sequence_field(name, tensor):
            tensor = pad_width(tensor, held.shape[1])
        if tensor.shape[1:] != held.shape[1:] or tensor.dtype != held.dtype:
            raise InvalidDataError(f"buffer.{name}", f"rows of shape {tuple(tensor.shape[1:])} ({tensor.dtype}) "
                                   f"do not fit a buffer of {tuple(held.shape[1:])} ({held.dtype})")
        return tensor

    # ---- reading ---------------------------------------------------------------------------------------
    def examples(self) -> ExampleSet:
        """Every buffered row's example fields (no logits)."""
        if not self.fields:
            raise InvalidDataError("buffer", "is empty")
        return ExampleSet(dict(self.fields))

    def sample(self, size: int, generator: torch.Generator, device: torch.device | None = None) -> tuple[Batch, Tensor]:
        """``min(size, len)`` distinct rows drawn with ``generator``: (example fields, stored logits)."""
        if len(self) == 0:
            raise InvalidDataError("buffer", "cannot sample from an empty buffer")
        index = torch.randperm(len(self), generator=generator)[: min(size, len(self))]
        batch = {name: tensor[index].to(device) if device else tensor[index] for name, tensor in self.fields.items()}
        logits = self.logits[index]
        return batch, logits.to(device) if device else logits

    # ---- deletion --------------------------------------------------------------------------------------
    def purge(self, record_ids: Iterable[str] = (), subject_hashes: Iterable[str] = (),
              classes: Iterable[int] = ()) -> int:
        """Remove every row of these records, subjects or classes (by ``labels``), with its stored logits.

        Returns the number of rows removed. Marks the remaining logits stale (even when nothing was
        removed: an erasure happened on the lineage, and the model that computed them had seen its data).
        """
        records, subjects, labels = set(record_ids), set(subject_hashes), {int(c) for c in classes}
        if labels and "labels" not in self.fields and len(self):
            raise InvalidDataError("classes", "this buffer holds no class labels (not a classification buffer)")
        drop = [r in records or s in subjects for r, s in zip(self.record_ids, self.subject_hashes)]
        if labels and len(self):
            in_class = torch.isin(self.fields["labels"], torch.tensor(sorted(labels), dtype=torch.long))
            drop = [d or bool(c) for d, c in zip(drop, in_class.tolist())]
        keep = torch.tensor([not d for d in drop], dtype=torch.bool)
        removed = int((~keep).sum())
        if removed:
            self.fields = {name: tensor[keep].clone() for name, tensor in self.fields.items()}
            self.logits = self.logits[keep].clone()
            self.record_ids = [r for r, k in zip(self.record_ids, keep.tolist()) if k]
            self.subject_hashes = [s for s, k in zip(self.subject_hashes, keep.tolist()) if k]
        self.logits_stale = True
        return removed

    @torch.no_grad()
    def refresh_logits(self, task: TaskAdapter, model: nn.Module, batch_size: int = 256) -> None:
        """Recompute every stored logit with ``model`` (eval mode; its mode is restored); clears ``logits_stale``."""
        if len(self):
            device = next(iter(model.parameters())).device
            with eval_mode(model):
                outputs = [task.outputs(model, batch).to("cpu", torch.float32)
                           for batch in self.examples().batches(batch_size, device)]
            self.logits = torch.cat(outputs)
        self.logits_stale = False

    # ---- persistence -----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``buffer.safetensors`` then ``manifest.json`` (each atomically) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {_EXAMPLE_PREFIX + name: t.contiguous() for name, t in self.fields.items()}
        if self.logits is not None:
            tensors[_LOGITS] = self.logits.contiguous()
        partial = directory / (TENSORS_FILE + ".partial")
        save_file(tensors, str(partial))
        manifest = {
            "format": FORMAT, "capacity": self.capacity, "seed": self.seed, "seen": self.seen, "rows": len(self),
            "logits_stale": self.logits_stale, "record_ids": self.record_ids, "subject_hashes": self.subject_hashes,
            "tensors": {name: {"dtype": str(t.dtype), "shape": list(t.shape)} for name, t in tensors.items()},
            "tensors_sha256": _sha256(partial),
        }
        partial.replace(directory / TENSORS_FILE)
        manifest_partial = directory / (MANIFEST_FILE + ".partial")
        manifest_partial.write_text(json.dumps(manifest, indent=1))
        manifest_partial.replace(directory / MANIFEST_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ReplayBuffer:
        """Read a saved buffer, verifying the tensor file's hash, the layout and the keys against the manifest."""
        directory = Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST_FILE).read_text())
        except (OSError, ValueError) as error:
            raise BufferIntegrityError(f"replay buffer manifest in {directory} is unreadable: {error}") from error
        if manifest.get("format") != FORMAT:
            raise BufferIntegrityError(f"{directory} is not a {FORMAT} buffer")
        path = directory / TENSORS_FILE
        if not path.exists() or _sha256(path) != manifest.get("tensors_sha256"):
            raise BufferIntegrityError(f"replay buffer tensors in {directory} do not match the manifest's hash")
        try:
            tensors = load_file(str(path))
        except Exception as error:  # a foreign file must never be trusted
            raise BufferIntegrityError(f"replay buffer tensors in {directory} are unreadable: {error}") from error
        layout = {name: {"dtype": str(t.dtype), "shape": list(t.shape)} for name, t in tensors.items()}
        rows = manifest["rows"]
        record_ids, subject_hashes = manifest["record_ids"], manifest["subject_hashes"]
        if layout != manifest["tensors"] or any(t.shape[0] != rows for t in tensors.values()):
            raise BufferIntegrityError(f"replay buffer tensors in {directory} do not have the manifest's layout")
        if not (len(record_ids) == len(subject_hashes) == rows) or len(set(record_ids)) != rows:
            raise BufferIntegrityError(f"replay buffer keys in {directory} are inconsistent (counts or duplicates)")
        if rows > manifest["capacity"] or manifest["seen"] < rows or (rows and _LOGITS not in tensors):
            raise BufferIntegrityError(f"replay buffer counters in {directory} are inconsistent")
        buffer = cls(manifest["capacity"], manifest["seed"])
        buffer.seen, buffer.logits_stale = manifest["seen"], manifest["logits_stale"]
        buffer.record_ids, buffer.subject_hashes = list(record_ids), list(subject_hashes)
        buffer.fields = {name[len(_EXAMPLE_PREFIX):]: t for name, t in tensors.items() if name.startswith(_EXAMPLE_PREFIX)}
        buffer.logits = tensors.get(_LOGITS)
        return buffer


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
