"""The in-process event feed (:mod:`service.event_feed`) on SQLite and PostgreSQL (``store_url``): whatever
it answers is what the store answers (:func:`service.store.events_after`), for every cursor it holds, every
selector and limit; a cursor below what it holds is left to the store; other processes' writes are seen
once its last read is ``stale_s`` old."""

from __future__ import annotations

from service import store as db
from service.event_feed import EventFeed


def _append(store: db.Store, count: int, start: int) -> None:
    with store.write() as conn:
        for index in range(start, start + count):
            db.add_event(conn, f"job-{index % 3}", [f"r-{index % 5}", f"q-{index % 7}"] if index % 2 else [],
                         "PROGRESS", "RUNNING", "apply", 0.5, f"event {index}")


def _as_store_answers(store: db.Store, feed: EventFeed, cursors) -> None:
    selectors = [((), ()), (("job-1",), ()), ((), ("r-2",)), (("job-0",), ("r-3", "q-4")), (("none",), ("none",))]
    with store.read() as conn:
        for after_seq in cursors:
            for job_ids, request_ids in selectors:
                for limit in (1000, 3):
                    expected = [row.seq for row in db.events_after(conn, after_seq, job_ids, request_ids, limit)]
                    answered = [row.seq for row in feed.after(after_seq, job_ids, request_ids, limit)]
                    assert answered == expected, (after_seq, job_ids, request_ids, limit)


def test_the_feed_answers_as_the_store_does(store_url):
    store = db.Store(store_url)
    other_process = db.Store(store_url, migrate=False)  # its writes do not wake `store`'s waiters
    try:
        _append(store, 4, 0)
        feed = EventFeed(store, lambda conn, row: row, stale_s=0.0)
        # Its first read: the feed holds the events after the newest one (seq 4) from then on.
        assert feed.after(0) is None, "a cursor below what the feed holds is the store's to answer"
        _append(store, 10, 4)
        _append(other_process, 10, 14)
        _as_store_answers(store, feed, range(4, 26))
    finally:
        store.dispose()
        other_process.dispose()


def test_another_process_s_writes_are_read_once_the_last_read_is_stale(store_url):
    store = db.Store(store_url)
    other_process = db.Store(store_url, migrate=False)
    try:
        feed = EventFeed(store, lambda conn, row: row, stale_s=3600.0)
        assert feed.after(0) == []
        _append(other_process, 2, 0)
        assert feed.after(0) == [], "no write of this process since the last read, which is fresh"
        _append(store, 1, 2)  # a write here changes the store's generation: the feed reads everything since
        assert [row.message for row in feed.after(0)] == ["event 0", "event 1", "event 2"]
    finally:
        store.dispose()
        other_process.dispose()


def test_a_full_feed_drops_its_oldest_events_and_leaves_their_cursors_to_the_store(store_url):
    store = db.Store(store_url)
    try:
        feed = EventFeed(store, lambda conn, row: row, capacity=5, stale_s=0.0)
        assert feed.after(0) == []
        _append(store, 12, 0)
        assert [row.seq for row in feed.after(7)] == list(range(8, 13))
        assert feed.after(6) is None, "events 1-7 were dropped"
        _as_store_answers(store, feed, range(7, 14))
    finally:
        store.dispose()
