"""SSD: Selective Synaptic Dampening (Foster, Schoepf, Brintrup, AAAI 2024, arXiv 2308.07707).

Retrain-free and post hoc. With I_D the diagonal-Fisher importance of every parameter element over the
full training set and I_Df the same over the forget set (both from :mod:`unlearn.importance`, same batch
size), every element with ``I_Df > alpha * I_D`` (strict) is multiplied by
``beta = min(lambda * I_D / I_Df, 1)`` (paper Eq. 3-4). All parameters are eligible: conv and linear
weights, biases, norm-layer affine parameters and the head. ``I_D == 0 < I_Df`` selects the element and
zeroes it.

I_D does not depend on the request and comes from the cached :class:`~unlearn.importance.TrainImportance`,
so a request costs one forward/backward pass over Df plus an element-wise pass over the parameters.

Mutates in place: no (works on a copy; the caller's model is unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unlearn.importance import Importance, estimate_importance
from unlearn.registry import UnlearnRequest, UnlearnResult, copy_model, register, require


@dataclass(frozen=True)
class SSDConfig:
    """Hyper-parameters of SSD (arXiv 2308.07707, Sec. 4.1).

    alpha: selection weighting, paper symbol alpha; an element is dampened when I_Df > alpha * I_D.
        Paper default 10 (ResNet18, every scenario); ViT uses 5 (full class), 25 (sub-class), 10 (random).
    lam: dampening constant, paper symbol lambda; beta = min(lambda * I_D / I_Df, 1). Paper default 1.
    batch_size: mini-batch size of both importance passes (I_D and I_Df must share it, since the
        estimator squares batch-mean gradients). Not a paper hyper-parameter; Lethe default 64.
    """

    alpha: float = 10.0
    lam: float = 1.0
    batch_size: int = 64

    def __post_init__(self) -> None:
        require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        require(self.lam > 0, "lam", f"must be > 0, got {self.lam}")
        require(1 <= self.batch_size <= 65536, "batch_size", f"must be in [1, 65536], got {self.batch_size}")


@torch.no_grad()
def dampen_(model: nn.Module, train_importance: Importance, forget_importance: Importance, alpha: float,
            lam: float) -> dict[str, float]:
    """Apply SSD's selection and dampening to ``model`` IN PLACE; returns how much was touched."""
    selected_total = 0
    elements = 0
    for name, parameter in model.named_parameters():
        if name not in train_importance:
            continue
        i_train, i_forget = train_importance[name], forget_importance[name]
        selected = i_forget > alpha * i_train  # strict, as in the paper
        # beta only matters where selected, and there I_Df > 0, so the division is safe.
        beta = torch.clamp(lam * i_train / torch.where(selected, i_forget, torch.ones_like(i_forget)), max=1.0)
        parameter.mul_(torch.where(selected, beta, torch.ones_like(beta)))
        selected_total += int(selected.sum())
        elements += selected.numel()
    return {"selected_elements": selected_total, "selected_fraction": selected_total / max(elements, 1)}


@register("ssd", SSDConfig, needs_retain=False)
def ssd(model: nn.Module, request: UnlearnRequest, config: SSDConfig) -> UnlearnResult:
    """Selective Synaptic Dampening with the paper's fixed alpha and lambda."""
    source = request.require_train_importance("ssd")
    request.report(0.0, "importance of the training set (cached per model version)")
    train_importance = source.get(model, config.batch_size, "fisher")
    work = copy_model(model)
    request.report(0.3, "importance of the forget set")
    forget_importance = estimate_importance(request.task, work, request.forget, config.batch_size, "fisher")
    request.report(0.8, "dampening")
    details = dampen_(work, train_importance, forget_importance, config.alpha, config.lam)
    request.report(1.0, "done")
    return UnlearnResult(work, details={"alpha": config.alpha, "lam": config.lam, **details})
