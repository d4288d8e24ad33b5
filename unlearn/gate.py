"""The verification gate's checks that need no service: utility, forgetting, membership.

ONE implementation, used by the service's gate (:mod:`service.verification`, which adds the ONNX export
checks and the certificate evidence) and by the benchmarks' ``--method auto`` (:mod:`unlearn.chain`). The
gate only ever measures on data no method saw: ``utility`` and ``audit`` come from the ``audit`` split of
:mod:`unlearn.splits` (never the ``tune`` split a method may have stopped on).

Checks (each a :class:`GateCheck` with its value, limit and rule):

1. ``utility``: accuracy on ``utility`` after >= before - ``max_utility_drop``. The caller chooses the
   set: a classifier's ``audit`` records of the classes that stay; a causal LM's retained people (never-seen
   people's answers are not knowledge a model can have). For class erasure "before" is the original model
   with the erased classes' logits masked out (:func:`unlearn.tasks.accuracy_without_classes`): what a
   model retrained without them reaches on the rest. Erasing a class makes the remaining problem easier (on
   the benchmark's tabular MLP the retrained model's kept-class accuracy was 2 to 5 points above the
   original's plain one), so comparing with the plain accuracy let through models well below a retrain.
2. class erasure: ``forgetting`` = accuracy on the forget set <= ``class_forget_max_accuracy``, and
   ``forgetting_earlier`` (Acc_o) on whatever records of classes erased by earlier jobs remain. When none
   remain the check cannot run: it is reported with ``passed=None`` and a reason, never as a silent pass.
3. record and subject erasure: the two-sided membership test of :mod:`unlearn.membership` of the forget
   set against the ``audit`` records on the weights after: ``membership_ks`` (KS p-value >= ``min_forget_p``)
   and ``membership_auc`` (loss-attack AUC within 0.5 +- ``mia_auc_margin`` plus the null's sampling noise).
   Under-forgetting (erased records still look known) and over-forgetting (they look less known than unseen
   data) both fail.
4. record and subject erasure: ``forget_accuracy``, one-sided: the model after must not predict the erased
   records' TRAINING labels better than it predicts the ``audit`` records' labels. It fails when forget
   accuracy exceeds audit accuracy by more than :data:`FORGET_ACCURACY_MARGIN` AND the excess is significant:
   Fisher's exact test, one-sided (forget correct/wrong against audit correct/wrong), p-value below
   ``min_forget_p``. Why: the membership test compares losses with the correctly labelled ``audit`` split,
   so records a model memorised with WRONG labels (mislabelled or otherwise atypical records) have low
   losses like correctly classified unseen records, and an unchanged model passed (issue 10,
   tests/service/test_gate_memorised.py). A model that never saw the erased records predicts their
   training labels no better than unseen records' (it predicts a mislabelled record's true class, so
   below), and under exchangeability Fisher's test is exact: a retrained model fails at most
   ``min_forget_p`` of the time (0.5% by default; measured by :mod:`unlearn.bench.calibration`). The margin
   keeps an approximate method that leaves forget accuracy a few points above audit from failing on a
   large set where a tiny excess is significant; it is not a policy value (the gate cannot be loosened).
   Limit of what this sees: a model that still knows memorised mislabelled records but now predicts
   them like unseen ones passes; and an exact retrain on mislabelled records still fails ``membership_*``
   as over-forgetting (their losses on the wrong labels are higher than audit's), so an erasure of
   mislabelled records is REJECTED rather than accepted while memorised. At 0.5% with a small ``audit``
   split its power is low (68 of 72 training labels still predicted against 82% on 56 audit records is
   p 0.027, a pass), so the methods' stop rule asks the same on ``tune`` at the stop level
   (:mod:`unlearn.forget_target`), and a method that stops on its target does not hand the gate such a model.

5. causal-LM record and subject erasure: ``knowledge``, a paraphrase probe
   (:func:`unlearn.membership.knowledge_probe`): the erased people's truth ratios (a paraphrase of the true
   answer against perturbed ones, on the model after) must be indistinguishable from the ``audit`` people's
   (two-sided KS p-value >= ``min_forget_p``). Why: answer-level evidence can miss a fact the model still
   holds. On the fictitious-subjects GPT, ``simnpo+rt`` left the erased answers at the never-seen level (loss
   and Min-K% attacks at AUC 0.46-0.52) while the true values stayed preferred in the paraphrases' frames on
   three seeds of five, and one of them passed every other check (docs/results/lm.md, "A paraphrase probe").
   It needs paraphrased and perturbed answers (``knowledge``, a :class:`KnowledgeProbe`); without them the
   check is reported with ``passed=None`` and says so, never as a pass. A service dataset carries them in
   its optional ``paraphrase`` and ``perturbed`` columns (:mod:`service.datasets`); an LM certificate without
   them says its evidence is answer-level only. The same check runs again when an update re-checks an earlier
   erasure (:func:`still_erased`, on the sealed records' paraphrases).

Policy values are bounded (:data:`POLICY_LIMITS`): a registration or a request may make the gate stricter or
slightly looser, never switch it off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError, InvalidParameterError
from unlearn.heldout import score
from unlearn.membership import (
    CONFIDENCE_Z,
    DEFAULT_AUC_MARGIN,
    DEFAULT_MIN_P,
    FORGET_ACCURACY_MARGIN,
    MembershipResult,
    accuracy_excess,
    compare,
    family_z,
    forget_accuracy_p,
    knowledge_probe,
    membership_test,
)
from unlearn.tasks import TaskAdapter, accuracy, accuracy_without_classes

POLICY_LIMITS: dict[str, tuple[float, float]] = {
    "max_utility_drop": (0.0, 0.10),
    "class_forget_max_accuracy": (0.0, 0.20),
    "min_forget_p": (0.001, 0.2),
    "mia_auc_margin": (0.0, 0.15),
}
"""Bounds of every gate policy value: outside them the gate would no longer mean anything."""

@dataclass(frozen=True)
class GatePolicy:
    """Thresholds of the gate's checks (each bounded by :data:`POLICY_LIMITS`).

    max_utility_drop: largest accepted fall of utility accuracy (fraction; 0.02 = 2 points).
    class_forget_max_accuracy: class erasure passes when forget accuracy <= this (near chance or below).
    min_forget_p: record erasure: the KS p-value of forget vs audit losses must be at least this. 0.005: a
        model retrained without the records fails at most 0.5% of the time (:mod:`unlearn.membership`).
    mia_auc_margin: record erasure: loss-attack AUC within 0.5 +- this (plus the null's noise allowance).
    """

    max_utility_drop: float = 0.02
    class_forget_max_accuracy: float = 0.05
    min_forget_p: float = DEFAULT_MIN_P
    mia_auc_margin: float = DEFAULT_AUC_MARGIN

    def __post_init__(self) -> None:
        for item in fields(self):
            value, (low, high) = getattr(self, item.name), POLICY_LIMITS[item.name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise InvalidParameterError(item.name, f"must be a number in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class GateCheck:
    """One check: ``passed`` is True, False, or None when the check could not run (``reason`` says why)."""

    name: str
    value: float | None
    limit: float | None
    passed: bool | None
    rule: str
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateResult:
    checks: tuple[GateCheck, ...]
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.checks if c.passed is False)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "failures": list(self.failures),
                "checks": [c.as_dict() for c in self.checks], **self.evidence}


class KnowledgeProbe(Protocol):
    """Truth ratios of the erased records and of the ``audit`` records on one model (causal LMs:
    :class:`unlearn.lm.metrics.ParaphraseProbe`)."""

    def ratios(self, model: nn.Module) -> tuple[np.ndarray, np.ndarray]: ...


KNOWLEDGE_RULE = ("causal LM: truth ratios (paraphrase vs perturbed answers) of the erased records vs the audit "
                  "records on the model after, two-sided KS p-value >= min_forget_p")
CAUSAL_LM = "causal-lm"


@dataclass(frozen=True)
class StillErased:
    """An earlier erasure checked again on a later model (:func:`still_erased`)."""

    passed: bool
    value: float  # class erasure: accuracy on the erased records; records: the KS p-value
    limit: float  # class_forget_max_accuracy; records: the KS floor applied (min_forget_p / family)
    membership: MembershipResult | None = None  # records only
    auc_slack: float | None = None  # records only: the AUC's half-width around 0.5
    knowledge: GateCheck | None = None  # causal-LM records only: the paraphrase probe (passed None: no probe)
    knowledge_evidence: dict[str, Any] | None = None  # its numbers, when it ran

    def knowledge_summary(self) -> dict[str, Any] | None:
        """What evidence records of the knowledge check: its numbers and verdict, or why it could not run
        (None when the erasure has no such check: classes, classifiers)."""
        if self.knowledge is None:
            return None
        if self.knowledge_evidence is None:
            return {"passed": None, "reason": self.knowledge.reason}
        return {**self.knowledge_evidence, "passed": self.knowledge.passed}


def family_thresholds(policy, family: int) -> tuple[float, float]:
    """The KS floor and the AUC band's ``z`` of one re-check among ``family`` (:func:`still_erased`)."""
    return policy.min_forget_p / family, family_z(family)


def still_erased(task: TaskAdapter, model: nn.Module, forget: ExampleSet, audit: ExampleSet, policy,
                 classes: tuple[int, ...] | None = None, knowledge: KnowledgeProbe | None = None,
                 family: int = 1) -> StillErased:
    """Erased stays erased: a class erasure by its erased records' accuracy <= ``class_forget_max_accuracy``
    (the ``forgetting`` check), a record or subject erasure by the two-sided membership test of the erased
    records against ``audit`` (``membership_ks`` and ``membership_auc`` together) and, on a causal LM, the
    erasure gate's ``knowledge`` check with the paraphrase probe ``knowledge`` (the erased records' paraphrases
    against audit's; without one it is reported not checkable and does not decide). ``policy``: anything with
    the gate's thresholds. One implementation for the service's update gate (:mod:`service.sealed`) and the
    continual benchmark (:mod:`continual.bench.erasure`).

    ``family``: how many record or subject erasures the caller re-checks on this model together (an update
    re-checks every earlier one). Each is tested at the Bonferroni level, KS p >= ``min_forget_p / family``
    and the AUC band at :func:`unlearn.membership.family_z`, so that a model that forgot all of them is refused
    with probability at most ``min_forget_p`` plus 0.5% in all, not once per erasure: at the single-test level,
    100 erasures would refuse such a model about half the time."""
    if classes:
        value = accuracy(task, model, forget)
        limit = policy.class_forget_max_accuracy
        return StillErased(value <= limit + 1e-12, value, limit)
    test = compare(task, model, forget, audit)
    min_p, z = family_thresholds(policy, family)
    passed = test.passes(min_p, policy.mia_auc_margin, z)
    probe_check, probe_evidence = None, None
    if task.name == CAUSAL_LM:
        found: dict[str, Any] = {}
        probe_check = knowledge_check(knowledge, model, policy, found, min_p)
        probe_evidence = found.get("knowledge")
        passed = passed and probe_check.passed is not False
    return StillErased(passed, test.ks_p_value, min_p, test, test.auc_slack(policy.mia_auc_margin, z),
                       probe_check, probe_evidence)


def without_classes(examples: ExampleSet, classes: tuple[int, ...] | None) -> ExampleSet:
    """The examples whose label is not in ``classes`` (classification)."""
    if not classes:
        return examples
    keep = ~torch.isin(examples["labels"], torch.tensor(classes))
    return examples.subset(torch.nonzero(keep).flatten())


def judge(task: TaskAdapter, before: nn.Module, after: nn.Module, forget: ExampleSet, utility: ExampleSet,
          audit: ExampleSet, policy: GatePolicy, forget_classes: tuple[int, ...] | None = None,
          utility_before: float | None = None, earlier_classes: tuple[int, ...] = (),
          earlier: ExampleSet | None = None, knowledge: KnowledgeProbe | None = None) -> GateResult:
    """Judge ``after`` (the unlearned model) against ``before``; see the module docstring for the checks.

    ``forget`` holds this job's erased training records; ``utility`` the set utility is measured on (already
    without the erased classes); ``audit`` never-trained records no method saw (the membership reference);
    ``utility_before`` a cached measurement of ``before`` on ``utility`` (for class erasure, with the erased
    classes masked, as computed here when it is None); ``earlier`` the remaining records
    of classes erased by earlier jobs on the lineage (``earlier_classes``); ``knowledge`` the paraphrase probe of
    a causal-LM erasure (check 5), None when the data has no paraphrased answers.
    """
    for name, examples in (("forget", forget), ("utility", utility), ("audit", audit)):
        if len(examples) == 0:
            raise InvalidDataError(name, "the gate cannot judge on an empty set")
    checks: list[GateCheck] = []
    erased = tuple(forget_classes or ()) + tuple(earlier_classes)
    if utility_before is not None:
        before_acc = utility_before
    elif erased:
        before_acc = accuracy_without_classes(task, before, utility, erased)
    else:
        before_acc = accuracy(task, before, utility)
    after_acc = accuracy(task, after, utility)
    floor = before_acc - policy.max_utility_drop
    checks.append(GateCheck("utility", after_acc, floor, after_acc >= floor - 1e-12,
                            "utility accuracy after >= before - max_utility_drop"))
    # One forward pass per model and set gives both the losses (membership) and the exact matches (accuracy).
    forget_scores_before, forget_scores_after = score(task, before, forget), score(task, after, forget)
    forget_before, forget_after = forget_scores_before.accuracy, forget_scores_after.accuracy
    evidence: dict[str, Any] = {
        "utility_acc_before": before_acc, "utility_acc_after": after_acc,
        "utility_reference": ("before, erased classes masked" if erased else "before"),
        "forget_acc_before": forget_before, "forget_acc_after": forget_after,
        "sizes": {"forget": len(forget), "utility": len(utility), "audit": len(audit)},
        "scenario": "class" if forget_classes else "records",
    }
    if forget_classes:
        limit = policy.class_forget_max_accuracy
        checks.append(GateCheck("forgetting", forget_after, limit, forget_after <= limit + 1e-12,
                                "class erasure: forget accuracy <= class_forget_max_accuracy"))
    else:
        audit_scores_after = score(task, after, audit)
        after_test = membership_test(forget_scores_after.losses, audit_scores_after.losses)
        evidence["membership_before"] = membership_test(forget_scores_before.losses,
                                                        score(task, before, audit).losses).as_dict()
        evidence["membership_after"] = after_test.as_dict()
        slack = after_test.auc_slack(policy.mia_auc_margin)
        checks.append(GateCheck(
            "membership_ks", after_test.ks_p_value, policy.min_forget_p, after_test.ks_passes(policy.min_forget_p),
            "KS test of forget vs audit per-example losses: p-value >= min_forget_p (either direction fails)"))
        checks.append(GateCheck(
            "membership_auc", after_test.auc, slack, after_test.auc_passes(policy.mia_auc_margin),
            f"loss-attack AUC forget vs audit within 0.5 +- (mia_auc_margin + {CONFIDENCE_Z} * null sd); "
            f"limit = that half-width; smallest detectable member AUC here "
            f"{0.5 + slack:.3f}"))
        audit_acc = audit_scores_after.accuracy
        excess_p = forget_accuracy_p(forget_after, len(forget), audit_acc, len(audit))
        evidence["forget_accuracy"] = {"forget_acc": forget_after, "audit_acc": audit_acc,
                                       "margin": FORGET_ACCURACY_MARGIN, "fisher_p": excess_p}
        limit = audit_acc + FORGET_ACCURACY_MARGIN
        checks.append(GateCheck(
            "forget_accuracy", forget_after, limit,
            not accuracy_excess(forget_after, len(forget), audit_acc, len(audit), policy.min_forget_p),
            f"forget accuracy (training labels) <= audit accuracy + {FORGET_ACCURACY_MARGIN}, unless the excess "
            f"is not significant (one-sided Fisher exact p >= min_forget_p; here p = {excess_p:.3g})"))
        if task.name == CAUSAL_LM:
            checks.append(knowledge_check(knowledge, after, policy, evidence))
    if forget_classes or earlier_classes:
        evidence["continual"] = _continual_evidence(task, before, after, forget_classes, forget_after,
                                                    earlier_classes, earlier)
    if earlier_classes:
        if earlier is not None and len(earlier):
            acc_o = evidence["continual"]["acc_o"]
            checks.append(GateCheck("forgetting_earlier", acc_o, policy.class_forget_max_accuracy,
                                    acc_o <= policy.class_forget_max_accuracy + 1e-12,
                                    "classes erased by earlier jobs: accuracy on their remaining records "
                                    "<= class_forget_max_accuracy"))
        else:
            checks.append(GateCheck(
                "forgetting_earlier", None, policy.class_forget_max_accuracy, None,
                "classes erased by earlier jobs: accuracy on their remaining records <= class_forget_max_accuracy",
                reason="not checkable: every record of the earlier-erased classes was purged by the earlier "
                       "erasures; their forgetting is attested by those versions' certificates"))
    return GateResult(tuple(checks), evidence)


def knowledge_check(probe: KnowledgeProbe | None, after: nn.Module, policy,
                    evidence: dict[str, Any], min_p: float | None = None) -> GateCheck:
    """Check 5 (module docstring) on ``after``; its numbers go into ``evidence["knowledge"]``. Without a probe:
    ``passed=None`` with the reason (the evidence is answer-level only), never a pass. ``min_p``: the KS floor
    when it is not the policy's ``min_forget_p`` (an update's re-checks, :func:`still_erased`)."""
    min_p = policy.min_forget_p if min_p is None else min_p
    if probe is None:
        return GateCheck("knowledge", None, min_p, None, KNOWLEDGE_RULE,
                         reason="not checkable: no paraphrased and perturbed answers for the erased or the audit records, so this "
                                "certificate's evidence of forgetting is answer-level only (a fact can survive in "
                                "other wordings; docs/results/lm.md)")
    erased, reference = probe.ratios(after)
    p_value, shift = knowledge_probe(erased, reference)
    evidence["knowledge"] = {"ks_p_value": p_value, "median_log_truth_ratio_shift": shift,
                             "erased_questions": len(erased), "audit_questions": len(reference)}
    return GateCheck("knowledge", p_value, min_p, p_value >= min_p, KNOWLEDGE_RULE)


def _continual_evidence(task: TaskAdapter, before: nn.Module, after: nn.Module,
                        forget_classes: tuple[int, ...] | None, forget_after: float,
                        earlier_classes: tuple[int, ...], earlier: ExampleSet | None) -> dict[str, Any]:
    """Acc_f (this task's classes) and Acc_o (classes of earlier tasks) of the continual class-erasure view
    (GS-LoRA's metrics, METHODS.md)."""
    count = len(earlier) if earlier is not None else 0
    if not earlier_classes:
        note = "no class was erased on this lineage before this job: Acc_o is not defined"
    elif count:
        note = f"Acc_o measured on the {count} remaining record(s) of the earlier-erased classes"
    else:
        note = ("no record of the earlier-erased classes remains (their records were purged by the earlier "
                "erasures), so Acc_o was evaluated on nothing and has no value; their forgetting is attested "
                "by the earlier versions' certificates")
    return {
        "task_classes": sorted(forget_classes or ()), "earlier_classes": sorted(earlier_classes),
        "erased_classes": sorted(set(forget_classes or ()) | set(earlier_classes)),
        "acc_f": forget_after if forget_classes else None,
        "acc_o": accuracy(task, after, earlier) if count else None,
        "acc_o_before": accuracy(task, before, earlier) if count else None,
        "acc_o_records": count, "acc_o_note": note,
    }
