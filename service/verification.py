"""The verification gate (DESIGN.md, pipeline step "verify"): a result is judged before anything is
registered as serving.

The checks that need no service are :func:`unlearn.gate.judge`'s, the SAME code the benchmarks' ``--method
auto`` runs: utility on data no method saw, class forgetting (Acc_f, and Acc_o of earlier-erased classes, or
a reason why it cannot run), and for record and subject erasure the two-sided membership test of the
erased records against the ``audit`` split (:mod:`unlearn.membership`: under- and over-forgetting both fail).
This module adds what only a serving system needs:

- ``onnx_parity``: the model is exported with ``torch.onnx.export`` (the dynamo exporter, which uses
  onnxscript and works offline; the TorchScript exporter is the fall-back) and run with onnxruntime's
  CPUExecutionProvider: outputs must match PyTorch within ``onnx_tolerance`` on a fixed batch;
- ``onnx_utility``: utility measured on the ONNX model must pass the utility check too (what is served is
  what was checked).

The ONNX checks run only when the library checks passed (an export costs seconds; a rejected attempt
moves on to the next method of the chain without paying it).

Policy values are bounded at registration and per request alike (:data:`OVERRIDE_LIMITS`): a policy can
make the gate stricter or slightly looser, never switch it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.domain import FieldViolation, VerificationPolicy
from service.faults import fault_point
from unlearn.data import ExampleSet
from unlearn.errors import InvalidParameterError
from unlearn.gate import POLICY_LIMITS, GateCheck, GatePolicy, GateResult, KnowledgeProbe, judge
from unlearn.tasks import TaskAdapter

log = logging.getLogger(__name__)

ONNX_TOLERANCE_LIMITS = (1e-7, 1e-3)
OVERRIDE_LIMITS: dict[str, tuple[float, float]] = {**POLICY_LIMITS, "onnx_tolerance": ONNX_TOLERANCE_LIMITS,
                                                   "min_update_fit": (0.5, 1.0)}
"""Bounds of every policy value, at registration and in per-request overrides."""
SEALED_RETENTION_LIMITS = (0.0, 3650.0)
"""Days a sealed verification set may be kept (:mod:`service.sealed`): 0 keeps nothing; at most ten years."""
POLICY_ONLY_LIMITS: dict[str, tuple[float, float]] = {"sealed_retention_days": SEALED_RETENTION_LIMITS}
"""Bounds of policy values set at registration only (no per-request override)."""
PARITY_BATCH = 64  # fixed batch for the PyTorch/onnxruntime comparison: the first audit records


def limit_violations(values: dict[str, Any], prefix: str,
                     limits: dict[str, tuple[float, float]] = OVERRIDE_LIMITS) -> list[FieldViolation]:
    """Each known policy value must be a finite number within ``limits``; unknown keys are refused."""
    violations = []
    for key, value in values.items():
        if key not in limits:
            violations.append(FieldViolation(f"{prefix}.{key}", f"unknown; known: {sorted(limits)}"))
            continue
        low, high = limits[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            violations.append(FieldViolation(f"{prefix}.{key}", f"must be a finite number, got {value!r}"))
        elif not low <= value <= high:
            violations.append(FieldViolation(f"{prefix}.{key}", f"must be in [{low}, {high}], got {value}"))
    return violations


def override_violations(overrides: dict[str, Any]) -> list[FieldViolation]:
    return limit_violations(overrides, "policy_overrides")


def policy_violations(policy: VerificationPolicy) -> list[FieldViolation]:
    limits = {**OVERRIDE_LIMITS, **POLICY_ONLY_LIMITS}
    numeric = {f.name: getattr(policy, f.name) for f in fields(policy) if f.name in limits}
    return limit_violations(numeric, "policy", limits)


def effective_policy(policy: VerificationPolicy, overrides: dict[str, Any]) -> VerificationPolicy:
    return replace(policy, **{k: float(v) for k, v in overrides.items()})


def gate_policy(policy: VerificationPolicy) -> GatePolicy:
    try:
        return GatePolicy(**{name: getattr(policy, name) for name in POLICY_LIMITS})
    except InvalidParameterError as error:  # stored policies were validated; this is a corrupted row
        raise RuntimeError(f"stored policy value out of bounds: {error}") from error


class OnnxExportError(ValueError):
    """The model cannot be exported as Lethe serves and checks it: an ONNX graph whose batch size is free."""


def batch_problem(path: Path, example_inputs: torch.Tensor) -> str | None:
    """Why the exported graph does not take a batch of another size than the export's example, or None.

    The graph's input may be declared with a free batch dimension while a node inside keeps the example's size
    (the TorchScript exporter records ``len(inputs)`` as a constant), so this runs the graph on one row fewer
    (or twice the rows, for a one-row example) and checks the output's batch dimension."""
    import onnxruntime

    other = example_inputs[:-1] if len(example_inputs) > 1 else torch.cat([example_inputs, example_inputs])
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        output = session.run(None, {session.get_inputs()[0].name: other.cpu().numpy()})[0]
    except Exception as error:  # onnxruntime refuses the shape, or a node inside fails on it
        return f"onnxruntime refused a batch of {len(other)}: {type(error).__name__}: {str(error)[:200]}"
    if output.shape[0] != len(other):
        return f"a batch of {len(other)} rows gave {output.shape[0]} outputs"
    return None


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: Path) -> str:
    """Export to ``path`` with a dynamic batch dimension; returns the exporter that worked.

    The dynamo exporter first; the TorchScript exporter when it fails or its graph does not take other batch
    sizes (:func:`batch_problem`). A forward that turns the batch size into a Python number (``len(inputs)``,
    ``int(x.size(0))``) makes both exporters keep the example's size, and the served graph would refuse every
    other batch: that raises :class:`OnnxExportError` saying what to change, instead of a graph that fails later
    in onnxruntime.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example_inputs,), dynamo=True, verbose=False,
                                        input_names=["inputs"], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            program.save(str(path))
        problem = batch_problem(path, example_inputs)
        if problem is None:
            return "dynamo"
        log.warning("the dynamo ONNX export kept the example's batch size (%s); trying the TorchScript exporter",
                    problem)
    except Exception as error:  # an architecture torch.export cannot trace: the legacy exporter may
        log.warning("dynamo ONNX export failed (%s); trying the TorchScript exporter", error)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example_inputs,), str(path), dynamo=False, input_names=["inputs"],
                          output_names=["logits"], dynamic_axes={"inputs": {0: "batch"}})
    problem = batch_problem(path, example_inputs)
    if problem is not None:
        raise OnnxExportError(
            f"the model's ONNX export works only for batches of {len(example_inputs)} rows: use inputs.shape[0] or "
            "reshape(-1, ...) in forward(), not a Python number (len(inputs), int(x.size(0)), a fixed shape), "
            "which the exporters keep at the example's size, so the served model would refuse other batches "
            f"(docs/models.md, \"A classifier\"). {problem}")
    return "torchscript"


def classifier_onnx_evidence(model: nn.Module, parity: ExampleSet, utility: ExampleSet, path: Path) -> dict[str, Any]:
    """Export, run with onnxruntime on the CPU, compare outputs, and measure accuracy on ``utility``."""
    import onnxruntime

    device, was_training = next(model.parameters()).device, model.training
    batch = parity["inputs"][:PARITY_BATCH]
    exporter = export_onnx(model.cpu(), batch.cpu(), path)
    model.to(device)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    with torch.no_grad():
        reference = model.eval()(batch.to(device)).cpu().numpy()
    model.train(was_training)  # the model may be the base version's own object (UnlearnResult): leave it as found
    exported = session.run(None, {input_name: batch.cpu().numpy()})[0]
    right = 0
    for start in range(0, len(utility), 512):
        logits = session.run(None, {input_name: utility["inputs"][start:start + 512].numpy()})[0]
        right += int((logits.argmax(axis=1) == utility["labels"][start:start + 512].numpy()).sum())
    return {"exporter": exporter, "providers": session.get_providers(),
            "max_abs_diff": float(np.abs(reference - exported).max()), "parity_batch": int(len(batch)),
            "utility_acc": right / len(utility), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def verify(support, task: TaskAdapter, before: nn.Module, after: nn.Module, forget: ExampleSet,
           utility: ExampleSet, audit: ExampleSet, policy: VerificationPolicy, onnx_path: Path,
           forget_classes: tuple[int, ...] | None = None, utility_before: float | None = None,
           earlier_classes: tuple[int, ...] = (), earlier: ExampleSet | None = None,
           knowledge: KnowledgeProbe | None = None) -> GateResult:
    """The whole gate: :func:`unlearn.gate.judge`, then (if it passed) the ONNX checks of ``support``.

    ``support`` is the job's :class:`service.task_support.TaskSupport` (it knows how to export the model).
    The evidence carries every check's value, limit and rule, and the policy it was judged under.
    """
    result = judge(task, before, after, forget, utility, audit, gate_policy(policy), forget_classes,
                   utility_before, earlier_classes, earlier, knowledge)
    fault_point("stage:verify:inside")  # crash tests only: library checks done, ONNX export not yet
    evidence = {**result.evidence, "policy": asdict(policy), "task_type": support.task_type.value}
    if not result.passed:
        evidence["onnx"] = {"skipped": "the library checks failed; the model was not exported"}
        return GateResult(result.checks, evidence)
    onnx = support.onnx_evidence(after, audit, utility, onnx_path)
    floor = result.evidence["utility_acc_before"] - policy.max_utility_drop
    checks = result.checks + (
        GateCheck("onnx_parity", onnx["max_abs_diff"], policy.onnx_tolerance,
                  onnx["max_abs_diff"] <= policy.onnx_tolerance, "max |torch - onnxruntime| on a fixed batch"),
        GateCheck("onnx_utility", onnx["utility_acc"], floor, onnx["utility_acc"] >= floor - 1e-12,
                  "utility accuracy of the ONNX model >= before - max_utility_drop"),
    )
    return GateResult(checks, {**evidence, "onnx": onnx})
