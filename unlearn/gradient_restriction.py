"""Gradient restriction (GR), the training-time part of IAU (arXiv 2507.23257), as a pure penalty.

IAU's one-step unlearning works best when no single training point dominates the loss gradient. GR trains
the ORIGINAL model with

    L = CE_batch + alpha_gr * sum over parameter tensors W of ||grad_W CE_batch||_2

(paper default ``alpha_gr = 0.005``), differentiating through the gradient norm (double backprop). Models
meant to be served by Lethe can be trained with it by setting ``TrainRecipe.gradient_restriction``;
:func:`unlearn.training.train` adds the penalty in its loop. IAU still runs on models trained without it.

Cost: the penalty needs the gradient graph (``create_graph=True``), so a GR training step costs about two
to three ordinary ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

DEFAULT_ALPHA_GR = 0.005  # arXiv 2507.23257, the reference value of alpha_gr


def gradient_restriction_penalty(loss: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    """``sum_W ||d loss / d W||_2`` over the given parameter tensors, differentiable (double backprop).

    Parameters that do not influence ``loss`` contribute 0. The norm's subgradient at 0 is taken as 0.
    """
    grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    norms = [grad.norm(2) for grad in grads if grad is not None]
    return torch.stack(norms).sum() if norms else loss.new_zeros(())
