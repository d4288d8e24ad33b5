"""The console tells Lethe's story; third-party libraries' warnings and progress bars stay out of it.

``make demo`` used to print 27 lines of other libraries' between Lethe's own progress: MLflow's warning about
pickle on every model it saves, "The model card could not be retrieved from the hub", ``torch.onnx``'s
"torchvision is not installed" four times per export, transformers' shard and weight progress bars. None of
them is something an operator of Lethe can act on (Lethe chooses pickle on purpose, see
:mod:`service.mlflow_registry`; nothing is downloaded, so there is no model card).

:func:`configure` (called once by the ``lethe`` command, before any of those libraries is imported):

- Lethe's loggers (:data:`LETHE_LOGGERS`) log at the chosen level;
- every other logger's records, and Python warnings (``logging.captureWarnings``), reach the console only
  from ERROR up, or from WARNING up with ``--log-level DEBUG``;
- MLflow stops installing its own stderr handler (``MLFLOW_CONFIGURE_LOGGING=false``), so its records go
  through the same filter; transformers logs at ERROR (WARNING under DEBUG) and ``torch.onnx`` at ERROR
  (``TORCH_LOGS=-onnx``; untouched under DEBUG) through their own handlers;
- progress bars (huggingface_hub's, which transformers' loading bars follow, and MLflow's artifact
  downloads) are off unless the level is DEBUG.

Environment variables already set by the user win: they are only defaulted here.
"""

from __future__ import annotations

import logging
import os
import sys

LETHE_LOGGERS = ("service", "unlearn", "continual", "lethe_demo", "lethe_bench")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_handler: logging.Handler | None = None  # the console handler configure() installed (replaced on a second call)


def quiet_environment(debug: bool) -> dict[str, str]:
    """Library switches read at import time (hence set before the libraries are imported)."""
    environment = {"MLFLOW_CONFIGURE_LOGGING": "false",
                   "TRANSFORMERS_VERBOSITY": "warning" if debug else "error"}
    if not debug:
        environment.update({"HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
                            # torch logs through its own handlers; "-onnx" raises torch.onnx to ERROR
                            "TORCH_LOGS": "-onnx"})
    return environment


class LetheStory(logging.Filter):
    """Passes Lethe's own records (their loggers' levels decide) and other libraries' from ``third_party_level``."""

    def __init__(self, third_party_level: int):
        super().__init__()
        self.third_party_level = third_party_level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.partition(".")[0] in LETHE_LOGGERS:
            return True
        return record.levelno >= self.third_party_level


def configure(level: str, stream=None) -> None:
    """Set up the console for one ``lethe`` command at ``level`` (DEBUG, INFO, WARNING or ERROR)."""
    debug = level == "DEBUG"
    for name, value in quiet_environment(debug).items():
        os.environ.setdefault(name, value)
    global _handler
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(LetheStory(logging.WARNING if debug else logging.ERROR))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(logging.WARNING)
    for name in LETHE_LOGGERS:
        logging.getLogger(name).setLevel(getattr(logging, level))
    logging.captureWarnings(True)
