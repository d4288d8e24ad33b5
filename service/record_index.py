"""The record index: which records of a live dataset version a request names, answered by the job store.

Intake used to load each model's dataset and hash every subject id of it for every request (a Parquet read
plus N HMACs per model per request: the measured 24 acks/s of issue 11). The index holds, per live dataset
version, one row per record: the keyed hash of its record id (the tombstone form), the keyed hash of its
subject id, and its label. Intake counts matches with one indexed query (:func:`match_counts`).

It is maintained where dataset versions change:

- after registration (:meth:`service.engine.Engine.register_model`) and after every job, by the process that
  ran it (:func:`service.executors.after_job`), :func:`index_serving` indexes the lineage's serving version;
- a version whose copies are purged loses its rows with it (:func:`service.store.mark_dataset_removed`);
- intake indexes lazily (:func:`ensure_indexed`) a serving version nobody indexed yet (a store created before
  the index existed, or a request racing the indexing after a job). Indexing is idempotent and safe when
  several processes race: one transaction per version, guarded by the version row's lock.

Only keyed hashes are stored (DESIGN.md: no subject id in clear in the store).
"""

from __future__ import annotations

import logging

from service import store as db
from service.context import PipelineContext

log = logging.getLogger(__name__)


def ensure_indexed(ctx: PipelineContext, dataset_row) -> None:
    """Index ``dataset_row`` (a ``dataset_versions`` row) unless it already is."""
    if dataset_row.indexed_at is not None:
        return
    data = ctx.catalog.load(dataset_row.path, dataset_row.digest)
    rows = ({"record_hash": record_hash, "subject_hash": subject_hash,
             "label": int(label) if label >= 0 else None}
            for record_hash, subject_hash, label in zip(data.record_hashes, data.subject_hashes, data.labels))
    with ctx.store.write() as conn:
        if db.index_dataset(conn, dataset_row.id, rows):
            log.info("indexed %d record(s) of %s dataset version %d", len(data), dataset_row.model_name,
                     dataset_row.version)


def index_serving(ctx: PipelineContext, model_name: str) -> None:
    """Index the dataset version of ``model_name``'s serving version (after registration or a job)."""
    with ctx.store.read() as conn:
        model = db.get_model(conn, model_name)
        row = db.dataset_for_model_version(conn, model_name, model.serving_version) if model else None
    if row is not None and row.removed_at is None:
        ensure_indexed(ctx, row)
