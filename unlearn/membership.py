"""Is an erased set indistinguishable from data the model never saw? A two-sided membership test.

One implementation for every caller: the gradient methods' stop rule (against the ``tune`` split,
:mod:`unlearn.forget_target`), the verification gate (against the ``audit`` split, :mod:`unlearn.gate`), the
benchmarks and the continual library.

The statistic is a per-example loss: the classifier's cross-entropy, or a causal LM's answer NLL per answer
token (``task.per_example_loss / task.target_lengths``, so long and short answers compare). A model that
still carries the erased records gives them LOWER losses than never-seen records; a model that over-forgot
gives them HIGHER losses (MUSE's PrivLeak, arXiv 2407.06460: both signs are failures). Two views:

- the two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``, two-sided): its p-value is small when
  the two loss distributions differ in either direction;
- the loss attack's ROC AUC, ``P(loss_forget < loss_reference)`` (ties count one half): 1 = the erased
  records look like members, 0.5 = indistinguishable, 0 = they look *less* known than unseen data.

Passing needs both: ``ks_p >= min_p`` and the AUC within ``0.5 +- auc_margin`` *at confidence*: the check
fails only when ``|AUC - 0.5| > auc_margin + z * sd0``, where ``sd0 = sqrt((n1 + n2 + 1) / (12 n1 n2))`` is the
AUC's standard deviation when both samples come from one distribution (the Mann-Whitney null). Why the
``z * sd0`` term: a 6-record subject against 90 audit records has ``sd0 = 0.12``, so a bare ``+-0.1`` band
would reject a model retrained without the subject about 40% of the time. With the term, a retrained model
(for which the erased records ARE never-seen data) fails the AUC check with probability at most
``2 * (1 - Phi(z))`` whatever the sizes; :data:`CONFIDENCE_Z` = 2.807 makes that 0.5%. The price is power:
the smallest AUC the test can call "still a member" is ``0.5 + auc_margin + z * sd0``, reported as
``detectable_auc`` so that evidence about a tiny erased set says how weak it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.tasks import TaskAdapter, eval_batch_size, eval_mode

CONFIDENCE_Z = 2.807
"""Two-sided 0.5% normal quantile: a retrained model fails the AUC check at most 0.5% of the time."""
DEFAULT_MIN_P = 0.005
"""KS p-value floor of the gate: a retrained model fails the KS check at most 0.5% of the time."""
DEFAULT_AUC_MARGIN = 0.1
"""Half-width of the accepted AUC band around 0.5 (issue 9's default)."""
FORGET_ACCURACY_MARGIN = 0.05
"""Forget accuracy may exceed a never-seen reference's by this much before significance matters
(:func:`accuracy_excess`; the gate's ``forget_accuracy`` check and the methods' stop rules)."""


def family_z(count: int) -> float:
    """The AUC band's ``z`` when ``count`` erasures are tested together on one model (an update's
    re-checks): Bonferroni, so that a model that forgot every one of them fails any AUC check with
    probability at most 0.5% in all, as one test at :data:`CONFIDENCE_Z` does alone. ``family_z(1)`` is
    :data:`CONFIDENCE_Z`; the band widens slowly (4.05 for 100 erasures)."""
    if count < 1:
        raise ValueError(f"a family has at least one test, got {count}")
    if count == 1:
        return CONFIDENCE_Z
    return float(stats.norm.isf(stats.norm.sf(CONFIDENCE_Z) / count))


@dataclass(frozen=True)
class MembershipResult:
    """The two-sided membership test of an erased set against never-seen reference records."""

    forget_size: int
    reference_size: int
    ks_statistic: float
    ks_p_value: float
    auc: float
    auc_null_sd: float
    forget_loss_mean: float
    reference_loss_mean: float
    forget_loss_median: float
    reference_loss_median: float

    @property
    def direction(self) -> str:
        """``under`` (erased records look known), ``over`` (they look less known than unseen) or ``none``."""
        if self.auc > 0.5:
            return "under"
        if self.auc < 0.5:
            return "over"
        return "none"

    def auc_slack(self, auc_margin: float, z: float = CONFIDENCE_Z) -> float:
        """Half-width of the AUC band actually applied: the margin plus the null's sampling noise."""
        return auc_margin + z * self.auc_null_sd

    def ks_passes(self, min_p: float) -> bool:
        return self.ks_p_value >= min_p

    def auc_passes(self, auc_margin: float, z: float = CONFIDENCE_Z) -> bool:
        return abs(self.auc - 0.5) <= self.auc_slack(auc_margin, z) + 1e-12

    def passes(self, min_p: float, auc_margin: float, z: float = CONFIDENCE_Z) -> bool:
        return self.ks_passes(min_p) and self.auc_passes(auc_margin, z)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "direction": self.direction}


def membership_losses(task: TaskAdapter, model: nn.Module, examples: ExampleSet,
                      batch_size: int | None = None) -> np.ndarray:
    """Per-example loss per target token (classification: the cross-entropy), eval mode, float64 on the CPU.

    The model's mode is restored afterwards.
    """
    if len(examples) == 0:
        raise InvalidDataError("examples", "membership losses of an empty set are undefined")
    device = next(iter(model.parameters())).device
    losses = []
    with eval_mode(model), torch.no_grad():
        for batch in examples.batches(eval_batch_size(task, batch_size), device):
            losses.append(batch_membership_losses(task, model, batch).double().cpu())
    return torch.cat(losses).numpy()


def batch_membership_losses(task: TaskAdapter, model: nn.Module, batch) -> torch.Tensor:
    """:func:`membership_losses` of one batch in the model's CURRENT mode, with its graph (a method that
    trains on them sets eval mode itself)."""
    return task.per_example_loss(model, batch) / task.target_lengths(batch).clamp_min(1)


# SciPy's ks_2samp without its NaN-policy wrapper, which costs five times the test itself on the small sets
# of a steady-state erasure (0.25 ms against 0.04): the losses are checked finite above. Where SciPy does not
# expose the wrapped function, the public one (tests/unlearn/test_membership.py compares both).
_ks_2samp = getattr(stats.ks_2samp, "__wrapped__", stats.ks_2samp)


def loss_auc(forget_losses: np.ndarray, reference_losses: np.ndarray) -> float:
    """``P(loss_forget < loss_reference)`` with ties counted one half (the Mann-Whitney U over n1 * n2).

    Counted against the sorted reference losses (two binary searches per forget loss) instead of ranking the
    pooled sample: the same U, exactly (sums of whole and half counts), without SciPy's ``rankdata``, which
    was a fifth of a steady-state erasure's check on a few records (tests/unlearn/test_membership.py compares
    both).
    """
    forget_losses, reference_losses = np.asarray(forget_losses, float), np.asarray(reference_losses, float)
    ordered = np.sort(reference_losses)
    at_most = np.searchsorted(ordered, forget_losses, side="right")  # reference losses <= each forget loss
    below = np.searchsorted(ordered, forget_losses, side="left")  # reference losses < each forget loss
    u = (len(ordered) - at_most).sum() + 0.5 * (at_most - below).sum()  # higher reference loss: forget wins
    return float(u / (len(forget_losses) * len(ordered)))


def null_auc_sd(forget_size: int, reference_size: int) -> float:
    """Standard deviation of the AUC when both samples come from the same continuous distribution."""
    n1, n2 = forget_size, reference_size
    return math.sqrt((n1 + n2 + 1) / (12.0 * n1 * n2))


def membership_test(forget_losses: np.ndarray, reference_losses: np.ndarray) -> MembershipResult:
    """KS test and loss-attack AUC of ``forget_losses`` against ``reference_losses`` (never-seen records)."""
    forget_losses = np.asarray(forget_losses, dtype=float)
    reference_losses = np.asarray(reference_losses, dtype=float)
    for name, values in (("forget", forget_losses), ("reference", reference_losses)):
        if values.size == 0:
            raise InvalidDataError(name, "the membership test needs at least one record on each side")
        if not np.isfinite(values).all():
            raise InvalidDataError(name, "losses contain NaN or inf")
    ks = _ks_2samp(forget_losses, reference_losses, alternative="two-sided", method="auto")
    return MembershipResult(
        forget_size=int(forget_losses.size), reference_size=int(reference_losses.size),
        ks_statistic=float(ks.statistic), ks_p_value=float(ks.pvalue),
        auc=loss_auc(forget_losses, reference_losses),
        auc_null_sd=null_auc_sd(forget_losses.size, reference_losses.size),
        forget_loss_mean=float(forget_losses.mean()), reference_loss_mean=float(reference_losses.mean()),
        forget_loss_median=float(np.median(forget_losses)), reference_loss_median=float(np.median(reference_losses)),
    )


def compare(task: TaskAdapter, model: nn.Module, forget: ExampleSet, reference: ExampleSet) -> MembershipResult:
    """The membership test of ``forget`` against ``reference`` on ``model``'s current weights."""
    return membership_test(membership_losses(task, model, forget), membership_losses(task, model, reference))


def knowledge_probe(forget_ratios: np.ndarray, reference_ratios: np.ndarray) -> tuple[float, float]:
    """Does ONE model still hold the erased people's facts? ``(ks_p, log_shift)`` of two truth-ratio samples.

    The truth ratios (:func:`unlearn.lm.metrics.truth_ratios`) of the erased people's questions against those
    of never-seen people (the ``audit`` people), both on the same model: a two-sided two-sample KS p-value,
    and the median log truth ratio of the erased questions minus that of the reference questions (negative:
    the erased people's true values are still preferred over wrong ones in the paraphrases' frames). Unlike
    :func:`unlearn.lm.metrics.forget_quality` it needs no model retrained without them, so the gate runs it
    (its ``knowledge`` check, :mod:`unlearn.gate`) wherever paraphrased and perturbed answers exist; measured
    in docs/results/lm.md ("A paraphrase probe").
    """
    a, b = np.asarray(forget_ratios, dtype=float), np.asarray(reference_ratios, dtype=float)
    if a.size == 0 or b.size == 0:
        raise InvalidDataError("forget", "the knowledge probe needs truth ratios on both sides")
    return float(stats.ks_2samp(a, b).pvalue), float(np.median(np.log(a)) - np.median(np.log(b)))


def forget_accuracy_p(forget_acc: float, forget_size: int, reference_acc: float, reference_size: int) -> float:
    """One-sided Fisher exact p-value that the forget records are predicted right MORE often than the
    reference (never-seen) records."""
    forget_right, reference_right = round(forget_acc * forget_size), round(reference_acc * reference_size)
    table = [[forget_right, forget_size - forget_right], [reference_right, reference_size - reference_right]]
    return float(stats.fisher_exact(table, alternative="greater").pvalue)


def accuracy_excess(forget_acc: float, forget_size: int, reference_acc: float, reference_size: int,
                    min_p: float) -> bool:
    """The forget records' TRAINING labels (or answers) are still predicted better than never-seen records':
    forget accuracy above the reference's by more than :data:`FORGET_ACCURACY_MARGIN`, with a one-sided Fisher
    p-value below ``min_p``. Under exchangeability (a model that never saw either set) it is true at most
    ``min_p`` of the time."""
    return (forget_acc > reference_acc + FORGET_ACCURACY_MARGIN + 1e-12
            and forget_accuracy_p(forget_acc, forget_size, reference_acc, reference_size) < min_p)
