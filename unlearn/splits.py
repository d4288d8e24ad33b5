"""Never-trained records, split once into ``tune`` and ``audit`` by a keyed hash of the record id.

Why two splits (issue 9, "Evidence the gate can stand behind" in DESIGN.md): a method may stop or search on
never-trained data (``ssd-auto``'s alpha search, the gradient methods' stop rule), and a number measured on
the data a method stopped on is biased towards "passed". So the never-trained records of every dataset are
dealt into

- ``tune``: what methods may see (:attr:`unlearn.registry.UnlearnRequest.tune`);
- ``audit``: what only the verification gate and a benchmark's evaluation see.

The assignment is ``HMAC-SHA256(key, "split" || record_id)``'s first bit, so it is

- stable across dataset versions (a record keeps its side when other records are erased or added),
- unpredictable without the key (a client cannot choose which side its records land on),
- about half and half, independent of labels and subjects.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

import numpy as np

TUNE = "tune"
AUDIT = "audit"
BENCH_SPLIT_KEY = b"lethe-bench-split-v1"
"""The benchmarks' fixed key: their splits are the same on every machine and every run."""


def is_audit(record_id: str, key: bytes) -> bool:
    """True when the never-trained record ``record_id`` belongs to the ``audit`` split."""
    digest = hmac.new(key, b"split\x00" + str(record_id).encode(), hashlib.sha256).digest()
    return bool(digest[0] & 1)


def audit_mask(record_ids: Iterable[str], key: bytes) -> np.ndarray:
    """Boolean mask over ``record_ids``: True for ``audit``, False for ``tune``.

    Apply it to never-trained records only; training records are neither.
    """
    return np.fromiter((is_audit(r, key) for r in record_ids), dtype=bool)
