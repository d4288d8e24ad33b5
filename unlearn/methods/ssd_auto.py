"""``ssd-auto``: SSD with a utility-guarded search for alpha (Lethe's own variant).

Why: the published alpha collapses some models (a third-party run of the reference code on CIFAR-10
ResNet18, alpha 10, lambda 1, kept 12.5% and 17.7% retain accuracy on two classes) and leaves others
unforgotten; on our digits CNN, 6 of 20 class erasures lost more than 2 points of retained-class accuracy.

Procedure (lambda fixed at the paper's 1):

1. I_D (cached) and I_Df, exactly as SSD; the ratio r = I_Df / I_D per element is computed once.
2. Reference utility u0 = accuracy of the original model on the never-trained ``tune`` records (``request.tune``;
   for class erasure, its records of the classes that stay, with the erased classes' logits masked out), in
   eval mode: exactly the measurement of the verification gate (:func:`unlearn.gate.judge`), on ``tune``
   where the gate uses ``audit``. Masking matters for class erasure: a retrained model never predicts the
   erased class, so its kept-class accuracy is higher than the original's plain one (2 to 5 points on the
   tabular MLP); a guard against the plain number accepted trials the gate then rejected.
3. A trial at alpha dampens a copy of the ORIGINAL weights (elements with r > alpha get beta = lam / r) and
   measures forget accuracy f and held-out accuracy u. It *forgets* when the target of
   :mod:`unlearn.forget_target` holds (class erasure: f <= ``class_forget_target``; record erasure: the
   forget records' losses are indistinguishable from the ``tune`` records', i.e. they look no better known
   than unseen ones) and it is *useful* when u >= u0 - ``max_utility_drop``. A record-erasure trial that
   made the forget records look LESS known than unseen data went *beyond* (over-forgetting).
4. First the untouched model (alpha = infinity): when it already forgets (record erasure of records the
   model never memorised), no dampening is the mildest answer and the weights are returned unchanged. This
   one check allows for the AUC's sampling noise (``untouched_auc_z`` null standard deviations on top of
   ``stop_auc_margin``, :data:`unlearn.forget_target.UNTOUCHED_AUC_Z`): for a forget set of a few records
   the fixed band alone called most never-memorised sets "still known".
   Otherwise start at ASSD's alpha (the percentile rule). A trial is *too mild* when it is useful, does
   not forget and did not go beyond. From a too-mild start, divide alpha by ``search_factor`` until a trial is not too mild
   (or alpha would fall below ``alpha_min``); from any other start, multiply it until a trial is too mild
   (or would exceed ``alpha_max``). A start that broke utility therefore backs off towards milder
   dampening: for record erasure, forgetting is not monotone in alpha, because heavy dampening lowers the
   held-out accuracy the target is relative to. Then ``refine_steps`` geometric bisections between the
   two sides of the bracket.
5. Return the mildest trial that forgets AND is useful. If none is, report failure
   (``target_reached=False``) and return the useful trial with the lowest forget accuracy, or the
   unchanged weights if no trial was useful: never a collapsed model.

Cost: the untouched check comes first, before the model is copied or any importance computed: a forward
pass over Df, plus one over the held-out sample unless the caller precomputed the unchanged model's scores
on it (``request.tune_scores``, :mod:`unlearn.heldout`; the service does, per model version). Only when
dampening is needed: I_D (cached), one forward/backward pass over Df (as SSD) and, per trial, an
element-wise pass over the parameters and forward passes over Df and the held-out sample; at most
``max_trials`` trials.

Mutates in place: no.

Where it cannot work. SSD erases what a few parameters carry. On the tabular MLP (BatchNorm, dropout; the
benchmark's ``tabular`` family) a class is spread over parameters the other classes need: with class 3 of
seed 0, the strongest dampening within the utility tolerance still recognises 11% of the erased class, and
every stronger one costs more than the tolerance. Lambda < 1 does not help (it only lowers beta on elements already selected, and those are at
beta <= 1/alpha already: forget accuracy 0.17 at lambda 0.5 vs 0.18 at 1, the same utility), and
re-dampening with a recomputed I_Df collapsed utility to 0.3-0.6. There ``ssd-auto`` reports
``target_reached=False`` with the best useful trial; the service's chain then escalates
(:data:`unlearn.chain.DEFAULT_CHAINS`).

Differences from the paper: the paper fixes alpha per architecture and scenario; searching it against a
held-out utility check is ours. The held-out sample is data the model never trained on, so its use does
not leak the forget set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.forget_target import DEFAULT_STOP_AUC_MARGIN, DEFAULT_STOP_MIN_P, UNTOUCHED_AUC_Z, ForgetTarget
from unlearn.heldout import provenance
from unlearn.importance import Importance, estimate_importance
from unlearn.methods.assd import importance_ratio, percentile_alpha
from unlearn.registry import UnlearnRequest, UnlearnResult, copy_model, register, require
from unlearn.tasks import accuracy, accuracy_without_classes


@dataclass(frozen=True)
class SSDAutoConfig:
    """Hyper-parameters of ``ssd-auto`` (Lethe's own; SSD's come from arXiv 2308.07707).

    max_utility_drop: largest accepted fall of held-out accuracy, as a fraction (0.02 = 2 points).
    class_forget_target: class erasure is reached when forget accuracy <= this (a retrained model scores 0).
    stop_min_p, stop_auc_margin: record erasure is reached when the forget records' losses are
        indistinguishable from the ``tune`` records' (:mod:`unlearn.forget_target`): KS p-value >= stop_min_p
        and loss-attack AUC <= 0.5 + stop_auc_margin. Demanding the forget set look no better known than
        unseen data, not worse: over-forgetting is a privacy signal of its own.
    search_factor: geometric step of the alpha search (> 1).
    alpha_min: smallest alpha tried; with lambda = 1 a smaller alpha selects nothing new to dampen harder.
    alpha_max: largest alpha tried when searching for milder dampening.
    max_trials: bound on trials (each costs forward passes over Df and the held-out sample).
    refine_steps: geometric bisections after bracketing.
    untouched_auc_z: null standard deviations of the AUC added to the band of the first check only, the one on
        the unchanged model (:data:`unlearn.forget_target.UNTOUCHED_AUC_Z`); 0 = the trials' band.
    lam: SSD's lambda (paper default 1).
    batch_size: importance batch size for D and Df (must match). Lethe default 64.
    """

    max_utility_drop: float = 0.02
    class_forget_target: float = 0.02
    stop_min_p: float = DEFAULT_STOP_MIN_P
    stop_auc_margin: float = DEFAULT_STOP_AUC_MARGIN
    search_factor: float = 2.0
    alpha_min: float = 1.0
    alpha_max: float = 1.0e4
    max_trials: int = 16
    refine_steps: int = 5
    untouched_auc_z: float = UNTOUCHED_AUC_Z
    lam: float = 1.0
    batch_size: int = 64

    def __post_init__(self) -> None:
        require(0 <= self.max_utility_drop <= 1, "max_utility_drop", "must be in [0, 1]")
        require(0 <= self.class_forget_target <= 1, "class_forget_target", "must be in [0, 1]")
        require(0 < self.stop_min_p < 1, "stop_min_p", "must be in (0, 1)")
        require(0 <= self.stop_auc_margin <= 0.5, "stop_auc_margin", "must be in [0, 0.5]")
        require(1.05 <= self.search_factor <= 100, "search_factor", "must be in [1.05, 100]")
        require(0 < self.alpha_min < self.alpha_max, "alpha_min", "needs 0 < alpha_min < alpha_max")
        require(self.alpha_max <= 1e9, "alpha_max", "must be <= 1e9")
        require(1 <= self.max_trials <= 100, "max_trials", "must be in [1, 100]")
        require(0 <= self.refine_steps <= 20, "refine_steps", "must be in [0, 20]")
        require(0 <= self.untouched_auc_z <= 3, "untouched_auc_z", "must be in [0, 3]")
        require(self.lam > 0, "lam", f"must be > 0, got {self.lam}")
        require(1 <= self.batch_size <= 65536, "batch_size", f"must be in [1, 65536], got {self.batch_size}")


@dataclass(frozen=True)
class Trial:
    alpha: float
    forget_acc: float
    utility_acc: float
    forgets: bool
    useful: bool
    over: bool = False  # record erasure went beyond the never-seen level


class _Dampener:
    """Re-applies SSD dampening at any alpha from the original weights, without copying the model."""

    def __init__(self, model: nn.Module, ratio: Importance, lam: float):
        self.model = model
        self.ratio = ratio
        self.lam = lam
        self.original = {n: p.detach().clone() for n, p in model.named_parameters() if n in ratio}

    @torch.no_grad()
    def apply(self, alpha: float) -> None:
        for name, parameter in self.model.named_parameters():
            if name not in self.ratio:
                continue
            ratio = self.ratio[name]
            selected = ratio > alpha  # == I_Df > alpha * I_D; NaN (0/0) is never selected, inf always
            beta = torch.clamp(self.lam / torch.where(selected, ratio, torch.ones_like(ratio)), max=1.0)
            parameter.copy_(self.original[name] * torch.where(selected, beta, torch.ones_like(beta)))


def _utility_sample(request: UnlearnRequest) -> ExampleSet:
    tune = request.require_tune("ssd-auto")
    if request.forget_classes:
        keep = ~torch.isin(tune["labels"], torch.tensor(request.forget_classes))
        tune = tune.subset(torch.nonzero(keep).flatten())
        if len(tune) == 0:
            raise InvalidDataError("tune", "has no records of the classes that stay")
    return tune


@register("ssd-auto", SSDAutoConfig, needs_retain=False)
def ssd_auto(model: nn.Module, request: UnlearnRequest, config: SSDAutoConfig) -> UnlearnResult:
    """SSD with the mildest alpha that forgets under a held-out utility check (searched)."""
    source = request.require_train_importance("ssd-auto")
    utility_set = _utility_sample(request)
    task = request.task
    target = ForgetTarget(task, request.tune, request.forget_classes, config.class_forget_target,
                          config.stop_min_p, config.stop_auc_margin, "ssd-auto")
    # The unchanged model's tune scores, precomputed per model version (unlearn.heldout) where the caller has
    # them: record erasure only (class erasure's reference masks the erased classes' logits).
    scores = None if request.forget_classes else request.precomputed_tune_scores()
    if scores is not None:
        reference_utility = scores.accuracy
    else:
        reference_utility = (accuracy_without_classes(task, model, utility_set, request.forget_classes)
                             if request.forget_classes else accuracy(task, model, utility_set))  # as the gate
    trials: list[Trial] = []

    def record(trial: Trial) -> Trial:
        trials.append(trial)
        request.report(0.05 if math.isinf(trial.alpha) else 0.2 + 0.75 * len(trials) / config.max_trials,
                       f"alpha {trial.alpha:.4g}: forget acc {trial.forget_acc:.3f}, tune acc {trial.utility_acc:.3f}")
        return trial

    # The mildest dampening of all is none: a model that already scores the forget records no better than
    # unseen data (typical for random records of a model that generalises) needs no change. Checked before
    # anything is copied or any importance computed: with precomputed tune scores it costs one forward pass
    # over Df.
    check = target.check(model, request.forget, scores, auc_z=config.untouched_auc_z)
    untouched_utility = reference_utility if scores is not None else accuracy(task, model, utility_set)
    untouched = record(Trial(math.inf, check.forget_acc, untouched_utility, check.reached,
                             untouched_utility >= reference_utility - config.max_utility_drop, check.over))
    if untouched.forgets and untouched.useful:
        request.report(1.0, "the forget set is already at the held-out level; no dampening needed")
        # The caller's own object, unchanged (UnlearnResult: read-only for callers), not a copy.
        return UnlearnResult(model, details={"start_alpha": None, "trials": 1, "alpha": None,
                                                         "lam": config.lam, "reference_utility": reference_utility,
                                                         "tune_scores": provenance(scores),
                                                         "search": [vars(untouched)]},
                             target_reached=True, message="forget accuracy already at the held-out level; "
                                                          "weights unchanged")
    train_importance = source.get(model, config.batch_size, "fisher")
    work = copy_model(model)
    request.report(0.1, "importance of the forget set")
    forget_importance = estimate_importance(task, work, request.forget, config.batch_size, "fisher")
    ratio = importance_ratio(train_importance, forget_importance)
    start_alpha, _ = percentile_alpha(ratio, len(request.forget), len(source))
    start_alpha = min(max(start_alpha, config.alpha_min), config.alpha_max)
    dampener = _Dampener(work, ratio, config.lam)

    def trial(alpha: float) -> Trial:
        dampener.apply(alpha)
        check = target.check(work, request.forget)
        utility_acc = accuracy(task, work, utility_set)
        return record(Trial(alpha, check.forget_acc, utility_acc, check.reached,
                            utility_acc >= reference_utility - config.max_utility_drop, check.over))

    # Bracket the mildest acceptable alpha between `strong` (a trial that is NOT too mild: it forgets, or it
    # already broke utility) and `mild` (too mild: useful but not forgetting). Forgetting is not monotone in
    # alpha for record erasure (heavy dampening lowers the held-out accuracy the target is relative to), so
    # a trial that broke utility sends the search MILDER, never stronger.
    def too_mild(t: Trial) -> bool:
        return t.useful and not t.forgets and not t.over

    first = trial(start_alpha)
    strong, mild = (None, first.alpha) if too_mild(first) else (first.alpha, math.inf)
    alpha = start_alpha
    while len(trials) < config.max_trials:
        alpha = alpha / config.search_factor if too_mild(first) else alpha * config.search_factor
        if not config.alpha_min <= alpha <= config.alpha_max:
            break
        if too_mild(trial(alpha)):
            mild = alpha
            if not too_mild(first):
                break
        else:
            strong = alpha
            if too_mild(first):
                break
    for _ in range(config.refine_steps):
        if strong is None or math.isinf(mild) or len(trials) >= config.max_trials:
            break
        middle = math.sqrt(strong * mild)
        if too_mild(trial(middle)):
            mild = middle
        else:
            strong = middle

    accepted = [t for t in trials if t.forgets and t.useful]
    log = [vars(t) for t in trials]
    details = {"start_alpha": start_alpha, "trials": len(trials), "reference_utility": reference_utility,
               "tune_scores": provenance(scores),
               "utility_set": "tune, kept classes, eval mode" + (", erased classes masked in the reference"
                                                                 if request.forget_classes else ""),
               "search": log}
    if accepted:
        chosen = max(accepted, key=lambda t: t.alpha)  # the mildest dampening that does the job
        dampener.apply(chosen.alpha)
        request.report(1.0, f"chose alpha {chosen.alpha:.4g}")
        return UnlearnResult(work, details={**details, "alpha": chosen.alpha, "lam": config.lam},
                             target_reached=True, message=f"alpha {chosen.alpha:.4g} forgets within tolerance")
    useful = [t for t in trials if t.useful]
    if useful:
        fallback = min(useful, key=lambda t: (t.forget_acc, -t.alpha))
        dampener.apply(fallback.alpha)
        message = (f"forgetting target not reached within the utility tolerance; best useful alpha "
                   f"{fallback.alpha:.4g} leaves forget accuracy {fallback.forget_acc:.3f}")
        details.update(alpha=fallback.alpha, lam=config.lam)
    else:
        dampener.apply(math.inf)  # nothing selected: the original weights
        message = "every trial broke the utility tolerance; returning the weights unchanged"
        details.update(alpha=None, lam=config.lam)
    request.report(1.0, message)
    return UnlearnResult(work, details=details, target_reached=False, message=message)

