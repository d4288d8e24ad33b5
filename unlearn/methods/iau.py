"""``iau``: Influence Approximation Unlearning (arXiv 2507.23257).

Deleting a training point z changes the optimum, to first order, as adding a point whose gradient is
``-grad l(z)`` would; so unlearning becomes one incremental-learning step instead of an inverse-Hessian
influence update. Two of the paper's three parts run here:

(a) incremental approximation: ascent on the mean forget loss, ``-grad mean_l(Df)``;
(b) gradient correction: descent on the mean retain loss, ``+grad mean_l(Dr)``;

    theta <- theta - lr * step( grad mean_l(Dr) - grad mean_l(Df) )

with full-batch means (``l`` = the task's training objective, :func:`unlearn.gradients.mean_objective_gradient`).
Part (c), gradient restriction during ORIGINAL training, is :mod:`unlearn.gradient_restriction` (set
``TrainRecipe.gradient_restriction``); IAU runs, and is verified, on models trained without it too.

Update modes:

- ``adam`` (Lethe's default): up to ``max_steps`` steps of a freshly created Adam (lr ``adam_lr``), each on
  full-batch means recomputed at the current weights, stopped by the forgetting target of
  :mod:`unlearn.forget_target` (checked before every step: class erasure, forget accuracy <=
  ``class_forget_target``; record erasure, the forget records' losses indistinguishable from the ``tune``
  records', and not beyond). When the budget runs out first the result says ``target_reached=False``.
  Why it is the default: the reference's single step moves every weight by about ``lr`` whatever the
  request, which is too little for a model that MEMORISED its records. On the tabular MLP (issue 9) one
  step moved forget accuracy on a random 10% by 2 points while a retrained model scores 21 points lower;
  on the digits CNN it left 92% accuracy on an erased class. Repeating the same sign-like step until the
  records look unseen, and no further, keeps IAU's update and gives it an end.
- ``adam-one-step`` (the reference implementation, arXiv 2507.23257's code): ONE step of a fresh Adam with
  lr 1e-3. A fresh Adam's first step is ``lr * g / (|g| + eps)``, about ``lr * sign(g)``: every weight whose
  combined gradient is not negligible moves by about lr. The target is checked after the step and
  reported (``target_reached``), never enforced.
- ``sgd``: up to ``max_steps`` plain gradient steps of size ``sgd_lr``, gradients recomputed before each,
  stopped by the target like ``adam``; the step is proportional to the gradient, so it must be tuned per
  model.

Gradient correction over all of Dr costs O(|Dr|): ``retain_sample_size`` > 0 uses a uniform sample of
that many retain examples (drawn with the request's seed) and the result reports what was used.

Gradients are taken in eval mode (running normalisation statistics, no dropout).

Cost: per step, one forward/backward pass over Df and one over the retain sample, plus the target check
(forward passes over Df and, for record erasure, the ``tune`` records).

Mutates in place: no (works on a copy; the caller's model is unchanged).

Differences from the paper: the paper (and its code) takes the single Adam step over all of Dr
(``update="adam-one-step"``). The repeated, target-stopped ``adam`` default, the ``sgd`` mode and the sampled
retain subset are Lethe's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from unlearn.data import ExampleSet
from unlearn.forget_target import DEFAULT_STOP_AUC_MARGIN, DEFAULT_STOP_MIN_P, ForgetCheck, ForgetTarget, run_outcome
from unlearn.gradients import make_unlearning_optimizer, mean_objective_gradient, trainable_parameters, write_gradient
from unlearn.registry import UnlearnRequest, UnlearnResult, copy_model, register, require


@dataclass(frozen=True)
class IAUConfig:
    """Hyper-parameters of IAU (arXiv 2507.23257).

    update: ``adam`` (Lethe default: fresh-Adam steps until the forgetting target), ``adam-one-step``
        (reference code: one step of a fresh Adam) or ``sgd`` (plain gradient steps until the target).
    adam_lr: Adam's learning rate in the ``adam`` modes; reference default 1e-3.
    sgd_lr: step size in ``sgd`` mode (no paper default). Lethe default 0.1: on the digits CNN the largest of
        0.01/0.03/0.1/0.3/1 that kept held-out accuracy; from 0.3 up, three steps of ascent on the unbounded
        forget loss run away (gradients grow as the loss grows) and collapse the model to chance.
    max_steps: step budget of the ``adam`` and ``sgd`` modes (``adam-one-step`` takes one). Lethe default 50:
        about 0.05 of movement per weight at lr 1e-3, enough for a class of the digits CNN and the tabular
        MLP's memorised records (docs/benchmarks.md), small against the original training.
    stop_at_target: stop as soon as the forgetting target is reached (:mod:`unlearn.forget_target`); false
        runs the whole budget and reports ``target_reached=None``.
    class_forget_target: class erasure is done when forget accuracy <= this (a retrained model scores 0).
    stop_min_p, stop_auc_margin: record erasure is done when the forget records' losses are
        indistinguishable from the ``tune`` records' (KS p-value >= stop_min_p and loss-attack AUC <=
        0.5 + stop_auc_margin); the run also stops, with ``target_reached=False``, when it went beyond.
    retain_sample_size: 0 uses all of Dr for the gradient correction; n > 0 a uniform sample of n retain
        examples (all of Dr when it is smaller). Not in the paper.
    batch_size: chunk size of the full-batch gradient passes (does not change the maths for classifiers).
    """

    update: Literal["adam", "adam-one-step", "sgd"] = "adam"
    adam_lr: float = 1e-3
    sgd_lr: float = 0.1
    max_steps: int = 50
    stop_at_target: bool = True
    class_forget_target: float = 0.02
    stop_min_p: float = DEFAULT_STOP_MIN_P
    stop_auc_margin: float = DEFAULT_STOP_AUC_MARGIN
    retain_sample_size: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        require(self.update in ("adam", "adam-one-step", "sgd"), "update",
                f"must be 'adam', 'adam-one-step' or 'sgd', got {self.update!r}")
        require(0 < self.adam_lr <= 1.0, "adam_lr", f"must be in (0, 1], got {self.adam_lr}")
        require(0 < self.sgd_lr <= 1000.0, "sgd_lr", f"must be in (0, 1000], got {self.sgd_lr}")
        require(1 <= self.max_steps <= 10_000, "max_steps", f"must be in [1, 10000], got {self.max_steps}")
        require(0 <= self.class_forget_target <= 1, "class_forget_target", "must be in [0, 1]")
        require(0 < self.stop_min_p < 1, "stop_min_p", "must be in (0, 1)")
        require(0 <= self.stop_auc_margin <= 0.5, "stop_auc_margin", "must be in [0, 0.5]")
        require(0 <= self.retain_sample_size <= 10**9, "retain_sample_size",
                f"must be in [0, 1e9] (0 = all of Dr), got {self.retain_sample_size}")
        require(1 <= self.batch_size <= 65536, "batch_size", f"must be in [1, 65536], got {self.batch_size}")

    def schedule(self) -> tuple[str, float, int]:
        """(optimiser, learning rate, step budget) of the update mode."""
        if self.update == "adam-one-step":
            return "adam", self.adam_lr, 1
        if self.update == "adam":
            return "adam", self.adam_lr, self.max_steps
        return "sgd", self.sgd_lr, self.max_steps


def retain_sample(retain: ExampleSet, size: int, seed: int) -> ExampleSet:
    """All of ``retain`` when ``size`` is 0 or not smaller, else a uniform sample of ``size`` examples."""
    if size == 0 or size >= len(retain):
        return retain
    order = torch.randperm(len(retain), generator=torch.Generator().manual_seed(seed))
    return retain.subset(order[:size].sort().values)


def iau_target(request: UnlearnRequest, config: IAUConfig, method: str) -> ForgetTarget | None:
    """The forgetting target the ``adam`` and ``sgd`` modes stop at, and ``adam-one-step`` reports."""
    if not config.stop_at_target:
        return None
    return ForgetTarget(request.task, request.tune, request.forget_classes, config.class_forget_target,
                        config.stop_min_p, config.stop_auc_margin, method)


def outcome(check: ForgetCheck | None, steps: int, budget: int, config: IAUConfig) -> tuple[bool | None, str]:
    """``target_reached`` and the message of an IAU run (shared with ``gu+iau``): never silent on failure."""
    reached, message = run_outcome(check, steps, budget)
    if reached is False and not check.over and config.update == "adam-one-step":
        message = "the reference's single step did not reach the forgetting target"
    return reached, message


@register("iau", IAUConfig, needs_retain=True)
def iau(model: nn.Module, request: UnlearnRequest, config: IAUConfig) -> UnlearnResult:
    """Influence approximation: forget-mean ascent plus retain-mean correction, stepped until the target."""
    task, forget = request.task, request.forget
    retain = retain_sample(request.require_retain("iau"), config.retain_sample_size, request.seed)
    target = iau_target(request, config, "iau")
    work = copy_model(model)
    work.eval()  # gradients with frozen normalisation statistics, no dropout
    params = trainable_parameters(work)
    optimizer_name, lr, budget = config.schedule()
    optimizer = make_unlearning_optimizer(optimizer_name, params, lr)

    norms, steps, check = [], 0, None
    while True:
        # adam-one-step takes its one step whatever the target says (the reference), then reports it
        if target is not None and (steps > 0 or config.update != "adam-one-step"):
            check = target.check(work, forget)
            if target.done(check):
                break
        if steps >= budget:
            break
        retain_gradient = mean_objective_gradient(task, work, retain, config.batch_size, params)
        forget_gradient = mean_objective_gradient(task, work, forget, config.batch_size, params)
        write_gradient(params, retain_gradient - forget_gradient)  # descend L(Dr) - L(Df)
        optimizer.step()
        steps += 1
        norms.append({"forget_grad_norm": float(forget_gradient.norm()),
                      "retain_grad_norm": float(retain_gradient.norm())})
        request.report(steps / budget, f"step {steps}/{budget}")

    work.zero_grad(set_to_none=True)
    reached, message = outcome(check, steps, budget, config)
    details = {"update": config.update, "lr": lr, "steps": steps, "max_steps": budget,
               "retain_used": len(retain), "retain_sampled": len(retain) < len(request.retain),
               **(norms[0] if norms else {})}
    if check is not None:
        details.update(check.details())
    return UnlearnResult(work, details=details, target_reached=reached, message=message)
