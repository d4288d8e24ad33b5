"""LF-SSD: label-free Selective Synaptic Dampening (Foster, Schoepf, Brintrup, arXiv 2402.19308).

Same selection and dampening as SSD (:func:`unlearn.methods.ssd.dampen_`), but importance needs no labels:
it is the gradient of ``||f(x)||_2^2`` (mean over the batch of the squared output norm), accumulated as
``|grad|`` instead of ``grad**2`` (see :mod:`unlearn.importance`, variant ``label_free``).

Mutates in place: no.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from unlearn.importance import estimate_importance
from unlearn.methods.ssd import dampen_
from unlearn.registry import UnlearnRequest, UnlearnResult, copy_model, register, require


@dataclass(frozen=True)
class LFSSDConfig:
    """Hyper-parameters of LF-SSD (arXiv 2402.19308, Sec. 4).

    alpha: selection weighting (alpha); the paper keeps SSD's value, 10.
    lam: dampening constant (lambda); paper default 1.
    batch_size: batch size of both importance passes (must match). Lethe default 64.
    """

    alpha: float = 10.0
    lam: float = 1.0
    batch_size: int = 64

    def __post_init__(self) -> None:
        require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        require(self.lam > 0, "lam", f"must be > 0, got {self.lam}")
        require(1 <= self.batch_size <= 65536, "batch_size", f"must be in [1, 65536], got {self.batch_size}")


@register("lfssd", LFSSDConfig, needs_retain=False)
def lfssd(model: nn.Module, request: UnlearnRequest, config: LFSSDConfig) -> UnlearnResult:
    """Label-free SSD: importance from the output norm's gradient magnitude."""
    source = request.require_train_importance("lfssd")
    request.report(0.0, "label-free importance of the training set (cached per model version)")
    train_importance = source.get(model, config.batch_size, "label_free")
    work = copy_model(model)
    request.report(0.3, "label-free importance of the forget set")
    forget_importance = estimate_importance(request.task, work, request.forget, config.batch_size, "label_free")
    details = dampen_(work, train_importance, forget_importance, config.alpha, config.lam)
    request.report(1.0, "done")
    return UnlearnResult(work, details={"alpha": config.alpha, "lam": config.lam, **details})
