"""When has an iterative unlearning run forgotten enough? A target estimated from data never trained on.

Gradient ascent and its relatives have no natural end: run too short and the forget set is still known,
too long and the model over-forgets (a privacy signal of its own: the forget records then look *less*
known than unseen data) and loses utility. The target is what a model retrained without Df would score on
Df:

- class erasure (``forget_classes`` set): a retrained model never predicts the class, so the target is
  ``forget_acc <= class_forget_target`` (close to 0);
- record erasure: to a retrained model the forget records are unseen data, so their accuracy is about its
  accuracy on any unseen sample, which is about the ORIGINAL model's accuracy on the held-out sample
  (``request.holdout``, never trained on). The target is ``forget_acc <= holdout_acc(original) + margin``.

The held-out accuracy is measured once, on the original weights. (Measuring it on the current weights
instead makes a moving target: once the run starts to damage the model, held-out accuracy falls with forget
accuracy and the run keeps chasing it; on the digits benchmark that cost up to 10 points of accuracy.)
A user can compute all of this with their own held-out data, so stopping on it peeks at no test split.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.tasks import TaskAdapter, accuracy


@dataclass(frozen=True)
class ForgetCheck:
    reached: bool
    forget_acc: float
    target: float


def forget_accuracy_target(task: TaskAdapter, original: nn.Module, holdout: ExampleSet | None,
                           forget_classes: tuple[int, ...] | None, class_forget_target: float,
                           record_forget_margin: float, method: str) -> float:
    """The forget accuracy to reach (see module docstring); call it on the original weights."""
    if forget_classes:
        return class_forget_target
    if holdout is None or len(holdout) == 0:
        raise InvalidDataError("holdout", f"method {method!r} stops at the forgetting target, which needs a "
                               "held-out sample for record erasure (or set stop_at_target=false)")
    return accuracy(task, original, holdout) + record_forget_margin


def check_forgetting(task: TaskAdapter, model: nn.Module, forget: ExampleSet, target: float) -> ForgetCheck:
    """Is the forget accuracy (eval mode, current weights) at or below ``target``?"""
    forget_acc = accuracy(task, model, forget)
    return ForgetCheck(forget_acc <= target, forget_acc, target)
