"""examples/byom/byom.py end to end, as a platform team runs it: train, log, write Parquet, `lethe dataset check`,
`lethe serve`, `lethe register`, erase one patient, verify the certificate, and load the registered and the new
version each in a fresh process (issue 10). Several minutes on 2 shared cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "byom" / "byom.py"

# The whole script runs once per module (1-2.5 min on 2 shared cores: train, log, serve, erase, load in fresh processes): every
# test here needs it, so every test is long (`make test` leaves them out, `make test-all` runs them).
pytestmark = [pytest.mark.slow, pytest.mark.long]


@pytest.fixture(scope="module")
def byom(tmp_path_factory):
    state = tmp_path_factory.mktemp("byom")
    done = subprocess.run([sys.executable, str(SCRIPT), "--state-dir", str(state)], capture_output=True, text=True,
                          timeout=1800)
    lines = done.stdout.strip().splitlines()
    assert lines, f"no summary; exit {done.returncode}\n{done.stderr[-4000:]}"
    return done, json.loads(lines[-1])


def test_register_erase_and_verify_the_certificate(byom):
    done, summary = byom
    assert summary["registered_version"] == "1", done.stderr[-4000:]
    assert summary["job_state"] == "SUCCEEDED", done.stderr[-4000:]
    assert summary["result_version"] == "2"
    assert summary["certificate_valid"] is True and summary["certificate_valid_offline"] is True
    assert summary["membership_after"]["forget_size"] == 1
    for step in range(1, 10):
        assert f"[{step}/9]" in done.stderr


def test_the_registered_version_loads_in_a_fresh_process(byom):
    """The original was logged with its module in code_paths: a new interpreter without this folder loads it."""
    _, summary = byom
    assert summary["original_loads_in_fresh_process"] is True, summary["original_load_detail"]


def test_the_new_version_loads_in_a_fresh_process_and_takes_the_alias(byom):
    """What serving does next: the unlearned version loads without this folder (it carries the original's
    code_paths), the alias given at registration points to it, and the version trained on the erased patient
    no longer loads (superseded: its weights are purged by default)."""
    done, summary = byom
    assert summary["new_version_loads_in_fresh_process"] is True, summary["new_version_load_detail"]
    assert summary["aliases"]["champion"] == summary["result_version"]
    assert summary["original_loads_after_erasure"] is False
    assert done.returncode == 0 and summary["ok"] is True
