"""Erasures inside the continual scenarios: an ordered chain of ``unlearn`` methods (DESIGN.md).

:func:`erase_with_chain` runs ``ssd-auto``, then ``gu+graddiff``, then ``retrain`` (the default chain), each
attempt from the SAME starting model, and keeps the first result that passes the erasure's check; a rejected
attempt keeps its evidence. ``retrain`` is exact and ends the chain whatever its check says. The checks use
the tune data only (the scenario's evaluation data is never looked at):

- class erasure (:func:`class_check`): accuracy on the erased class's records <= 0.02 and tune accuracy on
  the classes that remain at most ``max_utility_drop`` below the starting model's;
- record or subject erasure (:func:`membership_check`): the loss-attack AUC of the erased records against
  never-trained tune records within 0.5 +- 0.1 (:func:`unlearn.evaluation.loss_attack_auc`), and the same
  utility condition.

A method that reports it missed its own target (``target_reached`` False) is rejected too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from unlearn import registry as unlearn_registry
from unlearn.data import ExampleSet
from unlearn.evaluation import loss_attack_auc
from unlearn.registry import UnlearnRequest
from unlearn.tasks import TaskAdapter, accuracy

CHAIN = ("ssd-auto", "gu+graddiff", "retrain")
CLASS_FORGET_TARGET = 0.02
MIA_TOLERANCE = 0.1
MAX_UTILITY_DROP = 0.03


@dataclass(frozen=True)
class ErasureCheck:
    passed: bool
    evidence: dict


def class_check(task: TaskAdapter, forget: ExampleSet, tune: ExampleSet, before: nn.Module,
                max_utility_drop: float = MAX_UTILITY_DROP) -> Callable[[nn.Module], ErasureCheck]:
    floor = accuracy(task, before, tune) - max_utility_drop

    def check(model: nn.Module) -> ErasureCheck:
        forget_acc, tune_acc = accuracy(task, model, forget), accuracy(task, model, tune)
        return ErasureCheck(forget_acc <= CLASS_FORGET_TARGET and tune_acc >= floor,
                            {"forget_acc": forget_acc, "tune_acc": tune_acc, "tune_floor": floor})

    return check


def membership_check(task: TaskAdapter, forget: ExampleSet, tune: ExampleSet, before: nn.Module,
                     utility: ExampleSet | None = None,
                     max_utility_drop: float = MAX_UTILITY_DROP) -> Callable[[nn.Module], ErasureCheck]:
    """``tune`` holds never-trained records (the membership reference); ``utility`` (default ``tune``) the
    skills to keep (for causal LMs, retained questions: unseen people are not a utility measure)."""
    utility = tune if utility is None else utility
    floor = accuracy(task, before, utility) - max_utility_drop

    def check(model: nn.Module) -> ErasureCheck:
        auc, utility_acc = loss_attack_auc(task, model, forget, tune), accuracy(task, model, utility)
        return ErasureCheck(abs(auc - 0.5) <= MIA_TOLERANCE and utility_acc >= floor,
                            {"loss_attack_auc_vs_tune": auc, "utility_acc": utility_acc, "utility_floor": floor})

    return check


def erase_with_chain(model: nn.Module, request: UnlearnRequest, check: Callable[[nn.Module], ErasureCheck],
                     chain: tuple[str, ...] = CHAIN, params: dict[str, dict] | None = None) -> tuple[nn.Module, dict]:
    """The first result of ``chain`` that passes ``check`` (an exact method always ends the chain), and the
    evidence of every attempt. Each attempt starts from ``model``."""
    params = params or {}
    attempts = []
    for method in chain:
        started = time.perf_counter()
        result = unlearn_registry.run(method, model, request, params.get(method))
        seconds = time.perf_counter() - started
        verdict = check(result.model)
        passed = verdict.passed and result.target_reached is not False
        attempts.append({"method": method, "passed": passed, "exact": result.exact, "seconds": seconds,
                         "target_reached": result.target_reached, **verdict.evidence})
        if passed or result.exact:
            return result.model, {"method": method, "exact": result.exact, "attempts": attempts}
    raise RuntimeError(f"no method of the chain {chain} passed and none is exact; attempts: {attempts}")
