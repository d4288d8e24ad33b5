"""Leader/follower group commit: concurrent callers share one transaction, and so one fsync.

Used by intake (:mod:`service.intake`): each acknowledgement waits for its own request's commit, so without
grouping every ack pays a whole transaction and its fsync; with it, the requests that arrive while one commit
is in flight are committed together by the next.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class _Slot:
    def __init__(self, item):
        self.item = item
        self.ready = threading.Event()
        self.lead = False  # woken to commit the next batch rather than with a result
        self.done = False
        self.result = None


class GroupCommit:
    """Commits concurrent submissions together: leader/follower group commit.

    A caller enqueues its item. If no batch is being committed it leads: it takes everything queued (up to
    ``max_batch``), commits it with ``commit_batch`` in one transaction, hands each waiter its own result,
    and passes the lead to the first item that arrived meanwhile (so no caller keeps committing others'
    batches while its own answer waits). Batches form by themselves while a commit is in flight: no timer,
    no added latency when the load is light. If a batch's transaction fails as a whole (a lost race with
    another replica, a database error), its items are retried one per transaction, so one item's trouble
    is only that item's.
    """

    def __init__(self, commit_batch, max_batch: int = 256):
        self._commit_batch = commit_batch
        self.max_batch = max_batch
        self._mutex = threading.Lock()
        self._queue: list[_Slot] = []
        self._leading = False

    def submit(self, item):
        slot = _Slot(item)
        with self._mutex:
            self._queue.append(slot)
            if not self._leading:
                self._leading = slot.lead = True
        while not slot.done:
            if slot.lead:
                self._lead()
            else:
                slot.ready.wait()
                slot.ready.clear()
        if isinstance(slot.result, BaseException):
            raise slot.result
        return slot.result

    def _lead(self) -> None:
        with self._mutex:
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
        try:
            results = self._commit_batch([slot.item for slot in batch])
        except Exception:
            log.warning("a group commit of %d submission(s) failed; committing them one by one", len(batch),
                        exc_info=True)
            results = []
            for slot in batch:
                try:
                    results.append(self._commit_batch([slot.item])[0])
                except Exception as error:  # this item's own failure
                    results.append(error)
        for slot, result in zip(batch, results):
            slot.result, slot.done, slot.lead = result, True, False
        with self._mutex:
            if self._queue:
                self._queue[0].lead = True
                self._queue[0].ready.set()
            else:
                self._leading = False
        for slot in batch:
            slot.ready.set()
