"""The newest events, read from the store once per change for every reader in this process.

Every Session stream's poller and every WatchJob waits for new events (``engine.events`` with a wait), and
every commit wakes them all. When each waiter read the store itself, a commit cost one query per open stream,
each with the stream's whole watch set as an IN list: with 8 streams that was more CPU than the commit
(issue 11's profile). The feed reads what was committed since its last read ONCE, when a waiter finds the
store changed, keeps the newest events in memory, and answers each waiter with a filter in memory.

Why nothing is missed: event seqs commit in increasing order (the log lock on PostgreSQL, the single writer
on SQLite: :mod:`service.store`), so after a read up to seq ``n``, every event committed later has a seq above
``n``. The feed therefore holds EVERY event in ``(floor, newest]``; a cursor below ``floor`` (an old Resume, a
backfill from 0) gets ``None`` and is answered by the store, as before.

Writes of other processes wake no waiter here: a waiter re-reads after at most ``IDLE_WAIT_S``
(:mod:`service.queries`), and the feed reads the store again when its last read is ``STALE_S`` old, so such a
write is seen within about ``IDLE_WAIT_S + STALE_S``.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Sequence

from service import store as db
from service.domain import JobEvent

CAPACITY = 10_000
"""Events kept in memory (a few MiB). A cursor older than the oldest kept event reads the store."""

STALE_S = 0.1
"""Age of the last read after which the feed reads the store again even if this process wrote nothing."""

READ_LIMIT = 1000
"""Events read per statement when catching up."""


class EventFeed:
    """See the module docstring. ``to_event(conn, row)`` turns an ``events`` row into a :class:`JobEvent`."""

    def __init__(self, store: db.Store, to_event: Callable[..., JobEvent], capacity: int = CAPACITY,
                 stale_s: float = STALE_S):
        self._store = store
        self._to_event = to_event
        self._capacity = capacity
        self._stale_s = stale_s
        self._lock = threading.Lock()
        self._events: list[JobEvent] = []  # every event with seq in (floor, newest], in seq order
        self._seqs: list[int] = []  # their seqs, for bisect
        self._floor: int | None = None  # None until the first read
        self._newest = 0
        self._read_generation: int | None = None
        self._read_at = 0.0

    def after(self, after_seq: int, job_ids: Sequence[str] = (), request_ids: Sequence[str] = (),
              limit: int = 1000) -> list[JobEvent] | None:
        """What :func:`service.store.events_after` returns for these arguments, as of now; None when
        ``after_seq`` lies below the events the feed holds (ask the store)."""
        with self._lock:
            self._catch_up()
            if after_seq < self._floor:
                return None
            start = bisect.bisect_right(self._seqs, after_seq)
            if not (job_ids or request_ids):
                return self._events[start:start + limit]
            jobs, requests = set(job_ids), set(request_ids)
            selected = []
            for event in self._events[start:]:
                if event.job_id in jobs or not requests.isdisjoint(event.request_ids):
                    selected.append(event)
                    if len(selected) == limit:
                        break
            return selected

    def _catch_up(self) -> None:
        """Read the events committed since the last read, if the store may have changed."""
        generation = self._store.generation()  # before reading: a commit during the read changes it again
        if generation == self._read_generation and time.monotonic() - self._read_at < self._stale_s:
            return
        read, caught_up = 0, False
        with self._store.read() as conn:
            if self._floor is None:  # the first read: the feed holds from now on
                self._floor = self._newest = db.last_event_seq(conn)
            while not caught_up and read < self._capacity:  # a larger backlog: the rest on the next call
                rows = db.events_after(conn, self._newest, (), (), limit=READ_LIMIT)
                for row in rows:
                    self._events.append(self._to_event(conn, row))
                    self._seqs.append(row.seq)
                if rows:
                    self._newest = rows[-1].seq
                read += len(rows)
                caught_up = len(rows) < READ_LIMIT
        if len(self._events) > self._capacity:
            dropped = len(self._events) - self._capacity
            self._floor = self._seqs[dropped - 1]
            del self._events[:dropped], self._seqs[:dropped]
        self._read_generation = generation if caught_up else None
        self._read_at = time.monotonic()
