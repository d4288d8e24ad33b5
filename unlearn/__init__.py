"""Lethe's unlearning library: pure PyTorch, no service imports.

The pieces every method shares live once here:

- :mod:`unlearn.tasks`       task adapters (per-example loss, predictions, accuracy),
- :mod:`unlearn.data`        validated example sets and deterministic loaders,
- :mod:`unlearn.importance`  diagonal-Fisher importance (SSD, LF-SSD) and its cache,
- :mod:`unlearn.registry`    methods by stable name, with validated hyper-parameters,
- :mod:`unlearn.evaluation`  accuracy, membership inference, gap to a retrained model,
- :mod:`unlearn.splits`      the keyed-hash tune/audit split of never-trained records,
- :mod:`unlearn.membership`  the two-sided membership test (KS + loss-attack AUC),
- :mod:`unlearn.forget_target` when an iterative method has forgotten enough (against ``tune``),
- :mod:`unlearn.gate`        the verification checks that need no service (against ``audit``),
- :mod:`unlearn.chain`       the escalation chain runner,
- :mod:`unlearn.training`    the training loop and recipe (seeded, schedules), :mod:`unlearn.cache` its model cache,
- :mod:`unlearn.methods`     one module per method,
- :mod:`unlearn.bench`       the benchmarks (families, harness, sweep, gate calibration).

Importing :mod:`unlearn.methods` registers every built-in method.
"""

from unlearn.errors import (
    CacheMismatchError,
    InvalidDataError,
    InvalidParameterError,
    UnknownMethodError,
    UnlearnError,
)

__all__ = [
    "CacheMismatchError",
    "InvalidDataError",
    "InvalidParameterError",
    "UnknownMethodError",
    "UnlearnError",
]
