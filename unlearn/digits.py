"""scikit-learn's handwritten digits as records with synthetic data subjects (nothing is downloaded).

1,797 8x8 images, 10 classes. Every record gets a ``record_id``, a ``subject_id`` and a ``split``. The
split is fixed (seed 0, stratified by class): 65% ``train``, 10% ``holdout`` (never trained on; utility
checks and membership-inference non-members), 25% ``test`` (benchmark reporting only). Subjects own
several records across classes: records are shuffled (fixed seed) and dealt out in groups of 6, so about
300 subjects each own records of several digits, like a person who filled in several forms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.datasets import load_digits

RECORDS_PER_SUBJECT = 6
SPLIT_FRACTIONS = {"train": 0.65, "holdout": 0.10, "test": 0.25}


@dataclass(frozen=True)
class DigitsRecords:
    features: np.ndarray  # float32 [N, 64], pixel values scaled from 0..16 to 0..1
    labels: np.ndarray  # int64 [N]
    record_ids: np.ndarray  # str [N]
    subject_ids: np.ndarray  # str [N]
    splits: np.ndarray  # str [N]: train / holdout / test

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)


def load_digits_records() -> DigitsRecords:
    bunch = load_digits()
    features = (bunch.data / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    count = len(labels)
    rng = np.random.default_rng(0)
    splits = np.empty(count, dtype=object)
    for label in range(10):  # stratified: every class keeps the same proportions in every split
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(len(members) * SPLIT_FRACTIONS["test"])
        n_holdout = round(len(members) * SPLIT_FRACTIONS["holdout"])
        splits[members[:n_test]] = "test"
        splits[members[n_test : n_test + n_holdout]] = "holdout"
        splits[members[n_test + n_holdout :]] = "train"
    owner_order = rng.permutation(count)
    subject_ids = np.empty(count, dtype=object)
    subject_ids[owner_order] = [f"subject-{i // RECORDS_PER_SUBJECT:04d}" for i in range(count)]
    record_ids = np.array([f"digits-{i:05d}" for i in range(count)], dtype=object)
    return DigitsRecords(features, labels, record_ids, subject_ids, splits.astype(str))
