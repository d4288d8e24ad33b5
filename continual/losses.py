"""Anti-forgetting terms shared by several strategies, as pure functions the loops add up in plain sight.

- :func:`output_rows`: which outputs a term compares. A classifier's logits are one row per example. A
  causal LM's logits at position t predict token t + 1; ``part="targets"`` keeps the positions that predict
  an answer token (what the model is trained to produce), ``part="context"`` the real positions that do not
  (the prompt: general language the current version already models).
- :func:`distill_loss`: knowledge distillation, ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
  summed over classes and averaged over rows (Hinton et al. 2015; LwF, arXiv 1606.09282). The ``T^2``
  keeps its gradient on the scale of the cross-entropy's as T grows.
- :func:`logit_mse`: DER's logit-matching term, mean squared error between current and stored logits,
  averaged over rows and classes (Buzzega et al., arXiv 2004.07211, Eq. 4: ``||z' - h(x')||_2^2``, which the
  reference code implements as ``F.mse_loss``, i.e. also divided by the number of classes).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from unlearn.data import Batch


def output_rows(outputs: Tensor, batch: Batch, part: Literal["targets", "context"] = "targets") -> Tensor:
    """[rows, classes]: classifier logits as they are; causal-LM logits at the positions ``part`` selects."""
    if outputs.dim() == 2:
        return outputs
    shifted = outputs[:, :-1]
    width = shifted.shape[1]
    answer = batch["answer_mask"][:, 1 : width + 1].bool()
    if part == "targets":
        return shifted[answer]
    real = batch["attention_mask"][:, 1 : width + 1].bool()
    return shifted[real & ~answer]


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * mean_rows KL(softmax(teacher/T) || softmax(student/T))``; 0 for no rows."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
    return temperature**2 * kl.mean()


def logit_mse(current_logits: Tensor, stored_logits: Tensor) -> Tensor:
    """Mean over rows and classes of ``(current - stored)^2``; 0 for no rows."""
    if current_logits.shape[0] == 0:
        return current_logits.sum() * 0.0
    return F.mse_loss(current_logits.float(), stored_logits.detach().float())


def keep_columns(logits: Tensor, excluded: tuple[int, ...]) -> Tensor:
    """Logits without the ``excluded`` columns (classes a teacher never learned)."""
    if not excluded:
        return logits
    keep = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[list(excluded)] = False
    return logits[..., keep]
