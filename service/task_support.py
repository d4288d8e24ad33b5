"""The task-type seam of the pipeline: what differs between a classifier and a causal language model.

The pipeline (:mod:`service.pipeline`) reads the same top to bottom for every task; it asks a
:class:`TaskSupport` for the few things that differ:

- loading the model version from MLflow (a causal LM comes with its tokenizer);
- the task adapter methods are run with (:mod:`unlearn.tasks`, :mod:`unlearn.lm.task`);
- turning dataset records into an example set (features and labels; or prompts and answers tokenised
  once, one padded width);
- the set utility is measured on: a classifier's ``audit`` records of the classes that stay; a causal LM's
  retained people (never-seen people's answers are facts no model can know, so they measure nothing);
- the ONNX export and its parity and utility measurement with onnxruntime;
- the gate's paraphrase probe (causal LMs whose data has paraphrased and perturbed answers).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn

from service import lm_support
from service.context import ModelInfo, PipelineContext
from service.datasets import LoadedDataset
from service.domain import TaskType
from unlearn.data import ExampleSet
from unlearn.gate import KnowledgeProbe
from unlearn.lm.task import CausalLMTask
from unlearn.tasks import ClassificationTask, TaskAdapter

LM_UTILITY_SAMPLE = 512  # retained questions the LM gate measures utility on (deterministic stride)

ExamplesOf = Callable[[np.ndarray], ExampleSet]


class TaskSupport(Protocol):
    task_type: TaskType
    tokenizer: Any

    def load(self, ctx: PipelineContext, model_name: str, version: str) -> nn.Module:
        """The model version on the job's device (and, for LMs, its tokenizer into ``self.tokenizer``)."""

    def task(self) -> TaskAdapter:
        """The task adapter of the loaded model."""

    def examples(self, data: LoadedDataset, model: nn.Module) -> ExamplesOf:
        """A function from a record mask of ``data`` to its example set."""

    def utility_mask(self, data: LoadedDataset, retain_mask: np.ndarray, audit_mask: np.ndarray,
                     excluded_classes: tuple[int, ...]) -> np.ndarray:
        """The records utility is measured on (module docstring)."""

    def onnx_evidence(self, model: nn.Module, parity: ExampleSet, utility: ExampleSet, path: Path) -> dict[str, Any]:
        """Export to ONNX, compare with PyTorch on ``parity``, measure ``utility_acc`` with onnxruntime."""

    def knowledge(self, model: nn.Module, erased: LoadedDataset, erased_mask: np.ndarray, audit: LoadedDataset,
                  audit_mask: np.ndarray) -> KnowledgeProbe | None:
        """The gate's paraphrase probe (:mod:`unlearn.gate`) of the erased records (``erased_mask`` of
        ``erased``: the job's dataset, or an earlier erasure's sealed records) against the audit records
        (``audit_mask`` of ``audit``), or None when it cannot run."""


class ClassifierSupport:
    task_type = TaskType.CLASSIFICATION

    def __init__(self, info: ModelInfo):
        self.info = info
        self.tokenizer = None

    def load(self, ctx: PipelineContext, model_name: str, version: str) -> nn.Module:
        return ctx.registry.load_model(model_name, version).to(ctx.device)

    def task(self) -> TaskAdapter:
        return ClassificationTask(self.info.num_classes)

    def examples(self, data: LoadedDataset, model: nn.Module) -> ExamplesOf:
        return data.examples

    def utility_mask(self, data: LoadedDataset, retain_mask: np.ndarray, audit_mask: np.ndarray,
                     excluded_classes: tuple[int, ...]) -> np.ndarray:
        return audit_mask & ~np.isin(data.labels, list(excluded_classes))

    def onnx_evidence(self, model: nn.Module, parity: ExampleSet, utility: ExampleSet, path: Path) -> dict[str, Any]:
        from service.verification import classifier_onnx_evidence

        return classifier_onnx_evidence(model, parity, utility, path)

    def knowledge(self, model: nn.Module, erased: LoadedDataset, erased_mask: np.ndarray, audit: LoadedDataset,
                  audit_mask: np.ndarray) -> KnowledgeProbe | None:
        return None  # truth ratios are a language-model notion: the gate has no such check for classifiers


class CausalLMSupport:
    task_type = TaskType.CAUSAL_LM

    def __init__(self, info: ModelInfo):
        self.info = info
        self.tokenizer = None

    def load(self, ctx: PipelineContext, model_name: str, version: str) -> nn.Module:
        model, self.tokenizer = ctx.registry.load_lm(model_name, version)
        return model.to(ctx.device)

    def task(self) -> TaskAdapter:
        return CausalLMTask(self.tokenizer)

    def examples(self, data: LoadedDataset, model: nn.Module) -> ExamplesOf:
        encoded = lm_support.encode_dataset(self.task(), data, model)  # every record once, one padded width
        return lambda mask: lm_support.subset(encoded, mask)

    def utility_mask(self, data: LoadedDataset, retain_mask: np.ndarray, audit_mask: np.ndarray,
                     excluded_classes: tuple[int, ...]) -> np.ndarray:
        retain = np.flatnonzero(retain_mask)
        if len(retain) > LM_UTILITY_SAMPLE:
            retain = retain[np.linspace(0, len(retain) - 1, LM_UTILITY_SAMPLE).astype(int)]
        mask = np.zeros_like(retain_mask)
        mask[retain] = True
        return mask

    def onnx_evidence(self, model: nn.Module, parity: ExampleSet, utility: ExampleSet, path: Path) -> dict[str, Any]:
        return lm_support.onnx_evidence(model, parity, utility, path)

    def knowledge(self, model: nn.Module, erased: LoadedDataset, erased_mask: np.ndarray, audit: LoadedDataset,
                  audit_mask: np.ndarray) -> KnowledgeProbe | None:
        return lm_support.paraphrase_probe(self.task(), model, erased, erased_mask, audit, audit_mask)


def task_support(info: ModelInfo) -> TaskSupport:
    if info.task_type is TaskType.CAUSAL_LM:
        return CausalLMSupport(info)
    return ClassifierSupport(info)



