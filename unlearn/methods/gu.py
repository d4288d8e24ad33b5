"""``gu+ga``, ``gu+graddiff``, ``gu+npo``, ``gu+iau``, ``gu+flat``, ``gu+simnpo``: Geometric-disentanglement Unlearning (arXiv 2511.17100).

GU is a plug-in for any gradient-based unlearning method: keep only the part of the method's FORGET update
that is orthogonal to the span of retain gradients, so that, to first order, the step leaves the retain
loss unchanged. Each wrapped method runs its own objective; GU changes the gradient the optimiser sees.

Before every optimiser step (the loops below write ``p.grad`` themselves, then call ``optimizer.step()``;
the reference code's override hook was never called by its trainer, so its projection never ran):

1. Basis. ``rank`` retain mini-batches (``basis_batch_size`` each, a seeded reshuffling stream) give raw
   gradients g_r,1..k of the retain loss; they are orthonormalised in order (Gram-Schmidt, twice) and a
   direction joins while its residual, relative to its own norm, exceeds ``residual_tolerance`` (1e-6).
   The gradients are recomputed every ``basis_refresh_steps`` steps (default 5) at the current weights;
   the projection itself runs before every step.
2. Metric. ``euclidean``: S = I. ``adam``: ``S = diag((sqrt(v_hat) + eps)^(-1/2))`` from the optimiser's
   second moment (Adam moves by about ``-lr * S^2 g``, so orthogonality must hold for S-whitened vectors).
3. Projection. ``z_f = S g_f``, ``Q = orthonormal(S G_r)``, ``z_perp = z_f - Q Q^T z_f``; the forget part of
   the update is ``S^-1 z_perp``. Optional joint rule (``joint=true``): with ``a = Q^T z_f``, ``b = Q^T z_r``
   (``z_r`` the whitened mean of the basis gradients), tangent components with ``a_i b_i > joint_tau`` (they
   also lower the retain loss) are kept, capped at ``joint_tangent_cap * ||z_perp||``, and
   ``joint_beta_rep * Q b`` is added.
4. Retain terms of the base method (GradDiff's ``alpha`` term, IAU's gradient correction) are added
   unprojected: they are descent on the retain loss already.

Where the basis lives: by default (``scope="global"``) over ALL trainable parameters of the model as one
flat vector, so the guarantee is about the whole network's retain loss; ``scope="per-tensor"`` builds a
separate basis per parameter tensor (a stronger constraint: k directions removed from every tensor).
For the digits CNN (~39k parameters) k = 8 directions cost 8 x 39k floats.

Guarantee, exactly: with plain SGD (``optimizer="sgd"``, or IAU's ``sgd`` update) and the Euclidean metric,
the step is orthogonal to every basis gradient to working precision (tested). With Adam and the ``adam``
metric it holds up to Adam's momentum and the update of v_hat by the current gradient; before Adam's first
step ``v_hat`` is taken as the square of the unprojected gradient. IAU's ``adam-one-step`` is a sign-like
step, so any projection there is approximate: the sign of a projected vector is not orthogonal to anything
in particular.

Cost per step: the base method's, plus ``rank`` retain mini-batch forward/backward passes on refresh steps,
plus O(rank^2 n) for the basis.

Mutates in place: no (works on a copy; the caller's model is unchanged).

Differences from the paper: the residual threshold is applied to unit-normalised candidates (scale-free);
the basis can be refreshed every few steps instead of every step; the Adam metric falls back to the
unprojected gradient before Adam has a second moment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from unlearn.data import Batch, ExampleSet
from unlearn.errors import InvalidParameterError
from unlearn.forget_target import DEFAULT_STOP_AUC_MARGIN, DEFAULT_STOP_MIN_P, ForgetTarget, run_outcome
from unlearn.gradients import (
    JointRule,
    adam_whitening,
    batch_stream,
    flat_gradient,
    gu_direction,
    make_unlearning_optimizer,
    mean_objective_gradient,
    parameter_blocks,
    retain_gradient_matrix,
    trainable_parameters,
    write_gradient,
)
from unlearn.methods.ga import GAConfig, ga_loss
from unlearn.methods.graddiff import GradDiffConfig, graddiff_forget_loss, graddiff_retain_loss
from unlearn.methods.iau import IAUConfig, iau_target, retain_sample
from unlearn.methods.iau import outcome as iau_outcome
from unlearn.methods.flat import DIVERGENCES, flat_loss, with_templates
from unlearn.methods.npo import NPOConfig, npo_loss, with_reference_nll
from unlearn.methods.simnpo import SimNPOConfig, simnpo_loss
from unlearn.registry import UnlearnRequest, UnlearnResult, copy_model, model_device, register, require


@dataclass(frozen=True)
class GUSettings:
    """GU's own hyper-parameters (arXiv 2511.17100); every ``gu+<method>`` config has these fields too.

    rank: number of retain-gradient directions k, paper default 8. Must not exceed the number of retain
        mini-batches of ``basis_batch_size``.
    basis_batch_size: retain mini-batch size of each basis gradient; 0 (Lethe default) = automatic,
        ``min(32, |Dr| // rank)`` (at least 1), so the default rank fits any retain set of >= 8 records.
    basis_refresh_steps: recompute the basis every this many optimiser steps (1 = before every step, as the
        paper). Lethe default 5: on the digits benchmark's held-out sample it kept the same accuracy as 1
        (within 0.4 points) at a third to a half of the cost; the projection itself runs every step.
    metric: ``euclidean`` or ``adam`` (whitening with Adam's second moment; needs an Adam optimiser).
        Lethe default ``adam``, the metric of every wrapped method's default (Adam) optimiser; use
        ``euclidean`` with ``optimizer="sgd"`` (or IAU's ``update="sgd"``) for the exact guarantee.
    scope: ``global`` (one basis over all trainable parameters) or ``per-tensor``.
    residual_tolerance: a candidate joins the basis while its relative residual exceeds this; paper 1e-6.
    joint: apply the joint forget/retain rule (paper option; off by default).
    joint_tau: threshold tau of the joint rule (keep tangent component i when a_i * b_i > tau). Lethe 0.
    joint_tangent_cap: cap of the kept tangent part relative to ||z_f_perp||. Lethe default 1.
    joint_beta_rep: weight beta_rep of the added retain tangent part Q Q^T z_r. Lethe default 0.1.
    """

    rank: int = 8
    basis_batch_size: int = 0
    basis_refresh_steps: int = 5
    metric: Literal["euclidean", "adam"] = "adam"
    scope: Literal["global", "per-tensor"] = "global"
    residual_tolerance: float = 1e-6
    joint: bool = False
    joint_tau: float = 0.0
    joint_tangent_cap: float = 1.0
    joint_beta_rep: float = 0.1

    def __post_init__(self) -> None:
        require(1 <= self.rank <= 256, "rank", f"must be in [1, 256], got {self.rank}")
        require(0 <= self.basis_batch_size <= 65536, "basis_batch_size",
                f"must be in [0, 65536] (0 = automatic), got {self.basis_batch_size}")
        require(1 <= self.basis_refresh_steps <= 10**6, "basis_refresh_steps",
                f"must be in [1, 1e6], got {self.basis_refresh_steps}")
        require(self.metric in ("euclidean", "adam"), "metric", f"must be 'euclidean' or 'adam', got {self.metric!r}")
        require(self.scope in ("global", "per-tensor"), "scope",
                f"must be 'global' or 'per-tensor', got {self.scope!r}")
        require(0 < self.residual_tolerance < 1, "residual_tolerance",
                f"must be in (0, 1), got {self.residual_tolerance}")
        require(-1e6 <= self.joint_tau <= 1e6, "joint_tau", f"must be finite, got {self.joint_tau}")
        require(0 <= self.joint_tangent_cap <= 100, "joint_tangent_cap",
                f"must be in [0, 100], got {self.joint_tangent_cap}")
        require(0 <= self.joint_beta_rep <= 100, "joint_beta_rep", f"must be in [0, 100], got {self.joint_beta_rep}")

    def joint_rule(self) -> JointRule | None:
        return JointRule(self.joint_tau, self.joint_tangent_cap, self.joint_beta_rep) if self.joint else None


_GU_FIELDS = tuple(f.name for f in dataclasses.fields(GUSettings))


# Every ``gu+<method>`` config is written out below: the base method's fields (same names, types and
# defaults as the base config, whose docstring documents them), then GU's (documented in GUSettings).
# Validation builds the base config and GUSettings from those fields, so every range check and message is
# the base method's or GU's own; tests/unlearn/test_gu.py pins the defaults to the base configs'.

def _base(config: Any, base_cls: type) -> Any:
    return base_cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(base_cls)})


def _settings(config: Any) -> GUSettings:
    return GUSettings(**{name: getattr(config, name) for name in _GU_FIELDS})


def _validate(config: Any, uses_adam: bool) -> None:
    """Both halves' own checks, then: the ``adam`` metric needs an Adam optimiser to whiten with."""
    config.base()
    if config.settings().metric == "adam" and not uses_adam:
        raise InvalidParameterError("metric", "the 'adam' metric whitens with Adam's second moment and needs "
                                    "the Adam optimiser; use metric='euclidean' with plain SGD")


@dataclass(frozen=True)
class FLATStepsConfig:
    """FLAT's settings as GU's step loop runs it (``gu+flat``; FLAT itself: arXiv 2410.11143).

    divergence: the f-divergence, one of ``kl``, ``js``, ``pearson``, ``tv`` (reference default ``tv``).
    lr: learning rate. Lethe default 1e-3 for the tiny benchmark GPT (paper 1e-5 on 7B models).
    optimizer: ``adam`` (GU's Adam metric whitens with its second moment) or ``sgd``.
    batch_size: forget mini-batch size. Lethe default 16.
    max_steps: upper bound on optimiser steps (``flat`` counts epochs instead).
    stop_at_target: stop as soon as the forgetting target is reached.
    class_forget_target: class erasure is done when forget accuracy <= this.
    stop_min_p, stop_auc_margin: record erasure is done when the forget set's per-example losses are
        indistinguishable from the never-trained ``tune`` records' (KS p-value >= stop_min_p and loss-attack
        AUC <= 0.5 + stop_auc_margin); the run also stops, with ``target_reached=False``, when it went beyond
        (:mod:`unlearn.forget_target`).

    Differences from ``flat``: Adam without FLAT's AdamW weight decay (0.01), because GU's Adam metric is
    derived for Adam's update, and a step budget instead of epochs, like the other wrapped methods.
    """

    divergence: Literal["kl", "js", "pearson", "tv"] = "tv"
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    batch_size: int = 16
    max_steps: int = 200
    stop_at_target: bool = True
    class_forget_target: float = 0.02
    stop_min_p: float = DEFAULT_STOP_MIN_P
    stop_auc_margin: float = DEFAULT_STOP_AUC_MARGIN

    def __post_init__(self) -> None:
        require(self.divergence in DIVERGENCES, "divergence", f"must be one of {sorted(DIVERGENCES)}")
        require(0 < self.lr <= 1.0, "lr", f"must be in (0, 1], got {self.lr}")
        require(1 <= self.batch_size <= 65536, "batch_size", f"must be in [1, 65536], got {self.batch_size}")
        require(1 <= self.max_steps <= 100_000, "max_steps", f"must be in [1, 100000], got {self.max_steps}")
        require(0 <= self.class_forget_target <= 1, "class_forget_target", "must be in [0, 1]")
        require(0 < self.stop_min_p < 1, "stop_min_p", "must be in (0, 1)")
        require(0 <= self.stop_auc_margin <= 0.5, "stop_auc_margin", "must be in [0, 0.5]")


@dataclass(frozen=True)
class GUGAConfig:
    """``gu+ga``: GA's fields, then GU's (written out: no config is generated at run time).

    Fields of the base method, with its defaults (meaning, symbol and default in :class:`GAConfig`): lr,
    optimizer, batch_size, max_steps, stop_at_target, class_forget_target, stop_min_p, stop_auc_margin.
    GU's fields (meaning, paper symbol and default in :class:`GUSettings`): rank, basis_batch_size,
    basis_refresh_steps, metric, scope, residual_tolerance, joint, joint_tau, joint_tangent_cap,
    joint_beta_rep.
    """

    # GA (GAConfig)
    lr: float = 3e-4
    optimizer: Literal["adam", "sgd"] = "adam"
    batch_size: int = 32
    max_steps: int = 200
    stop_at_target: bool = True
    class_forget_target: float = 0.02
    stop_min_p: float = DEFAULT_STOP_MIN_P
    stop_auc_margin: float = DEFAULT_STOP_AUC_MARGIN
    # GU (GUSettings)
    rank: int = 8
    basis_batch_size: int = 0
    basis_refresh_steps: int = 5
    metric: Literal["euclidean", "adam"] = "adam"
    scope: Literal["global", "per-tensor"] = "global"
    residual_tolerance: float = 1e-6
    joint: bool = False
    joint_tau: float = 0.0
    joint_tangent_cap: float = 1.0
    joint_beta_rep: float = 0.1

    def base(self) -> GAConfig:
        return _base(self, GAConfig)

    def settings(self) -> GUSettings:
        return _settings(self)

    def __post_init__(self) -> None:
        _validate(self, self.optimizer == "adam")


@dataclass(frozen=True)
class GUGradDiffConfig:
    """``gu+graddiff``: GradDiff's fields, then GU's (written out: no config is generated at run time).

    Fields of the base method, with its defaults (meaning, symbol and default in
    :class:`GradDiffConfig`): gamma, alpha, lr, optimizer, batch_size, max_steps, stop_at_target,
    class_forget_target, stop_min_p, stop_auc_margin.
    GU's fields (meaning, paper symbol and default in :class:`GUSettings`): rank, basis_batch_size,
    basis_refresh_steps, metric, scope, residual_tolerance, joint, joint_tau, joint_tangent_cap,
    joint_beta_rep.
    """

    # GradDiff (GradDiffConfig)
    gamma: float = 1.0
    alpha: float = 1.0
    lr: float = 3e-4
    optimizer: Literal["adam", "sgd"] = "adam"
    batch_size: int = 32
    max_steps: int = 200
    stop_at_target: bool = True
    class_forget_target: float = 0.02
    stop_min_p: float = DEFAULT_STOP_MIN_P
    stop_auc_margin: float = DEFAULT_STOP_AUC_MARGIN
    # GU (GUSettings)
    rank: int = 8
    basis_batch_size: int = 0
    basis_refresh_steps: int = 5
    metric: Literal["euclidean", "adam"] = "adam"
    scope: Literal["global", "per-tensor"] = "global"
    residual_tolerance: float = 1e-6
    joint: bool = False
    joint_tau: float = 0.0
    joint_tangent_cap: float = 1.0
    joint_beta_rep: float = 0.1

    def base(self) -> GradDiffConfig:
        return _base(self, GradDiffConfig)

    def settings(self) -> GUSettings:
        return _settings(self)

    def __post_init__(self) -> None:
        _validate(self, self.optimizer == "adam")


@dataclass(frozen=True)
class GUNPOConfig:
    """``gu+npo``: NPO's fields, then GU's (written out: no config is generated at run time).

    Fields of the base method, with its defaults (meaning, symbol and default in :class:`NPOConfig`):
    beta, lr, optimizer, batch_size, max_steps, stop_at_target, class_forget_target, stop_min_p,
    stop_auc_margin.
    GU's fields (meaning, paper symbol and default in :class:`GUSettings`): rank, basis_batch_size,
    basis_refresh_steps, metric, scope, residual_tolerance, joint, joint_tau, joint_tangent_cap,
    joint_beta_rep.
    """

    # NPO (NPOConfig)
    beta: float = 0.1
    lr: float = 3e-4
    optimizer: Literal["adam", "sgd"] = "adam"
    batch_size: int = 32
    max_steps: int = 200
    stop_at_target: bool = True
    class_forget_target: float = 0.02
    stop_min_p: float = DEFAULT_STOP_MIN_P
    stop_auc_margin: float = DEFAULT_STOP_AUC_MARGIN
    # GU (GUSettings)
    rank: int = 8
    basis_batch_size: int = 0
    basis_refresh_steps: int = 5
    metric: Literal["euclidean", "adam"] = "adam"
    scope: Literal["global", "per-tensor"] = "global"
    residual_tolerance: float = 1e-6
    joint: bool = False
    joint_tau: float = 0.0
    joint_tangent_cap: float = 1.0
    joint_beta_rep: float = 0.1

    def base(self) -> NPOConfig:
        return _base(self, NPOConfig)

    def settings(self) -> GUSettings:
        return _settings(self)

    def __post_init__(self) -> None:
        _validate(self, self.optimizer == "adam")


@dataclass(frozen=True)
class GUIAUConfig:
    """``gu+iau``: IAU's fields, then GU's (written out: no config is generated at run time).

    Fields of the base method, with its defaults (meaning, symbol and default in :class:`IAUConfig`):
    update, adam_lr, sgd_lr, max_steps, stop_at_target, class_forget_target, stop_min_p,
    stop_auc_margin, retain_sample_size, batch_size.
    GU's fields (meaning, paper symbol and default in :class:`GUSettings`): rank, basis_batch_size,
    basis_refresh_steps, metric, scope, residual_tolerance, joint, joint_tau, joint_tangent_cap,
    joint_beta_rep.
    """

    # IAU (IAUConfig)
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
    # GU (GUSettings)
    rank: int = 8
    basis_batch_size: int = 0
    basis_refresh_steps: int = 5
    metric: Literal["euclidean", "adam"] = "adam"
    scope: Literal["global", "per-tensor"] = "global"
    residual_tolerance: float = 1e-6
    joint: bool = False
    joint_tau: float = 0.0
    joint_tangent_cap: float = 1.0
    joint_beta_rep: float = 0.1

    def base(self) -> IAUConfig:
        return _base(self, IAUConfig)

    def settings(self) -> GUSettings:
        return _settings(self)

    def __post_init__(self) -> None:
        _validate(self, self.update in ("adam", "adam-one-step"))


@dataclass(frozen=True)
class GUFLATConfig:
    """``gu+flat``: FLAT's fields, then GU's (written out: no config is generated at run time).

    Fields of the base method, with its defaults (meaning, symbol and default in
    :class:`FLATStepsConfig`): divergence, lr, optimizer, batch_size, max_steps, stop_at_target,
    class_forget_target, stop_min_p, stop_auc_margin.
    GU's fields (meaning, paper symbol and default in :class:`GUSettings`): rank, basis_batch_size,
    basis_refresh_steps, metric, scope, residual_tolerance, joint, joint_tau, joint_tangent_cap,
    joint_beta_rep.
    """

    # FLATSteps (FLATStepsConfig)
    divergence: Literal["kl", "js", "pearson", "tv"] = "tv"
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    batch_size: int = 16
    max_steps: int = 200
    stop_at_target: bool = True
    class_forget_target: float = 0.02
    stop_min_p: float = DEFAULT_STOP_MIN_P
    stop_auc_margin: float = DEFAULT_STOP_AUC_MARGIN
    # GU (GUSettings)
    rank: int = 8
    basis_batch_size: int = 0
    basis_refresh_steps: int = 5
    metric: Literal["euclidean", "adam"] = "adam"
    scope: Literal["global", "per-tensor"] = "global"
    residual_tolerance: float = 1e-6
    joint: bool = False
    joint_tau: float = 0.0
    joint_tangent_cap: float = 1.0
    joint_beta_rep: float = 0.1

    def base(self) -> FLATStepsConfig:
        return _base(self, FLATStepsConfig)

    def settings(self) -> GUSettings:
        return _settings(self)

    def __post_init__(self) -> None:
        _validate(self, self.optimizer == "adam")


@dataclass(frozen=True)
class GUSimNPOConfig:
    """``gu+simnpo``: SimNPO's fields, then GU's (written out: no config is generated at run time).

    Fields of the base method, with its defaults (meaning, symbol and default in :class:`SimNPOConfig`):
    beta, delta, lr, optimizer, batch_size, max_steps, stop_at_target, class_forget_target, stop_min_p,
    stop_auc_margin.
    GU's fields (meaning, paper symbol and default in :class:`GUSettings`): rank, basis_batch_size,
    basis_refresh_steps, metric, scope, residual_tolerance, joint, joint_tau, joint_tangent_cap,
    joint_beta_rep.
    """

    # SimNPO (SimNPOConfig)
    beta: float = 4.5
    delta: float = 0.0
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    batch_size: int = 16
    max_steps: int = 200
    stop_at_target: bool = True
    class_forget_target: float = 0.02
    stop_min_p: float = DEFAULT_STOP_MIN_P
    stop_auc_margin: float = DEFAULT_STOP_AUC_MARGIN
    # GU (GUSettings)
    rank: int = 8
    basis_batch_size: int = 0
    basis_refresh_steps: int = 5
    metric: Literal["euclidean", "adam"] = "adam"
    scope: Literal["global", "per-tensor"] = "global"
    residual_tolerance: float = 1e-6
    joint: bool = False
    joint_tau: float = 0.0
    joint_tangent_cap: float = 1.0
    joint_beta_rep: float = 0.1

    def base(self) -> SimNPOConfig:
        return _base(self, SimNPOConfig)

    def settings(self) -> GUSettings:
        return _settings(self)

    def __post_init__(self) -> None:
        _validate(self, self.optimizer == "adam")



AUTO_BASIS_BATCH_SIZE = 32


def basis_batch_size(retain: ExampleSet, settings: GUSettings) -> int:
    """The basis mini-batch size (resolving 0 = automatic); rejects a rank above the number of batches."""
    size = settings.basis_batch_size or max(1, min(AUTO_BASIS_BATCH_SIZE, len(retain) // settings.rank))
    available = retain.num_batches(size)
    if settings.rank > available:
        raise InvalidParameterError("rank", f"{settings.rank} basis directions need as many retain mini-batches, "
                                    f"but the retain data give {available} of size {size}")
    return size


# One entry per wrapped mini-batch method: (forget examples, forget objective, retain objective or None),
# built on the working copy. Adding a method to GU is one function here and one registration below.
Objectives = tuple[ExampleSet, Callable[[Batch], Tensor], Callable[[Batch], Tensor] | None]


def _ga_objectives(request: UnlearnRequest, work: nn.Module, config: GAConfig) -> Objectives:
    return request.forget, lambda batch: ga_loss(request.task, work, batch), None


def _graddiff_objectives(request: UnlearnRequest, work: nn.Module, config: GradDiffConfig) -> Objectives:
    return (request.forget, lambda batch: graddiff_forget_loss(request.task, work, batch, config.gamma),
            lambda batch: graddiff_retain_loss(request.task, work, batch, config.alpha))


def _npo_objectives(request: UnlearnRequest, work: nn.Module, config: NPOConfig) -> Objectives:
    forget = with_reference_nll(request.task, work, request.forget, config.batch_size)  # before any update
    return forget, lambda batch: npo_loss(request.task, work, batch, config.beta), None


def _flat_objectives(request: UnlearnRequest, work: nn.Module, config: FLATStepsConfig) -> Objectives:
    forget = with_templates(request.task, work, request.forget, request.seed)  # one refusal per example
    return forget, lambda batch: flat_loss(request.task, work, batch, config.divergence), None


def _simnpo_objectives(request: UnlearnRequest, work: nn.Module, config: SimNPOConfig) -> Objectives:
    return (request.forget,
            lambda batch: simnpo_loss(request.task, work, batch, config.beta, config.delta), None)


def _gu_minibatch(name: str, objectives: Callable[[UnlearnRequest, nn.Module, Any], Objectives],
                  model: nn.Module, request: UnlearnRequest, config: Any) -> UnlearnResult:
    """GU around a mini-batch method (GA, GradDiff, NPO): the base's steps with the forget part projected."""
    base, gu = config.base(), config.settings()
    task, forget = request.task, request.forget
    retain = request.require_retain(name)
    basis_size = basis_batch_size(retain, gu)
    work = copy_model(model)
    work.eval()  # gradients with frozen normalisation statistics, no dropout
    target = (ForgetTarget(task, request.tune, request.forget_classes, base.class_forget_target,
                           base.stop_min_p, base.stop_auc_margin, name)
              if base.stop_at_target else None)
    params = trainable_parameters(work)
    blocks = parameter_blocks(params, gu.scope)
    optimizer = make_unlearning_optimizer(base.optimizer, params, base.lr)
    forget_set, forget_objective, retain_objective = objectives(request, work, base)
    device = model_device(work)
    forget_batches = batch_stream(forget_set, base.batch_size, device, torch.Generator().manual_seed(request.seed))
    retain_batches = batch_stream(retain, base.batch_size, device, torch.Generator().manual_seed(request.seed + 1))
    basis_batches = batch_stream(retain, basis_size, device, torch.Generator().manual_seed(request.seed + 2))
    max_steps = base.max_steps

    steps, check, ranks, removed = 0, None, [], []
    while True:
        if base.stop_at_target:
            check = target.check(work, forget)
            if target.done(check):
                break
        if steps >= max_steps:
            break
        if steps % gu.basis_refresh_steps == 0:
            retain_gradients = retain_gradient_matrix(lambda batch: task.batch_loss(work, batch), basis_batches,
                                                      gu.rank, params)
        forget_gradient = flat_gradient(forget_objective(next(forget_batches)), params)
        retain_gradient = (flat_gradient(retain_objective(next(retain_batches)), params)
                           if retain_objective is not None else torch.zeros_like(forget_gradient))
        whitening = (adam_whitening(optimizer, params, forget_gradient + retain_gradient)
                     if gu.metric == "adam" else None)
        projection = gu_direction(forget_gradient, retain_gradients, blocks, gu.rank, gu.residual_tolerance,
                                  whitening, gu.joint_rule())
        optimizer.zero_grad(set_to_none=True)
        write_gradient(params, projection.direction + retain_gradient)  # what optimizer.step() applies
        optimizer.step()
        steps += 1
        ranks.append(projection.rank)
        removed.append(projection.removed_fraction)
        request.report(steps / max_steps, f"step {steps}: removed {projection.removed_fraction:.3f} of the "
                                          f"forget gradient (basis rank {projection.rank})")

    work.zero_grad(set_to_none=True)
    details = {"steps": steps, "epochs": steps / forget.num_batches(base.batch_size), "lr": base.lr,
               "optimizer": base.optimizer, "metric": gu.metric, "scope": gu.scope, "joint": gu.joint,
               "rank": min(ranks) if ranks else 0, "requested_rank": gu.rank,
               "basis_batch_size": basis_size, "basis_refresh_steps": gu.basis_refresh_steps,
               "removed_fraction_mean": sum(removed) / len(removed) if removed else 0.0}
    if check is not None:
        details.update(check.details())
    reached, message = run_outcome(check, steps, max_steps)
    return UnlearnResult(work, details=details, target_reached=reached, message=message)


@register("gu+ga", GUGAConfig, needs_retain=True)
def gu_ga(model: nn.Module, request: UnlearnRequest, config: Any) -> UnlearnResult:
    """Gradient ascent with GU's projection of every step off the retain-gradient subspace."""
    return _gu_minibatch("gu+ga", _ga_objectives, model, request, config)


@register("gu+graddiff", GUGradDiffConfig, needs_retain=True)
def gu_graddiff(model: nn.Module, request: UnlearnRequest, config: Any) -> UnlearnResult:
    """Gradient difference with GU's projection of the forget term off the retain-gradient subspace."""
    return _gu_minibatch("gu+graddiff", _graddiff_objectives, model, request, config)


@register("gu+npo", GUNPOConfig, needs_retain=True)
def gu_npo(model: nn.Module, request: UnlearnRequest, config: Any) -> UnlearnResult:
    """NPO with GU's projection of every step off the retain-gradient subspace."""
    return _gu_minibatch("gu+npo", _npo_objectives, model, request, config)


@register("gu+flat", GUFLATConfig, needs_retain=True, tasks=("causal_lm",))
def gu_flat(model: nn.Module, request: UnlearnRequest, config: Any) -> UnlearnResult:
    """FLAT's f-divergence loss with the forget update projected off the retain-gradient span."""
    return _gu_minibatch("gu+flat", _flat_objectives, model, request, config)


@register("gu+simnpo", GUSimNPOConfig, needs_retain=True)
def gu_simnpo(model: nn.Module, request: UnlearnRequest, config: Any) -> UnlearnResult:
    """SimNPO with the forget update projected off the retain-gradient span."""
    return _gu_minibatch("gu+simnpo", _simnpo_objectives, model, request, config)


@register("gu+iau", GUIAUConfig, needs_retain=True)
def gu_iau(model: nn.Module, request: UnlearnRequest, config: Any) -> UnlearnResult:
    """IAU with GU's projection of the forget-mean ascent off the retain-gradient subspace."""
    base, gu = config.base(), config.settings()
    task, forget = request.task, request.forget
    retain = retain_sample(request.require_retain("gu+iau"), base.retain_sample_size, request.seed)
    basis_size = basis_batch_size(retain, gu)
    work = copy_model(model)
    work.eval()  # gradients with frozen normalisation statistics, no dropout
    params = trainable_parameters(work)
    blocks = parameter_blocks(params, gu.scope)
    optimizer_name, lr, budget = base.schedule()
    optimizer = make_unlearning_optimizer(optimizer_name, params, lr)
    target = iau_target(request, base, "gu+iau")
    basis_batches = batch_stream(retain, basis_size, model_device(work),
                                 torch.Generator().manual_seed(request.seed + 2))

    ranks, removed, steps, check = [], [], 0, None
    while True:
        if target is not None and (steps > 0 or base.update != "adam-one-step"):  # as iau
            check = target.check(work, forget)
            if target.done(check):
                break
        if steps >= budget:
            break
        retain_gradient = mean_objective_gradient(task, work, retain, base.batch_size, params)
        forget_gradient = mean_objective_gradient(task, work, forget, base.batch_size, params)
        if steps % gu.basis_refresh_steps == 0:
            retain_gradients = retain_gradient_matrix(lambda batch: task.batch_loss(work, batch), basis_batches,
                                                      gu.rank, params)
        whitening = (adam_whitening(optimizer, params, retain_gradient - forget_gradient)
                     if gu.metric == "adam" else None)
        # IAU's forget part is ascent: the optimiser descends -grad L(Df); that is what GU projects.
        projection = gu_direction(-forget_gradient, retain_gradients, blocks, gu.rank, gu.residual_tolerance,
                                  whitening, gu.joint_rule())
        optimizer.zero_grad(set_to_none=True)
        write_gradient(params, retain_gradient + projection.direction)
        optimizer.step()
        steps += 1
        ranks.append(projection.rank)
        removed.append(projection.removed_fraction)
        request.report(steps / budget, f"step {steps}/{budget}")

    work.zero_grad(set_to_none=True)
    reached, message = iau_outcome(check, steps, budget, base)
    details = {"update": base.update, "lr": lr, "steps": steps, "max_steps": budget, "retain_used": len(retain),
               "retain_sampled": len(retain) < len(request.retain), "metric": gu.metric, "scope": gu.scope,
               "joint": gu.joint, "rank": min(ranks) if ranks else 0, "requested_rank": gu.rank,
               "basis_batch_size": basis_size,
               "removed_fraction_mean": sum(removed) / len(removed) if removed else 0.0}
    if check is not None:
        details.update(check.details())
    return UnlearnResult(work, details=details, target_reached=reached, message=message)
