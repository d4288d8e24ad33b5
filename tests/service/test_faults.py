"""The fault-injection hook kills its process at the named point, and only there (issue 15's crash matrix
builds on it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

SCRIPT = "from service.faults import fault_point; fault_point('a.before'); print('passed a', flush=True); " \
         "fault_point('b.after'); print('passed b', flush=True)"


def _run(kill_at: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LETHE_FAULT_KILL_AT"}
    if kill_at is not None:
        env["LETHE_FAULT_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)


def test_fault_points_are_inert_without_the_variable():
    result = _run(None)
    assert result.returncode == 0 and result.stdout.split("\n")[:2] == ["passed a", "passed b"]


def test_a_named_point_kills_the_process_like_kill_9():
    result = _run("other,b.after")
    assert result.returncode == -signal.SIGKILL and result.stdout == "passed a\n"
