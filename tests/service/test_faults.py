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


def test_an_arm_file_fires_once_and_says_which_point(tmp_path):
    arm = tmp_path / "arm"
    assert _run(f"@{arm}").returncode == 0  # no file: nothing armed
    arm.write_text("b.after\n")
    result = _run(f"@{arm}")
    assert result.returncode == -signal.SIGKILL and result.stdout == "passed a\n"
    assert not arm.exists() and (tmp_path / "arm.fired").read_text() == "b.after"
    assert _run(f"@{arm}").returncode == 0  # fired once: the restarted process runs through


def test_every_fault_point_in_the_code_is_listed_and_every_listed_one_is_placed():
    import re
    from pathlib import Path

    from service.faults import INSIDE, POINTS, STAGES

    root = Path(__file__).resolve().parents[2] / "service"
    placed = set()
    for path in root.rglob("*.py"):
        placed |= set(re.findall(r'fault_point\(f?"([^"]+)"\)', path.read_text()))
    # Progress.stage places every "stage:<name>" through one f-string.
    expanded = {p for p in placed if "{" not in p} | {f"stage:{stage}" for stage in STAGES}
    assert expanded == set(POINTS)
    assert set(INSIDE) == set(STAGES) and all(f"stage:{stage}:inside" in placed for stage in STAGES)
