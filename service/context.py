"""What every part of the service shares: the context object and the registered model as the store has it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from service import store as db
from service.audit import AuditLog
from service.datasets import DatasetCatalog
from service.domain import MethodStep, TaskType, VerificationPolicy
from service.loaded_models import LoadedModels
from service.metrics import Metrics
from service.mlflow_registry import MlflowRegistry
from service.settings import Settings


@dataclass
class PipelineContext:
    """What a job needs from the engine; built once by :class:`service.engine.Engine`; intake, scheduler, executors, queries and the pipeline read it."""

    settings: Settings
    store: db.Store
    registry: MlflowRegistry
    catalog: DatasetCatalog
    audit: AuditLog
    metrics: Metrics
    device: torch.device
    models: LoadedModels = field(default_factory=lambda: LoadedModels(0))  # the engine sizes it from settings


@dataclass(frozen=True)
class ModelInfo:
    """A registered model as the store records it."""

    name: str
    task_type: TaskType
    num_classes: int
    policy: VerificationPolicy
    training: dict[str, Any]
    serving_version: str
    serving_alias: str | None = None  # the alias given at registration (None: settings.serving_alias)

    @classmethod
    def from_row(cls, row) -> ModelInfo:
        return cls(row.model_name, TaskType(row.task_type), int(row.num_classes or 0),
                   policy_from_json(row.policy), dict(row.training or {}), row.serving_version,
                   getattr(row, "serving_alias", None))


def policy_from_json(value: dict[str, Any]) -> VerificationPolicy:
    """A stored policy (``dataclasses.asdict`` of :class:`VerificationPolicy`) back into the dataclass."""
    value = dict(value)
    value["method_chain"] = tuple(MethodStep(step["name"], dict(step.get("params") or {}))
                                  for step in value.get("method_chain") or ())
    if value.get("update_strategy"):
        step = value["update_strategy"]
        value["update_strategy"] = MethodStep(step["name"], dict(step.get("params") or {}))
    return VerificationPolicy(**value)
