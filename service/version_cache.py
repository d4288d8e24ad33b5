"""Derived state of one model version that does not depend on a request: where it lives and how a job reads it.

Per (model, version) directory under the cache root: the training set's importance I_D
(:class:`unlearn.importance.ImportanceCache`) and the unchanged model's scores on its never-trained ``tune``
records (:class:`unlearn.heldout.HeldOutCache`). :mod:`service.prefetch` computes both in the background
after a version is registered; the pipeline reads them and recomputes what is missing; a job that
supersedes the version deletes the directory with the rest of the old version's data. Derived state only:
the directory may be deleted at any time.

In memory, :class:`service.loaded_models.LoadedModels` keeps the model objects themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from torch import nn

from service.context import PipelineContext
from service.datasets import LoadedDataset, safe_name
from unlearn.errors import CacheMismatchError
from unlearn.heldout import HeldOutCache, HeldOutScores
from unlearn.splits import audit_mask

log = logging.getLogger(__name__)

TUNE_SCORE_READERS = frozenset({"ssd-auto", "shrink-perturb", "unseen-kd", "simnpo+rt"})
"""Methods that read the unchanged model's tune scores (``UnlearnRequest.tune_scores``)."""


def importance_dir(ctx: PipelineContext, model_name: str, version: str) -> Path:
    return ctx.settings.cache_dir / "importance" / safe_name(model_name) / version


def never_trained_sides(ctx: PipelineContext, data: LoadedDataset) -> tuple[np.ndarray, np.ndarray]:
    """(tune, audit) masks of ``data``'s never-trained records, dealt by keyed hash of the record id
    (:mod:`unlearn.splits`): stable across dataset versions. A job removes its own records from both."""
    holdout = data.split_mask("holdout")
    audit_side = audit_mask(data.record_ids.astype(str), ctx.settings.split_key_bytes)
    return holdout & ~audit_side, holdout & audit_side


def tune_scores(ctx: PipelineContext, model_name: str, version: str, model: nn.Module, data: LoadedDataset,
                dataset_digest: str, tune: np.ndarray) -> HeldOutScores | None:
    """The version's precomputed tune scores restricted to the records of ``tune`` (a mask of ``data``), in
    their order; None when they are not (yet) computed, do not cover those records, or do not match the
    model's weights (never used then: the method computes them)."""
    if data.record_hashes is None:
        return None
    try:
        scores = HeldOutCache(importance_dir(ctx, model_name, version)).load(model, dataset_digest)
    except CacheMismatchError as error:
        log.warning("ignoring precomputed tune scores of %s version %s: %s", model_name, version, error)
        return None
    return None if scores is None else scores.select(data.record_hashes[tune])
