"""Erasures inside the continual scenarios: ``unlearn``'s escalation chain, judged by ``unlearn``'s gate.

:func:`erase` runs :func:`unlearn.chain.run_chain` with the task's default chain
(:data:`unlearn.chain.DEFAULT_CHAINS`: ``ssd-auto`` -> ``shrink-perturb`` -> ``gu+graddiff`` -> ``retrain`` for
classifiers, ``unseen-kd`` -> ``simnpo+rt`` (twice) -> ``unseen-kd`` screened -> ``retrain`` for causal LMs) or
the chain a scenario names, every attempt from the same starting model, and keeps the first result that
:func:`unlearn.gate.judge` passes with the default :class:`unlearn.gate.GatePolicy`:

- utility on ``utility`` (classifiers: audit records of the classes that stay; causal LMs: retained people's
  questions) at most 2 points below the starting model's;
- class erasure: forget accuracy <= 0.05;
- record or subject erasure: the two-sided membership test of :mod:`unlearn.membership` (KS p-value and
  loss-attack AUC) of the erased records against never-trained ``audit`` records;
- causal-LM record or subject erasure with a paraphrase probe (``knowledge``, as the service passes one for
  data with paraphrases): the gate's ``knowledge`` check, here and in every re-check and re-erasure.

Methods stop or search on the ``tune`` records of the request, the gate judges on ``audit`` records (the
keyed-hash split of :mod:`unlearn.splits`), and the scenario reports on a third set neither of them saw.

One departure from the service, so that the scenario's data state can go on: an EXACT result (``retrain``)
that the gate rejects is still accepted, with the gate's failures recorded (``accepted_despite_gate``). In
the service the request would stay pending; here the lineage must not keep data the scenario declared
erased.

After every later update the scenarios re-check each erasure as the service's update gate does
(:func:`recheck`) and erase a regressed one again with the chain's approximate methods (:func:`erase_again`;
wired by :func:`continual.bench.harness.keep_erased`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from continual.examples import join
from unlearn import registry
from unlearn.chain import ChainStep, default_chain, run_chain
from unlearn.data import ExampleSet
from unlearn.gate import GatePolicy, GateResult, KnowledgeProbe, judge, still_erased
from unlearn.importance import TrainImportance
from unlearn.registry import UnlearnRequest, UnlearnResult
from unlearn.tasks import TaskAdapter, accuracy


def erase(model: nn.Module, request: UnlearnRequest, kind: str, utility: ExampleSet, audit: ExampleSet,
          params: Mapping[str, dict] | None = None, methods: Sequence[str] | None = None,
          policy: GatePolicy | None = None, knowledge: KnowledgeProbe | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The first result of the chain (``methods``, default: the default chain for ``kind``) that passes the
    gate (``policy``, default :class:`unlearn.gate.GatePolicy`), and every attempt's evidence."""
    result, evidence = _first_passing(model, request, _steps(kind, methods, params), utility, audit,
                                      accept_exact=True, policy=policy or GatePolicy(), knowledge=knowledge)
    if result is None:
        raise RuntimeError(f"no method of the chain passed the gate and none is exact: {evidence['attempts']}")
    return result, evidence


def erase_again(model: nn.Module, request: UnlearnRequest, retain: ExampleSet, kind: str, utility: ExampleSet,
                audit: ExampleSet, params: Mapping[str, dict] | None = None, methods: Sequence[str] | None = None,
                policy: GatePolicy | None = None,
                knowledge: KnowledgeProbe | None = None) -> tuple[nn.Module | None, dict[str, Any]]:
    """A regressed erasure erased again on an updated model, as the service's update job does it
    (``service.updates._reerase``): ``request``'s forget set against ``retain`` (what the updated model keeps:
    old data and new; the importance I_D over both), the chain's approximate methods only (an exact retrain
    would also drop what the update just learned), judged by the gate against the updated model. Returns the
    first passing model, or None with every attempt's evidence."""
    request = replace(request, retain=retain,
                      train_importance=TrainImportance(request.task, join(request.forget, retain)))
    approximate = [step for step in _steps(kind, methods, params) if not registry.get(step[0]).exact]
    return _first_passing(model, request, approximate, utility, audit, accept_exact=False,
                          policy=policy or GatePolicy(), knowledge=knowledge)


def recheck(task: TaskAdapter, model: nn.Module, forget: ExampleSet, audit: ExampleSet,
            classes: Sequence[int] = (), policy: GatePolicy | None = None,
            knowledge: KnowledgeProbe | None = None) -> dict[str, Any]:
    """The service's erased-stays-erased check (:func:`unlearn.gate.still_erased`, as
    ``service.sealed.erasure_rechecks`` runs it) with ``policy`` (default :class:`unlearn.gate.GatePolicy`): a
    class erasure by the class's accuracy on its erased records, a record or subject erasure by the two-sided
    membership test of the erased records against ``audit`` (and, on a causal LM, the ``knowledge`` check with
    the probe ``knowledge``)."""
    check = still_erased(task, model, forget, audit, policy or GatePolicy(), tuple(classes) or None, knowledge)
    if check.membership is None:
        return {"passed": check.passed, "accuracy": check.value, "limit": check.limit}
    found = {"passed": check.passed, **check.membership.as_dict(), "auc_slack": check.auc_slack}
    if check.knowledge is not None:
        found["knowledge"] = check.knowledge_summary()
    return found


def _steps(kind: str, methods: Sequence[str] | None, params: Mapping[str, dict] | None) -> list[ChainStep]:
    """The chain as ``(name, params)`` steps: ``methods`` with ``params[name]``, or the default chain for
    ``kind`` (each step's own parameters, updated with ``params[name]``)."""
    params = params or {}
    if methods is not None:
        return [(name, dict(params.get(name, {}))) for name in methods]
    return [(name, {**step_params, **params.get(name, {})}) for name, step_params in default_chain(kind)]


def _first_passing(model: nn.Module, request: UnlearnRequest, chain: Sequence[ChainStep], utility: ExampleSet,
                   audit: ExampleSet, accept_exact: bool, policy: GatePolicy,
                   knowledge: KnowledgeProbe | None = None) -> tuple[nn.Module | None, dict[str, Any]]:
    task = request.task
    utility_before = accuracy(task, model, utility)
    forced: dict[str, Any] = {}

    def verdict(result: UnlearnResult) -> GateResult:
        gate = judge(task, model, result.model, request.forget, utility, audit, policy, request.forget_classes,
                     utility_before, knowledge=knowledge)
        if accept_exact and result.exact and not gate.passed:  # see the module docstring
            forced.update(accepted_despite_gate=list(gate.failures))
            return GateResult((), {"gate": gate.as_dict(), "accepted_because": "exact"})
        return gate

    outcome = run_chain(model, request, chain, verdict)
    attempts = [attempt.summary() for attempt in outcome.attempts]
    if not outcome.passed:
        return None, {"method": None, "attempts": attempts}
    return outcome.result.model, {"method": outcome.chosen.method, "exact": outcome.result.exact,
                                  "attempts": attempts, **forced}
