"""Derived cache files are written under a per-process partial name; a killed writer's leftovers are removed."""

from __future__ import annotations

import os
import subprocess
import sys

from unlearn.atomic_files import partial_path, remove_stale_partials


def test_only_partials_of_gone_processes_are_removed(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    nested = tmp_path / "model" / "3"
    nested.mkdir(parents=True)
    stale = nested / f"importance-ab.safetensors.{dead_pid}.partial"
    legacy = nested / "heldout-cd.partial"  # the old naming, without a writer: a leftover
    own = partial_path(nested / "heldout-ef.npz")
    live = nested / f"importance-gh.safetensors.{os.getppid()}.partial"  # a live process is writing it
    finished = nested / "importance-ab.safetensors"
    for path in (stale, legacy, own, live, finished):
        path.write_bytes(b"x")
    assert own.name == f"heldout-ef.npz.{os.getpid()}.partial"
    assert remove_stale_partials(tmp_path) == 2
    assert not stale.exists() and not legacy.exists()
    assert own.exists() and live.exists() and finished.exists()
    assert remove_stale_partials(tmp_path / "missing") == 0
