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

- ``adam-one-step`` (default, the reference implementation): ONE step of a freshly created Adam with
  lr 1e-3. A fresh Adam's first step is ``lr * g / (|g| + eps)``, about ``lr * sign(g)``: every weight whose
  combined gradient is not negligible moves by about lr, whatever the gradient's scale. That makes the
  step size independent of how converged the model is, which is why it is the default (and it is what the
  paper measured).
- ``sgd``: ``sgd_steps`` plain gradient steps of size ``sgd_lr``, each on freshly computed full-batch
  means at the current weights; the step is proportional to the gradient, so it must be tuned per model.

Gradient correction over all of Dr costs O(|Dr|): ``retain_sample_size`` > 0 uses a uniform sample of
that many retain examples (drawn with the request's seed) and the result reports what was used.

Gradients are taken in eval mode (running normalisation statistics, no dropout).

Cost: per step, one forward/backward pass over Df and one over the retain sample.

Mutates in place: no (works on a copy; the caller's model is unchanged).

Differences from the paper: the sampled retain subset and the ``sgd`` mode are Lethe's options; the paper
(and its code) takes the single Adam step over all of Dr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from unlearn.data import ExampleSet
from unlearn.gradients import make_unlearning_optimizer, mean_objective_gradient, trainable_parameters, write_gradient
from unlearn.registry import UnlearnRequest, UnlearnResult, copy_model, register, require


@dataclass(frozen=True)
class IAUConfig:
    """Hyper-parameters of IAU (arXiv 2507.23257).

    update: ``adam-one-step`` (reference code: one step of a fresh Adam) or ``sgd`` (plain gradient steps).
    adam_lr: Adam's learning rate in ``adam-one-step`` mode; reference default 1e-3.
    sgd_lr: step size in ``sgd`` mode (no paper default). Lethe default 0.1: on the digits CNN the largest of
        0.01/0.03/0.1/0.3/1 that kept held-out accuracy; from 0.3 up, three steps of ascent on the unbounded
        forget loss run away (gradients grow as the loss grows) and collapse the model to chance.
    sgd_steps: number of ``sgd`` steps, gradients recomputed before each (a "few steps"; default 3).
    retain_sample_size: 0 uses all of Dr for the gradient correction; n > 0 a uniform sample of n retain
        examples (all of Dr when it is smaller). Not in the paper.
    batch_size: chunk size of the full-batch gradient passes (does not change the maths for classifiers).
    """

    update: Literal["adam-one-step", "sgd"] = "adam-one-step"
    adam_lr: float = 1e-3
    sgd_lr: float = 0.1
    sgd_steps: int = 3
    retain_sample_size: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        require(self.update in ("adam-one-step", "sgd"), "update",
                f"must be 'adam-one-step' or 'sgd', got {self.update!r}")
        require(0 < self.adam_lr <= 1.0, "adam_lr", f"must be in (0, 1], got {self.adam_lr}")
        require(0 < self.sgd_lr <= 1000.0, "sgd_lr", f"must be in (0, 1000], got {self.sgd_lr}")
        require(1 <= self.sgd_steps <= 100, "sgd_steps", f"must be in [1, 100], got {self.sgd_steps}")
        require(0 <= self.retain_sample_size <= 10**9, "retain_sample_size",
                f"must be in [0, 1e9] (0 = all of Dr), got {self.retain_sample_size}")
        require(1 <= self.batch_size <= 65536, "batch_size", f"must be in [1, 65536], got {self.batch_size}")


def retain_sample(retain: ExampleSet, size: int, seed: int) -> ExampleSet:
    """All of ``retain`` when ``size`` is 0 or not smaller, else a uniform sample of ``size`` examples."""
    if size == 0 or size >= len(retain):
        return retain
    order = torch.randperm(len(retain), generator=torch.Generator().manual_seed(seed))
    return retain.subset(order[:size].sort().values)


@register("iau", IAUConfig, needs_retain=True)
def iau(model: nn.Module, request: UnlearnRequest, config: IAUConfig) -> UnlearnResult:
    """Influence approximation: forget-mean ascent plus retain-mean correction in one (or a few) steps."""
    task, forget = request.task, request.forget
    retain = retain_sample(request.require_retain("iau"), config.retain_sample_size, request.seed)
    work = copy_model(model)
    work.eval()  # gradients with frozen normalisation statistics, no dropout
    params = trainable_parameters(work)
    if config.update == "adam-one-step":
        optimizer, steps, lr = make_unlearning_optimizer("adam", params, config.adam_lr), 1, config.adam_lr
    else:
        optimizer, steps, lr = make_unlearning_optimizer("sgd", params, config.sgd_lr), config.sgd_steps, config.sgd_lr

    norms = []
    for step in range(steps):
        retain_gradient = mean_objective_gradient(task, work, retain, config.batch_size, params)
        forget_gradient = mean_objective_gradient(task, work, forget, config.batch_size, params)
        write_gradient(params, retain_gradient - forget_gradient)  # descend L(Dr) - L(Df)
        optimizer.step()
        norms.append({"forget_grad_norm": float(forget_gradient.norm()),
                      "retain_grad_norm": float(retain_gradient.norm())})
        request.report((step + 1) / steps, f"step {step + 1}/{steps}")

    work.zero_grad(set_to_none=True)
    details = {"update": config.update, "lr": lr, "steps": steps, "retain_used": len(retain),
               "retain_sampled": len(retain) < len(request.retain), **norms[0]}
    return UnlearnResult(work, details=details)
