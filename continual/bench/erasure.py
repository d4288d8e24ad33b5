"""Erasures inside the continual scenarios: ``unlearn``'s escalation chain, judged by ``unlearn``'s gate.

:func:`erase` runs :func:`unlearn.chain.run_chain` with the task's default chain
(:data:`unlearn.chain.DEFAULT_CHAINS`: ``ssd-auto`` -> ``gu+graddiff`` -> ``retrain`` for classifiers,
``simnpo+rt`` -> ``retrain`` for causal LMs) or the chain a scenario names (``fictitious-updates`` keeps
``gu+graddiff`` -> ``retrain``, the chain its results were measured with), every attempt from the same starting model, and keeps the
first result that :func:`unlearn.gate.judge` passes with the default :class:`unlearn.gate.GatePolicy`:

- utility on ``utility`` (classifiers: audit records of the classes that stay; causal LMs: retained people's
  questions) at most 2 points below the starting model's;
- class erasure: forget accuracy <= 0.05;
- record or subject erasure: the two-sided membership test of :mod:`unlearn.membership` (KS p-value and
  loss-attack AUC) of the erased records against never-trained ``audit`` records.

Methods stop or search on the ``tune`` records of the request, the gate judges on ``audit`` records (the
keyed-hash split of :mod:`unlearn.splits`), and the scenario reports on a third set neither of them saw.

One departure from the service, so that the scenario's data state can go on: an EXACT result (``retrain``)
that the gate rejects is still accepted, with the gate's failures recorded (``accepted_despite_gate``). In
the service the request would stay pending; here the lineage must not keep data the scenario declared
erased.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from unlearn.chain import default_chain, run_chain
from unlearn.data import ExampleSet
from unlearn.gate import GatePolicy, GateResult, judge
from unlearn.registry import UnlearnRequest, UnlearnResult
from unlearn.tasks import accuracy


def erase(model: nn.Module, request: UnlearnRequest, kind: str, utility: ExampleSet, audit: ExampleSet,
          params: Mapping[str, dict] | None = None,
          methods: Sequence[str] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The first result of the chain (``methods``, default: the default chain for ``kind``) that passes the
    gate, and every attempt's evidence."""
    params = params or {}
    names = list(methods) if methods is not None else [name for name, _ in default_chain(kind)]
    chain = [(name, params.get(name, {})) for name in names]
    task, policy = request.task, GatePolicy()
    utility_before = accuracy(task, model, utility)
    forced: dict[str, Any] = {}

    def verdict(result: UnlearnResult) -> GateResult:
        gate = judge(task, model, result.model, request.forget, utility, audit, policy, request.forget_classes,
                     utility_before)
        if result.exact and not gate.passed:  # see the module docstring
            forced.update(accepted_despite_gate=list(gate.failures))
            return GateResult((), {"gate": gate.as_dict(), "accepted_because": "exact"})
        return gate

    outcome = run_chain(model, request, chain, verdict)
    attempts = [attempt.summary() for attempt in outcome.attempts]
    if not outcome.passed:
        raise RuntimeError(f"no method of the chain passed the gate and none is exact: {attempts}")
    chosen = outcome.chosen
    return outcome.result.model, {"method": chosen.method, "exact": outcome.result.exact, "attempts": attempts,
                                  **forced}
