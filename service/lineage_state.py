"""What continual learning keeps for a model lineage between updates, and how every erasure purges it.

CONTINUAL.md: everything a strategy keeps is derived from training data, so it is personal data too. Per
lineage, under ``<state>/continual/<model>/``:

- ``buffer/``: the replay buffer (:class:`continual.buffer.ReplayBuffer`), rows keyed by the KEYED HASH of
  their record id (never a clear id) and the subject hash;
- ``state.safetensors``: a strategy's carried state (online EWC's Fisher), bound to the weights it was
  computed for (:class:`continual.state.StrategyState`): it is ignored whenever the model it starts from has
  other weights, so an erasure (which always makes a new version) invalidates it.

An update job writes the state it produced under ``pending/<job id>/`` before its version is registered and
:func:`promote` moves it into place when the job finishes (a job that is rejected or dies leaves nothing
behind but scratch). Every erasure job, before it completes, :func:`purge_erased` removes from the buffer
every row of its records, subjects and classes and deletes the carried state (computed on data that held
them). When no buffer exists (a new lineage, or a worker on another host), a strategy starts from one built
from the lineage's CURRENT training data, which by construction holds no erased record.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from service.context import PipelineContext
from service.datasets import safe_name


def lineage_dir(ctx: PipelineContext, model_name: str) -> Path:
    return ctx.settings.state_dir / "continual" / safe_name(model_name)


def load_buffer(ctx: PipelineContext, model_name: str):
    """The lineage's replay buffer, or None when none is kept here."""
    from continual.buffer import ReplayBuffer

    directory = lineage_dir(ctx, model_name) / "buffer"
    return ReplayBuffer.load(directory) if (directory / "manifest.json").exists() else None


def load_state(ctx: PipelineContext, model_name: str):
    """The strategy state carried from the last update, or None (a strategy checks it belongs to its model)."""
    from continual.state import StrategyState

    path = lineage_dir(ctx, model_name) / "state.safetensors"
    return StrategyState.load(path) if path.exists() else None


def save_pending(ctx: PipelineContext, model_name: str, job_id: str, buffer, state) -> None:
    """An update's buffer and state, kept aside until its version is registered and the job finishes."""
    pending = lineage_dir(ctx, model_name) / "pending" / job_id
    shutil.rmtree(pending, ignore_errors=True)
    pending.mkdir(parents=True)
    if buffer is not None:
        buffer.save(pending / "buffer")
    if state is not None:
        state.save(pending / "state.safetensors")


def promote(ctx: PipelineContext, model_name: str, job_id: str) -> None:
    """The finished update's buffer and state become the lineage's (idempotent: a resumed job repeats it)."""
    root = lineage_dir(ctx, model_name)
    pending = root / "pending" / job_id
    if not pending.exists():
        return
    for name in ("buffer", "state.safetensors"):
        source, target = pending / name, root / name
        if source.exists():
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            source.replace(target)
    shutil.rmtree(pending, ignore_errors=True)


def purge_erased(ctx: PipelineContext, model_name: str, resolution: dict[str, Any],
                 subject_hashes: list[str] = (), classes: list[int] = ()) -> dict[str, Any]:
    """An erasure's duty towards continual state: no buffer row of an erased record, subject or class survives
    on disk, and the carried state (derived from data that held them) is deleted. Idempotent."""
    root = lineage_dir(ctx, model_name)
    removed = 0
    buffer = load_buffer(ctx, model_name)
    if buffer is not None:
        removed = buffer.purge(record_ids=resolution.get("tombstones", ()), subject_hashes=subject_hashes,
                               classes=classes)
        buffer.save(root / "buffer")
    (root / "state.safetensors").unlink(missing_ok=True)
    shutil.rmtree(root / "pending", ignore_errors=True)  # an update in flight starts again from the new version
    return {"buffer_rows_removed": removed, "carried_state_deleted": True}
