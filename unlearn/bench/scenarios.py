"""Forget selectors: which training records a scenario erases. Scenario names are ``<family>-<selector>``.

- ``class``: every training record of one class (``forget_class``, default 3);
- ``random``: a random 10% of the training records, drawn with ``numpy.random.default_rng(1000 + seed)``;
- ``subject``: every training record of 20 subjects, drawn with the same generator from the subjects
  that own training records.

The draws are positions within the family's training records (in record order), so ``digits-*`` forget
exactly the records the digits-only harness forgot before the families existed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unlearn.bench.families import FAMILIES
from unlearn.errors import InvalidParameterError

SELECTORS = ("class", "random", "subject")
RANDOM_FRACTION = 0.10
SUBJECT_COUNT = 20
DEFAULT_FORGET_CLASS = 3
SCENARIOS = tuple(f"{family}-{selector}" for family in FAMILIES for selector in SELECTORS)
"""Every classifier scenario of the harness (``digits-class`` ... ``vit-subject``)."""


@dataclass(frozen=True)
class Selection:
    """The forget set of one scenario: positions within the training records, and the erased classes."""

    family: str
    selector: str
    positions: np.ndarray
    forget_classes: tuple[int, ...] | None


def parse_scenario(name: str, families=FAMILIES) -> tuple[str, str]:
    """``"tabular-random"`` -> ``("tabular", "random")``; unknown names raise naming the field.

    ``families``: the family names that exist (default :data:`unlearn.bench.families.FAMILIES`).
    """
    family, _, selector = name.rpartition("-")
    if family not in families or selector not in SELECTORS:
        known = ", ".join(f"{known_family}-{known_selector}" for known_family in families
                          for known_selector in SELECTORS)
        raise InvalidParameterError("scenario", f"unknown scenario {name!r}; known: {known}")
    return family, selector


def select_forget(scenario: str, train_labels: np.ndarray, train_subjects: np.ndarray, num_classes: int,
                  seed: int, forget_class: int = DEFAULT_FORGET_CLASS) -> Selection:
    """The forget positions of ``scenario`` among the training records (their labels and subjects given)."""
    family, selector = parse_scenario(scenario, (scenario.rpartition("-")[0],))
    rng = np.random.default_rng(1000 + seed)
    if selector == "class":
        if not 0 <= forget_class < num_classes:
            raise InvalidParameterError("forget_class", f"must be a class 0-{num_classes - 1}, got {forget_class}")
        return Selection(family, selector, np.flatnonzero(train_labels == forget_class), (forget_class,))
    if selector == "random":
        count = round(RANDOM_FRACTION * len(train_labels))
        return Selection(family, selector, np.sort(rng.choice(len(train_labels), count, replace=False)), None)
    chosen = rng.choice(np.unique(train_subjects), SUBJECT_COUNT, replace=False)
    return Selection(family, selector, np.flatnonzero(np.isin(train_subjects, chosen)), None)
