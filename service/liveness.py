"""Liveness locks: on a SQLite job store, tell at once that a lease holder's process is gone.

A SQLite store lives on one host's local file system (its WAL needs shared memory), so every process using
it can see one directory beside the database file, ``<db>.leases/``. Each lease holder keeps an exclusive
``flock`` on ``<owner>.lock`` there for as long as it may hold leases; the kernel drops that lock when the
process dies, ``kill -9`` included. A claimer that can take the lock knows the holder is gone and reclaims
its jobs without waiting out ``job_lease_s``: an embedded ``lethe serve`` restarted after a crash resumes
its job immediately, as it did before leases existed.

PostgreSQL stores are shared by hosts that see no common file system: there, lease expiry alone decides
(the lock directory is not used).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


class LivenessLocks:
    def __init__(self, directory: Path | None):
        self.directory = directory
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_store(cls, store) -> LivenessLocks:
        if not store.is_sqlite:
            return cls(None)
        database = store.engine.url.database
        if not database or database == ":memory:":
            return cls(None)
        return cls(Path(database).absolute().with_name(Path(database).name + ".leases"))

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def _path(self, owner: str) -> Path:
        return self.directory / (re.sub(r"[^A-Za-z0-9._-]", "_", owner) + ".lock")

    def hold(self, owner: str) -> None:
        """Lock ``owner``'s file for the life of this process (idempotent)."""
        if not self.enabled:
            return
        with self._lock:
            if owner in self._held:
                return
            self.directory.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self._path(owner), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # owners are unique: never contended
            self._held[owner] = descriptor

    def release_all(self, still_leased: Iterable[str] = ()) -> None:
        """Unlock every owner of this process. The file of an owner that still has RUNNING leases (a job
        abandoned mid-way) stays, unlocked: the next claimer sees it dead and reclaims at once."""
        keep = set(still_leased)
        with self._lock:
            for owner, descriptor in self._held.items():
                if owner not in keep:
                    self._path(owner).unlink(missing_ok=True)
                os.close(descriptor)
            self._held.clear()

    def dead_owners(self, owners: Iterable[str]) -> list[str]:
        """The owners among ``owners`` whose process is gone (their lock file exists and is unlocked)."""
        if not self.enabled:
            return []
        dead = []
        for owner in owners:
            with self._lock:
                if owner in self._held:
                    continue
            path = self._path(owner)
            try:
                descriptor = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue  # released cleanly (or never held here): the lease's expiry decides
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # alive
            else:
                dead.append(owner)
                path.unlink(missing_ok=True)
            finally:
                os.close(descriptor)
        return dead
