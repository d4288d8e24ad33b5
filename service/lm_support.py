"""Causal language models in the service (issue 5, "Service"): dataset columns, registration checks,
encoding and the LM verification gate.

A causal-LM dataset has the base columns (``record_id``, ``subject_id``, ``split``) plus ``prompt`` and
``answer`` (non-empty strings); one record is one question about one data subject. The model is an MLflow
``transformers`` model logged with its tokenizer (:meth:`service.mlflow_registry.MlflowRegistry.load_lm`).

The gate mirrors the classifier's (:mod:`service.verification`), with teacher-forced answer exact match
(EM: every answer token is the model's argmax, :meth:`unlearn.lm.task.CausalLMTask.correct`) in place of
accuracy, so the policy's values keep their meaning:

1. utility: EM on the retain people AND on the holdout people falls by at most ``max_utility_drop``; the
   mean answer NLL per token on both is recorded as evidence;
2. forgetting: forget-set EM <= holdout EM + ``record_forget_margin`` (the erased people's answers are no
   better known than those of people the model never saw); answer NLL per token is recorded next to it;
3. membership inference (evidence, not gated): loss-threshold ROC AUC forget vs holdout, before and after;
4. ONNX: ``input_ids -> logits`` is exported and run with onnxruntime's CPUExecutionProvider; logits must
   match PyTorch within ``onnx_tolerance`` on a fixed batch (the first holdout records) and the retain EM
   computed from the ONNX logits must pass check 1 (what is served is what was checked).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from service.domain import FieldViolation, VerificationPolicy
from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.evaluation import loss_attack_auc
from unlearn.lm.task import CausalLMTask, model_context_length, model_vocab_size
from unlearn.tasks import accuracy

if TYPE_CHECKING:
    from service.datasets import LoadedDataset
    from service.verification import Verdict

LM_COLUMNS = ("prompt", "answer")
MAX_ROW_VIOLATIONS = 10
PARITY_BATCH = 64


def column_violations(frame: pd.DataFrame) -> list[FieldViolation]:
    """Empty or non-string prompts and answers (the other columns are checked by the catalog)."""
    violations = []
    for column in LM_COLUMNS:
        bad = [str(r) for r, v in zip(frame["record_id"], frame[column]) if not isinstance(v, str) or not v.strip()]
        if bad:
            violations.append(FieldViolation(f"dataset.{column}", f"{len(bad)} record(s) have an empty {column} "
                                                                  f"(e.g. {', '.join(bad[:3])})"))
    return violations


def subject_numbers(subject_keys: np.ndarray) -> list[int]:
    """Integer subject ids for :class:`CausalLMTask` (from the keyed hashes: clear ids are not needed)."""
    return np.unique(np.asarray(subject_keys).astype(str), return_inverse=True)[1].astype(int).tolist()


def registration_violations(model: nn.Module, tokenizer, frame: pd.DataFrame) -> list[FieldViolation]:
    """Does the tokenizer belong to the model, and does every record encode within the model's context?"""
    try:
        task = CausalLMTask(tokenizer)
    except InvalidDataError as error:
        return [FieldViolation(error.field, error.reason)]
    vocab = model_vocab_size(model)
    if task.vocab_size > vocab:
        return [FieldViolation("tokenizer", f"the tokenizer has {task.vocab_size} tokens, the model's embedding only "
                                            f"{vocab}: they do not belong together")]
    try:
        context = model_context_length(model)
    except InvalidDataError as error:
        return [FieldViolation(error.field, error.reason)]
    violations = []
    for record_id, prompt, answer in zip(frame["record_id"], frame["prompt"], frame["answer"]):
        try:
            task.encode([prompt], [answer], [0], context, field="dataset")
        except InvalidDataError as error:
            violations.append(FieldViolation(error.field, f"record {record_id}: {error.reason.partition(': ')[2] or error.reason}"))
            if len(violations) >= MAX_ROW_VIOLATIONS:
                break
    if violations:
        return violations
    examples = task.encode(list(frame["prompt"]), list(frame["answer"]), subject_numbers(frame["subject_id"]),
                           context, field="dataset")
    try:
        task.validate(model, examples, "dataset")
    except InvalidDataError as error:
        violations.append(FieldViolation(error.field, error.reason))
    return violations


def encode_dataset(task: CausalLMTask, data: LoadedDataset, model: nn.Module) -> ExampleSet:
    """Every record of a loaded LM dataset, encoded once (one padded width, so subsets stack)."""
    return task.encode(list(data.prompts), list(data.answers), subject_numbers(data.subject_hashes),
                       model_context_length(model), field="dataset")


def subset(examples: ExampleSet, mask: np.ndarray) -> ExampleSet:
    return examples.subset(torch.from_numpy(np.flatnonzero(mask)))


class LogitsOnly(nn.Module):
    """``input_ids -> logits``: what is exported to ONNX (right padding does not change earlier positions)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits


@torch.no_grad()
def answer_nll_per_token(task: CausalLMTask, model: nn.Module, examples: ExampleSet, batch_size: int = 128) -> float:
    device = next(model.parameters()).device
    model.eval()
    total, tokens = 0.0, 0.0
    for batch in examples.batches(batch_size, device):
        total += float(task.per_example_loss(model, batch).sum())
        tokens += float(task.target_lengths(batch).sum())
    return total / max(tokens, 1.0)


def _exact_match_from_logits(logits: np.ndarray, input_ids: np.ndarray, answer_mask: np.ndarray) -> np.ndarray:
    hits = logits[:, :-1].argmax(axis=-1) == input_ids[:, 1:]
    mask = answer_mask[:, 1:].astype(bool)
    return (hits | ~mask).all(axis=1)


def onnx_evidence(model: nn.Module, holdout: ExampleSet, retain: ExampleSet, path: Path) -> dict[str, Any]:
    import onnxruntime

    from service.verification import export_onnx

    device = next(model.parameters()).device
    wrapper = LogitsOnly(model.cpu()).eval()
    batch = holdout["input_ids"][:PARITY_BATCH].cpu()
    exporter = export_onnx(wrapper, batch, path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    with torch.no_grad():
        reference = wrapper(batch).numpy()
    exported = session.run(None, {input_name: batch.numpy()})[0]
    right = 0
    for start in range(0, len(retain), 256):
        ids = retain["input_ids"][start:start + 256].numpy()
        logits = session.run(None, {input_name: ids})[0]
        right += int(_exact_match_from_logits(logits, ids, retain["answer_mask"][start:start + 256].numpy()).sum())
    model.to(device)
    return {"exporter": exporter, "providers": session.get_providers(), "signature": "input_ids -> logits",
            "max_abs_diff": float(np.abs(reference - exported).max()), "parity_batch": [int(s) for s in batch.shape],
            "retain_exact_match": right / len(retain), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def verify_lm(task: CausalLMTask, before: nn.Module, after: nn.Module, forget: ExampleSet, retain: ExampleSet,
              holdout: ExampleSet, policy: VerificationPolicy, onnx_path: Path) -> Verdict:
    """The LM gate (module docstring); same evidence keys as the classifier's where they mean the same."""
    from service.verification import Verdict

    em = {(name, when): accuracy(task, model, examples)
          for name, examples in (("forget", forget), ("retain", retain), ("holdout", holdout))
          for when, model in (("before", before), ("after", after))}
    nll = {(name, when): answer_nll_per_token(task, model, examples)
           for name, examples in (("forget", forget), ("retain", retain), ("holdout", holdout))
           for when, model in (("before", before), ("after", after))}
    mia = {"loss_attack_auc_before": loss_attack_auc(task, before, forget, holdout),
           "loss_attack_auc_after": loss_attack_auc(task, after, forget, holdout),
           "protocol": "loss-threshold ROC AUC, forget (members) vs holdout people (never seen); score = -answer "
                       "NLL; 0.5 = indistinguishable"}
    onnx = onnx_evidence(after, holdout, retain, onnx_path)

    checks: list[dict[str, Any]] = []

    def check(name: str, value: float, limit: float, passed: bool, rule: str) -> None:
        checks.append({"name": name, "value": value, "limit": limit, "passed": bool(passed), "rule": rule})

    retain_floor = em["retain", "before"] - policy.max_utility_drop
    holdout_floor = em["holdout", "before"] - policy.max_utility_drop
    check("utility", em["retain", "after"], retain_floor, em["retain", "after"] >= retain_floor - 1e-12,
          "retain people: answer exact match after >= before - max_utility_drop")
    check("utility_holdout", em["holdout", "after"], holdout_floor, em["holdout", "after"] >= holdout_floor - 1e-12,
          "holdout people: answer exact match after >= before - max_utility_drop")
    limit = em["holdout", "after"] + policy.record_forget_margin
    check("forgetting", em["forget", "after"], limit, em["forget", "after"] <= limit + 1e-12,
          "forget people: answer exact match <= holdout (never-seen) exact match + record_forget_margin")
    check("onnx_parity", onnx["max_abs_diff"], policy.onnx_tolerance, onnx["max_abs_diff"] <= policy.onnx_tolerance,
          "max |torch - onnxruntime| logits on a fixed batch")
    check("onnx_utility", onnx["retain_exact_match"], retain_floor, onnx["retain_exact_match"] >= retain_floor - 1e-12,
          "retain exact match from the ONNX logits >= before - max_utility_drop")
    failures = tuple(c["name"] for c in checks if not c["passed"])
    evidence = {
        "passed": not failures, "checks": checks, "policy": asdict(policy), "scenario": "records",
        "task_type": "causal_lm", "metric": "teacher-forced answer exact match",
        "sizes": {"forget": len(forget), "retain": len(retain), "holdout": len(holdout)},
        "utility_acc_before": em["retain", "before"], "utility_acc_after": em["retain", "after"],
        "holdout_acc_before": em["holdout", "before"], "holdout_acc_after": em["holdout", "after"],
        "forget_acc_before": em["forget", "before"], "forget_acc_after": em["forget", "after"],
        "answer_nll_per_token": {f"{name}_{when}": value for (name, when), value in nll.items()},
        "mia": mia, "onnx": onnx,
    }
    return Verdict(not failures, evidence, failures)
