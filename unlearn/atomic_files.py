"""Atomic writes of derived cache files, and removal of what a killed writer left half written.

A cache file is written to ``<name>.<pid>.partial`` beside its final path and renamed over it: readers see
the whole file or none. A process killed mid-write leaves its partial file behind; :func:`remove_stale_partials`
deletes the partial files of processes that are gone (the writer's pid is in the name), never one a live
process on this host is still writing. Cache directories are local to a host (``LETHE_STATE_DIR``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """Where this process writes ``path`` before renaming it into place."""
    return path.with_name(f"{path.name}.{os.getpid()}{SUFFIX}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(directory: Path) -> int:
    """Delete the partial files under ``directory`` whose writer is gone; the number deleted."""
    removed = 0
    for path in directory.rglob(f"*{SUFFIX}") if directory.exists() else ():
        pid_text = path.name[: -len(SUFFIX)].rpartition(".")[2]
        pid = int(pid_text) if pid_text.isdigit() else None
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue  # a write in progress, this process's or another live one's
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    if removed:
        log.info("removed %d half-written cache file(s) a killed process left under %s", removed, directory)
    return removed
