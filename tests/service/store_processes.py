"""Entry points of the processes the store tests spawn. Kept apart from the test modules so that a spawned
interpreter imports the store and the audit log only (no torch, no MLflow): seconds, not a minute."""

from __future__ import annotations

import time

from service import migrations
from service import store as db
from service.audit import AuditLog


def open_store(url: str) -> str:
    """Open (and so migrate) the store; returns the revision found afterwards."""
    store = db.Store(url)
    with store.read() as conn:
        revision = migrations.current_revision(conn)
    store.dispose()
    return revision


def append_log(url: str, key: bytes, writer: int, transactions: int) -> None:
    """``transactions`` transactions, each one event and one audit entry, with a pause between the two."""
    store = db.Store(url, migrate=False)
    audit = AuditLog(key)
    for index in range(transactions):
        with store.write() as conn:
            db.add_event(conn, f"job-{writer}", (), "PROGRESS", "RUNNING", "apply", 0.5, f"{writer}/{index}")
            time.sleep(0.002)  # widen the window in which another process's transaction interleaves
            audit.append(conn, "test", {"writer": writer, "index": index})
    store.dispose()
