"""Causal language models in the service: dataset columns, registration checks, encoding, ONNX export.

A causal-LM dataset has the base columns (``record_id``, ``subject_id``, ``split``) plus ``prompt`` and
``answer`` (non-empty strings); one record is one question about one data subject. Optional ``paraphrase``
and ``perturbed`` columns let the gate run its ``knowledge`` check (:func:`paraphrase_probe`). The model is an MLflow
``transformers`` model logged with its tokenizer (:meth:`service.mlflow_registry.MlflowRegistry.load_lm`).

The gate is the classifier's (:mod:`service.verification`, :func:`unlearn.gate.judge`) with teacher-forced
answer exact match (EM: every answer token is the model's argmax) in place of accuracy and answer NLL per
token as the membership statistic: utility is EM on the retained people; forgetting is the two-sided
membership test of the erased people's questions against the never-seen ``audit`` people's; the ONNX
export is ``input_ids -> logits`` (:func:`onnx_evidence`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from service.domain import FieldViolation
from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.lm.metrics import ParaphraseProbe, QASplit
from unlearn.lm.task import CausalLMTask, model_context_length, model_vocab_size

if TYPE_CHECKING:
    from service.datasets import LoadedDataset

MAX_ROW_VIOLATIONS = 10
PARITY_BATCH = 64


def subject_numbers(subject_keys: np.ndarray) -> list[int]:
    """Integer subject ids for :class:`CausalLMTask` (from the keyed hashes: clear ids are not needed)."""
    return np.unique(np.asarray(subject_keys).astype(str), return_inverse=True)[1].astype(int).tolist()


def record_violations(task: CausalLMTask, context: int, frame: pd.DataFrame) -> list[FieldViolation]:
    """Does every record of ``frame`` (its answer, and its paraphrase and wrong answers where it has them: what
    the gate's knowledge check scores) encode within ``context`` tokens? One violation per record that does
    not, naming it (at most :data:`MAX_ROW_VIOLATIONS`)."""
    violations = []
    probes = (zip(frame["paraphrase"], frame["perturbed"]) if "paraphrase" in frame.columns
              else ((None, None) for _ in range(len(frame))))
    for record_id, prompt, answer, (paraphrase, perturbed) in zip(frame["record_id"], frame["prompt"],
                                                                    frame["answer"], probes):
        answers = [answer] + ([paraphrase, *perturbed] if isinstance(paraphrase, str) else [])
        try:
            task.encode([prompt] * len(answers), answers, [0] * len(answers), context, field="dataset")
        except InvalidDataError as error:
            violations.append(FieldViolation(error.field, f"record {record_id}: {error.reason.partition(': ')[2] or error.reason}"))
            if len(violations) >= MAX_ROW_VIOLATIONS:
                break
    return violations


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
    violations = record_violations(task, context, frame)
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


def paraphrase_probe(task: CausalLMTask, model: nn.Module, erased: LoadedDataset, erased_mask: np.ndarray,
                     audit: LoadedDataset, audit_mask: np.ndarray) -> ParaphraseProbe | None:
    """The gate's ``knowledge`` probe on the erased records (``erased_mask`` of ``erased``) and the ``audit``
    records (``audit_mask`` of ``audit``) that carry a paraphrase and perturbed answers
    (:data:`service.datasets.PROBE_COLUMNS`), or None when either side has none (the gate then reports the
    check as not checkable). An erasure passes the same dataset twice; an update's re-check of an earlier
    erasure passes its sealed records (which keep their paraphrase columns) and the current dataset."""
    erased_rows, audit_rows = _probe_rows(erased, erased_mask), _probe_rows(audit, audit_mask)
    if not len(erased_rows) or not len(audit_rows):
        return None
    context = model_context_length(model)

    def split(data: LoadedDataset, rows: np.ndarray) -> QASplit:
        prompts, subjects = [str(data.prompts[i]) for i in rows], subject_numbers(data.subject_hashes[rows])

        def encode(answers: list[str]) -> ExampleSet:
            return task.encode(prompts, answers, subjects, context, field="dataset")

        wrong = len(data.perturbed[rows[0]])
        return QASplit(encode([str(data.answers[i]) for i in rows]), encode([str(data.paraphrases[i]) for i in rows]),
                       tuple(encode([data.perturbed[i][j] for i in rows]) for j in range(wrong)),
                       tuple(str(data.answers[i]) for i in rows))

    return ParaphraseProbe(task, split(erased, erased_rows), split(audit, audit_rows))


def _probe_rows(data: LoadedDataset, mask: np.ndarray) -> np.ndarray:
    """The rows of ``mask`` that carry a paraphrase (none when the dataset has no probe columns)."""
    if data.paraphrases is None:
        return np.zeros(0, dtype=int)
    has = np.array([p is not None for p in data.paraphrases], dtype=bool)
    return np.flatnonzero(mask & has)


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


def onnx_evidence(model: nn.Module, parity: ExampleSet, utility: ExampleSet, path: Path) -> dict[str, Any]:
    """Export ``input_ids -> logits``, compare with PyTorch on the first ``parity`` records, and measure the
    teacher-forced answer exact match of the ONNX logits on ``utility`` (``utility_acc``)."""
    import onnxruntime

    from service.verification import export_onnx

    device = next(model.parameters()).device
    wrapper = LogitsOnly(model.cpu()).eval()
    batch = parity["input_ids"][:PARITY_BATCH].cpu()
    exporter = export_onnx(wrapper, batch, path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    with torch.no_grad():
        reference = wrapper(batch).numpy()
    exported = session.run(None, {input_name: batch.numpy()})[0]
    right = 0
    for start in range(0, len(utility), 256):
        ids = utility["input_ids"][start:start + 256].numpy()
        logits = session.run(None, {input_name: ids})[0]
        right += int(_exact_match_from_logits(logits, ids, utility["answer_mask"][start:start + 256].numpy()).sum())
    model.to(device)
    return {"exporter": exporter, "providers": session.get_providers(), "signature": "input_ids -> logits",
            "max_abs_diff": float(np.abs(reference - exported).max()), "parity_batch": [int(s) for s in batch.shape],
            "utility_acc": right / len(utility), "metric": "teacher-forced answer exact match",
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
