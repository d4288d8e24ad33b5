"""A quiet console (issue 10): between Lethe's own lines, none of the 27 third-party lines ``make demo``
printed (MLflow's pickle warning, the model card, torch.onnx's torchvision notes, transformers' progress bars);
with ``--log-level DEBUG`` they are back, so the test shows it hides exactly them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import main

ROOT = Path(__file__).resolve().parents[2]
THIRD_PARTY = ("Pickle or CloudPickle", "torchvision is not installed", "model card could not be retrieved",
               "Unable to find license information", "Writing model shards", "Loading weights",
               "Creating initial MLflow database tables")
# What the DEBUG run must show again (the first two are warnings; the bars come back with progress bars).
SHOWN_UNDER_DEBUG = ("Pickle or CloudPickle", "torchvision is not installed", "model card could not be retrieved",
                     "Writing model shards", "Loading weights")


def _pieces(level: str, state_dir: Path) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("MLFLOW_", "HF_HUB_", "TRANSFORMERS_", "TORCH_LOGS"))}
    return subprocess.run([sys.executable, "-m", "tests.service.console_pieces", level, str(state_dir)], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.long  # runs the whole demo: make test-all and make demo
def test_third_party_lines_stay_off_the_console_unless_debug(tmp_path):
    quiet = _pieces("WARNING", tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout.count("piece:") == 5
    console = quiet.stdout + quiet.stderr
    assert [line for line in THIRD_PARTY if line in console] == [], console[-3000:]
    assert quiet.stderr.strip() == "", quiet.stderr[-3000:]

    loud = _pieces("DEBUG", tmp_path / "loud")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert [line for line in SHOWN_UNDER_DEBUG if line not in loud.stdout + loud.stderr] == []


def test_the_cli_configures_the_console(capsys, monkeypatch, tmp_path):
    import logging

    for name in ("MLFLOW_CONFIGURE_LOGGING", "TORCH_LOGS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    levels = {name: logging.getLogger(name).level for name in ("service", "unlearn")}
    try:
        assert main(["--log-level", "ERROR", "dataset", "check", str(tmp_path / "none.parquet"),
                     "--task", "classification"]) == 2
        assert os.environ["MLFLOW_CONFIGURE_LOGGING"] == "false" and os.environ["TORCH_LOGS"] == "-onnx"
        assert logging.getLogger("service").level == logging.ERROR
        logging.getLogger("a_library.module").warning("third-party warning")
        logging.getLogger("service.anything").error("lethe error")
        err = capsys.readouterr().err
        assert "lethe error" in err and "third-party warning" not in err
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
