"""Background precomputation of the training set's importance I_D for the next request (DESIGN.md, "Evidence
the gate can stand behind": "the next SSD request pays only its forget set").

SSD's I_D (:mod:`unlearn.importance`) depends on the model version and its training data, not on the
request; every job registers a new version, so without this the next SSD-family request would pay a pass
over the whole training set (for a 6-record subject out of ~1,200 records, ~200 forget-set passes). After
a job registers version v+1 (and after registration and start-up), the :class:`ImportancePrefetcher`
computes I_D for the serving version into the importance cache the pipeline reads, and the unchanged
model's scores on its never-trained ``tune`` records (:mod:`unlearn.heldout`: per-record loss and correctness,
what ``ssd-auto`` compares the forget set with before it dampens anything), so that a request on a model
that already scores its records like unseen ones pays one forward pass over its forget set:

- I_D only for models whose policy chain holds an SSD-family method, with each such method's batch size and
  variant (``lfssd`` is label-free); the tune scores for chains with a method that reads them
  (:data:`service.version_cache.TUNE_SCORE_READERS`);
- at the lowest priority: its thread is niced to 19, it starts only while no job runs, and claiming a job
  cancels a running precomputation between two batches (:class:`unlearn.errors.Cancelled`); it is retried
  once the job has ended (usually superseded by the version that job registers).

Derived state only: the cache may be deleted at any time and the pipeline recomputes what it misses.
"""

from __future__ import annotations

import logging
import os
import queue
import threading

from service import store as db
from service.context import ModelInfo, PipelineContext
from service.task_support import task_support
from service.version_cache import TUNE_SCORE_READERS, importance_dir, never_trained_sides
from unlearn import registry as methods
from unlearn.atomic_files import remove_stale_partials
from unlearn.errors import Cancelled
from unlearn.heldout import HeldOutCache, score
from unlearn.importance import ImportanceCache, TrainImportance

log = logging.getLogger(__name__)

SSD_FAMILY = {"ssd": "fisher", "ssd-auto": "fisher", "assd": "fisher", "lfssd": "label_free"}
"""Methods that read I_D, with the importance variant each uses."""


def importance_needs(info: ModelInfo) -> list[tuple[int, str]]:
    """(batch size, variant) of every SSD-family method in the model's chain."""
    needs = []
    for step in info.policy.method_chain:
        if step.name in SSD_FAMILY:
            config = methods.parse_config(step.name, step.params)
            needs.append((int(config.batch_size), SSD_FAMILY[step.name]))
    return sorted(set(needs))


class ImportancePrefetcher:
    def __init__(self, ctx: PipelineContext):
        self.ctx = ctx
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._idle = threading.Condition()
        self._jobs_running = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.completed: list[tuple[str, str]] = []  # (model, version) computed, for tests and logs

    def start(self) -> None:
        """Start (or, after :meth:`stop`, restart) the background thread. A restart begins with an empty queue:
        the engine schedules every model when it starts."""
        if self._thread is not None and self._thread.is_alive():
            if not self._stopping:
                return
            self._thread.join(timeout=60)  # a stop in progress: the old thread ends at its next check
        with self._idle:
            self._stopping = False
        self._queue = queue.Queue()  # a stop's end marker must not end the new thread
        remove_stale_partials(self.ctx.settings.cache_dir / "importance")  # what a killed writer left
        self._thread = threading.Thread(target=self._run, name="lethe-importance-prefetch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._idle:
            self._stopping = True
            self._idle.notify_all()
        self._queue.put(None)

    def schedule(self, model_name: str) -> None:
        """Compute I_D for ``model_name``'s serving version when nothing more urgent runs."""
        self._queue.put(model_name)

    def job_started(self) -> None:
        """A job was claimed: a running precomputation stops at its next batch, and none starts until no job
        runs."""
        with self._idle:
            self._jobs_running += 1

    def job_finished(self) -> None:
        with self._idle:
            self._jobs_running -= 1
            self._idle.notify_all()

    def _should_stop(self) -> bool:
        return self._jobs_running > 0 or self._stopping

    def _run(self) -> None:
        try:  # lowest CPU priority for this thread (Linux: per-thread nice value)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        while True:
            model_name = self._queue.get()
            if model_name is None:
                return
            with self._idle:  # lowest priority: wait until no job runs
                self._idle.wait_for(lambda: self._jobs_running == 0 or self._stopping)
                if self._stopping:
                    return
            try:
                self._compute(model_name)
            except Cancelled:
                log.debug("importance precomputation for %s gave way to a job; retried after it", model_name)
                self._queue.put(model_name)
            except Exception:  # derived state: a failure here must never affect a request
                log.exception("importance precomputation for %s failed", model_name)

    def _compute(self, model_name: str) -> None:
        with self.ctx.store.read() as conn:
            row = db.get_model(conn, model_name)
            if row is None:
                return
            info = ModelInfo.from_row(row)
            dataset = db.dataset_for_model_version(conn, model_name, info.serving_version)
        needs = importance_needs(info)
        wants_scores = any(step.name in TUNE_SCORE_READERS for step in info.policy.method_chain)
        if not (needs or wants_scores) or dataset is None:
            return
        support = task_support(info)
        model = support.load(self.ctx, model_name, info.serving_version)
        data = self.ctx.catalog.load(dataset.path, dataset.digest)
        examples_of = support.examples(data, model)
        directory = importance_dir(self.ctx, model_name, info.serving_version)
        if wants_scores and data.record_hashes is not None:  # the cheaper of the two first
            cache = HeldOutCache(directory)
            tune, _ = never_trained_sides(self.ctx, data)
            if tune.any() and cache.load(model, dataset.digest) is None:
                if self._should_stop():
                    raise Cancelled("a job was claimed")
                cache.store(score(support.task(), model, examples_of(tune), data.record_hashes[tune]), model,
                            dataset.digest)
        if needs:
            importance = TrainImportance(support.task(), examples_of(data.split_mask("train")),
                                         ImportanceCache(directory))
            for batch_size, variant in needs:
                importance.get(model, batch_size, variant, should_stop=self._should_stop)
        self.completed.append((model_name, info.serving_version))
        log.info("importance and tune scores of %s version %s precomputed (%s)", model_name,
                 info.serving_version, needs)
