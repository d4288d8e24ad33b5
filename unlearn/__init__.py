"""Lethe's unlearning library: pure PyTorch, no service imports.

The pieces every method shares live once here:

- :mod:`unlearn.tasks`       task adapters (per-example loss, predictions, accuracy),
- :mod:`unlearn.data`        validated example sets and deterministic loaders,
- :mod:`unlearn.importance`  diagonal-Fisher importance (SSD, LF-SSD) and its cache,
- :mod:`unlearn.registry`    methods by stable name, with validated hyper-parameters,
- :mod:`unlearn.evaluation`  accuracy, membership inference, gap to a retrained model,
- :mod:`unlearn.methods`     one module per method.

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
