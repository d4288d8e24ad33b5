"""The verification gate (DESIGN.md, pipeline step "verify"): a job's result is judged before anything is
registered as serving.

Checks, with the model's :class:`~service.domain.VerificationPolicy` (request overrides within
:data:`OVERRIDE_LIMITS`):

1. utility: holdout accuracy (class erasure: holdout records of the classes that stay) falls by at most
   ``max_utility_drop``;
2. forgetting: record erasure passes when forget-set accuracy <= holdout accuracy + ``record_forget_margin``
   (the erased records look no better known than data never seen, which is what a retrained model shows);
   class erasure passes when forget accuracy <= ``class_forget_max_accuracy`` (near chance or below);
   consecutive class erasures on one lineage also report Acc_o, the accuracy on whatever records of the
   classes erased by earlier jobs remain (gated like Acc_f when any remain; after the purge none do, and
   the evidence says so instead of giving a number), and utility excludes every erased class;
3. membership inference, recorded as evidence (not gated: on a well-generalising model both attacks sit
   near chance before unlearning already): the SSD paper's entropy attack fit on retain-train vs holdout
   (:func:`unlearn.evaluation.entropy_mia`) and the loss-threshold attack AUC forget vs holdout;
4. ONNX: the model is exported with ``torch.onnx.export`` (the dynamo exporter, which uses onnxscript and
   works offline; the TorchScript exporter is the fall-back) and run with onnxruntime's
   CPUExecutionProvider: outputs must match PyTorch within ``onnx_tolerance`` on a fixed batch, and the
   holdout utility measured on the ONNX model must pass check 1 too (what is served is what was checked).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.domain import FieldViolation, VerificationPolicy
from unlearn.data import ExampleSet
from unlearn.evaluation import entropy_mia, loss_attack_auc
from unlearn.tasks import TaskAdapter, accuracy

log = logging.getLogger(__name__)

# Per-request overrides may move a policy value only within these bounds: a client can ask for a stricter
# gate, or a slightly looser one, but cannot switch the gate off.
OVERRIDE_LIMITS: dict[str, tuple[float, float]] = {
    "max_utility_drop": (0.0, 0.10),
    "record_forget_margin": (0.0, 0.10),
    "class_forget_max_accuracy": (0.0, 0.20),
    "onnx_tolerance": (1e-7, 1e-3),
}
PARITY_BATCH = 64  # fixed batch for the PyTorch/onnxruntime comparison: the first holdout records
MIA_RETAIN_SAMPLE = 5000  # the entropy attack's member sample is capped (deterministic stride) on big data


def override_violations(overrides: dict[str, Any]) -> list[FieldViolation]:
    violations = []
    for key, value in overrides.items():
        if key not in OVERRIDE_LIMITS:
            violations.append(FieldViolation(f"policy_overrides.{key}", f"unknown; known: {sorted(OVERRIDE_LIMITS)}"))
            continue
        low, high = OVERRIDE_LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            violations.append(FieldViolation(f"policy_overrides.{key}", f"must be a finite number, got {value!r}"))
        elif not low <= value <= high:
            violations.append(FieldViolation(f"policy_overrides.{key}", f"must be in [{low}, {high}], got {value}"))
    return violations


def effective_policy(policy: VerificationPolicy, overrides: dict[str, Any]) -> VerificationPolicy:
    return replace(policy, **{k: float(v) for k, v in overrides.items()})


@dataclass(frozen=True)
class Verdict:
    passed: bool
    evidence: dict[str, Any]
    failures: tuple[str, ...]


def _without_classes(examples: ExampleSet, classes: tuple[int, ...] | None) -> ExampleSet:
    if not classes:
        return examples
    keep = ~torch.isin(examples["labels"], torch.tensor(classes))
    return examples.subset(torch.nonzero(keep).flatten())


def _cap(examples: ExampleSet, count: int) -> ExampleSet:
    if len(examples) <= count:
        return examples
    return examples.subset(torch.linspace(0, len(examples) - 1, count).long())


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: Path) -> str:
    """Export to ``path`` with a dynamic batch dimension; returns the exporter that worked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example_inputs,), dynamo=True, verbose=False,
                                        input_names=["inputs"], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            program.save(str(path))
        return "dynamo"
    except Exception as error:  # an architecture torch.export cannot trace: the legacy exporter may
        log.warning("dynamo ONNX export failed (%s); trying the TorchScript exporter", error)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example_inputs,), str(path), dynamo=False, input_names=["inputs"],
                              output_names=["logits"], dynamic_axes={"inputs": {0: "batch"}})
        return "torchscript"


def onnx_evidence(model: nn.Module, holdout: ExampleSet, utility_set: ExampleSet, path: Path) -> dict[str, Any]:
    """Export, run with onnxruntime on the CPU, compare outputs, and measure utility on the ONNX model."""
    import onnxruntime

    device = next(model.parameters()).device
    batch = holdout["inputs"][:PARITY_BATCH]
    exporter = export_onnx(model.cpu(), batch.cpu(), path)
    model.to(device)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    with torch.no_grad():
        reference = model.eval()(batch.to(device)).cpu().numpy()
    exported = session.run(None, {input_name: batch.cpu().numpy()})[0]
    right = 0
    for start in range(0, len(utility_set), 512):
        logits = session.run(None, {input_name: utility_set["inputs"][start:start + 512].numpy()})[0]
        right += int((logits.argmax(axis=1) == utility_set["labels"][start:start + 512].numpy()).sum())
    return {"exporter": exporter, "providers": session.get_providers(),
            "max_abs_diff": float(np.abs(reference - exported).max()), "parity_batch": int(len(batch)),
            "utility_acc": right / len(utility_set),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def verify(task: TaskAdapter, before: nn.Module, after: nn.Module, forget: ExampleSet, retain: ExampleSet,
           holdout: ExampleSet, forget_classes: tuple[int, ...] | None, policy: VerificationPolicy,
           onnx_path: Path, baseline_holdout_acc: float | None = None, earlier_classes: tuple[int, ...] = (),
           earlier: ExampleSet | None = None) -> Verdict:
    """Judge ``after`` (the unlearned model) against ``before``; returns the verdict and its evidence.

    ``forget_classes`` are this job's classes (class erasure) and ``forget`` their training records (Acc_f).
    ``earlier_classes`` were erased on this model lineage by earlier jobs; ``earlier`` holds whatever records
    of them the dataset still has (Acc_o). Class erasure purges every record of a class, so normally none
    remain: Acc_o is then evaluated on nothing, reported as ``None`` with a note, and not gated (a number
    made up from no data would be a false claim). Utility is measured on the classes that remain.
    """
    excluded = tuple(sorted(set(forget_classes or ()) | set(earlier_classes)))
    utility_set = _without_classes(holdout, excluded or None)
    utility_before = (baseline_holdout_acc if baseline_holdout_acc is not None and not excluded
                      else accuracy(task, before, utility_set))
    utility_after = accuracy(task, after, utility_set)
    holdout_after = accuracy(task, after, holdout)
    forget_before, forget_after = accuracy(task, before, forget), accuracy(task, after, forget)
    members = _cap(retain, MIA_RETAIN_SAMPLE)
    mia = {
        "entropy_mia_forget_member_rate_before": entropy_mia(task, before, members, holdout, forget),
        "entropy_mia_forget_member_rate_after": entropy_mia(task, after, members, holdout, forget),
        "loss_attack_auc_before": loss_attack_auc(task, before, forget, holdout),
        "loss_attack_auc_after": loss_attack_auc(task, after, forget, holdout),
        "protocol": "entropy attack fit on retain-train (members) vs holdout (non-members), applied to the "
                    "forget set; loss-threshold ROC AUC forget vs holdout (0.5 = indistinguishable)",
    }
    onnx = onnx_evidence(after, holdout, utility_set, onnx_path)

    checks: list[dict[str, Any]] = []

    def check(name: str, value: float, limit: float, passed: bool, rule: str) -> None:
        checks.append({"name": name, "value": value, "limit": limit, "passed": bool(passed), "rule": rule})

    utility_floor = utility_before - policy.max_utility_drop
    check("utility", utility_after, utility_floor, utility_after >= utility_floor - 1e-12,
          "holdout accuracy after >= before - max_utility_drop"
          + (" (on the remaining classes only)" if excluded else ""))
    if forget_classes:
        check("forgetting", forget_after, policy.class_forget_max_accuracy,
              forget_after <= policy.class_forget_max_accuracy + 1e-12,
              "class erasure: forget accuracy <= class_forget_max_accuracy")
    continual = None
    if excluded:
        continual = _continual_evidence(task, before, after, forget_classes, forget_after, earlier_classes, earlier)
        if continual["acc_o"] is not None:
            check("forgetting_earlier", continual["acc_o"], policy.class_forget_max_accuracy,
                  continual["acc_o"] <= policy.class_forget_max_accuracy + 1e-12,
                  "earlier-erased classes: accuracy on their remaining records <= class_forget_max_accuracy")
    else:
        limit = holdout_after + policy.record_forget_margin
        check("forgetting", forget_after, limit, forget_after <= limit + 1e-12,
              "record erasure: forget accuracy <= holdout accuracy + record_forget_margin")
    check("onnx_parity", onnx["max_abs_diff"], policy.onnx_tolerance,
          onnx["max_abs_diff"] <= policy.onnx_tolerance, "max |torch - onnxruntime| on a fixed batch")
    check("onnx_utility", onnx["utility_acc"], utility_floor, onnx["utility_acc"] >= utility_floor - 1e-12,
          "holdout accuracy of the ONNX model >= before - max_utility_drop")
    failures = tuple(c["name"] for c in checks if not c["passed"])
    evidence = {
        "passed": not failures, "checks": checks, "policy": asdict(policy),
        "scenario": "class" if forget_classes else "records",
        "sizes": {"forget": len(forget), "retain": len(retain), "holdout": len(holdout),
                  "utility_set": len(utility_set)},
        "utility_acc_before": utility_before, "utility_acc_after": utility_after,
        "holdout_acc_after": holdout_after, "forget_acc_before": forget_before, "forget_acc_after": forget_after,
        "mia": mia, "onnx": onnx,
    }
    if continual is not None:
        evidence["continual"] = continual
    return Verdict(not failures, evidence, failures)


def _continual_evidence(task: TaskAdapter, before: nn.Module, after: nn.Module,
                        forget_classes: tuple[int, ...] | None, forget_after: float,
                        earlier_classes: tuple[int, ...], earlier: ExampleSet | None) -> dict[str, Any]:
    """Acc_f (this task's classes) and Acc_o (classes of earlier tasks) of the continual class-erasure view."""
    count = len(earlier) if earlier is not None else 0
    if not earlier_classes:
        note = "no class was erased on this lineage before this job: Acc_o is not defined"
    elif count:
        note = f"Acc_o measured on the {count} remaining record(s) of the earlier-erased classes"
    else:
        note = ("no record of the earlier-erased classes remains (their records were purged by the earlier "
                "erasures), so Acc_o was evaluated on nothing and has no value; their forgetting is attested "
                "by the earlier versions' certificates")
    return {
        "task_classes": sorted(forget_classes or ()), "earlier_classes": sorted(earlier_classes),
        "erased_classes": sorted(set(forget_classes or ()) | set(earlier_classes)),
        "acc_f": forget_after if forget_classes else None,
        "acc_o": accuracy(task, after, earlier) if count else None,
        "acc_o_before": accuracy(task, before, earlier) if count else None,
        "acc_o_records": count, "acc_o_note": note,
    }
