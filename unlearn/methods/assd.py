"""ASSD: parameter-free SSD (Schoepf, Foster, Brintrup, arXiv 2402.10098).

alpha is no longer a hyper-parameter: it is the p-th percentile of the ratio I_Df / I_D over all parameter
elements (NaN and inf dropped), with ``p = 100 - ln(1 + 100 * |Df| / |D|)``; lambda = 1. The rest is SSD.

Mutates in place: no.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from unlearn.errors import InvalidDataError
from unlearn.importance import Importance, estimate_importance
from unlearn.methods.ssd import dampen_
from unlearn.registry import UnlearnRequest, UnlearnResult, copy_model, register, require


@dataclass(frozen=True)
class ASSDConfig:
    """Hyper-parameters of ASSD (arXiv 2402.10098).

    batch_size: batch size of both importance passes (must match). Lethe default 64.
    lam: dampening constant (lambda); the paper fixes it to 1.
    """

    batch_size: int = 64
    lam: float = 1.0

    def __post_init__(self) -> None:
        require(self.lam > 0, "lam", f"must be > 0, got {self.lam}")
        require(1 <= self.batch_size <= 65536, "batch_size", f"must be in [1, 65536], got {self.batch_size}")


def importance_ratio(train_importance: Importance, forget_importance: Importance) -> Importance:
    """I_Df / I_D per element: inf where only I_Df is non-zero, NaN where both are zero."""
    return {name: forget_importance[name] / train_importance[name] for name in train_importance}


def percentile_alpha(ratio: Importance, forget_size: int, train_size: int) -> tuple[float, float]:
    """ASSD's alpha and the percentile p it was taken at."""
    if not 0 < forget_size < train_size:
        raise InvalidDataError("forget", f"needs 0 < |Df| < |D|, got |Df|={forget_size}, |D|={train_size}")
    percentile = 100.0 - math.log(1.0 + 100.0 * forget_size / train_size)
    values = torch.cat([r.flatten() for r in ratio.values()]).double()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        raise InvalidDataError("forget", "no parameter has a finite importance ratio")
    # torch.quantile caps its input size; numpy's percentile is exact and fast on the CPU.
    alpha = float(np.percentile(values.cpu().numpy(), percentile))
    return alpha, percentile


@register("assd", ASSDConfig, needs_retain=False)
def assd(model: nn.Module, request: UnlearnRequest, config: ASSDConfig) -> UnlearnResult:
    """Parameter-free SSD: alpha from a percentile of the importance ratio."""
    source = request.require_train_importance("assd")
    train_importance = source.get(model, config.batch_size, "fisher")
    work = copy_model(model)
    request.report(0.3, "importance of the forget set")
    forget_importance = estimate_importance(request.task, work, request.forget, config.batch_size, "fisher")
    alpha, percentile = percentile_alpha(importance_ratio(train_importance, forget_importance),
                                         len(request.forget), len(source))
    details = dampen_(work, train_importance, forget_importance, alpha, config.lam)
    request.report(1.0, "done")
    return UnlearnResult(work, details={"alpha": alpha, "percentile": percentile, "lam": config.lam, **details})
