"""Every classification strategy on the project's real classifiers: the digits CNN (batch norm, and an update
whose last batch would hold one example) and the digits ViT. The library imports nothing of the service."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from continual import registry
from tests.continual.helpers import RECIPE, keys
from unlearn.data import classification_examples
from unlearn.models import digits_cnn
from unlearn.tasks import ClassificationTask

FORBIDDEN = ("service", "mlflow", "grpc", "kubernetes")


def _digits(count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return classification_examples(torch.rand(count, 64, generator=generator),
                                   torch.randint(0, 10, (count,), generator=generator))


def _request(model_factory, update, retain, **overrides):
    record_ids, subject_hashes = keys("u", len(update))
    from continual.buffer import ReplayBuffer

    buffer = ReplayBuffer(16)
    fields = dict(task=ClassificationTask(10), update=update, update_record_ids=record_ids,
                  update_subject_hashes=subject_hashes, recipe=replace(RECIPE, epochs=1, batch_size=16),
                  update_epochs=1, retain=retain, tune=retain, buffer=buffer, model_factory=model_factory, seed=0)
    fields.update(overrides)
    return registry.UpdateRequest(**fields)


@pytest.mark.parametrize("name", registry.names_for(registry.CLASSIFICATION))
def test_every_classification_strategy_runs_on_the_digits_cnn(name):
    model = digits_cnn(0).eval()
    update, retain = _digits(33, 1), _digits(40, 2)  # 33 = 2 * 16 + 1: a batch of one would meet batch norm
    result = registry.run(name, model, _request(digits_cnn, update, retain))
    assert result.model is not model and torch.isfinite(next(result.model.parameters())).all()


@pytest.mark.parametrize("name", ["finetune", "replay", "lwf", "ewc", "hft", "wise-ft+hft"])
def test_strategies_run_on_the_digits_vit(name):
    from unlearn.vit import DigitsViTConfig, digits_vit

    config = DigitsViTConfig(hidden_size=32, num_layers=2, num_heads=2, mlp_size=64)
    model = digits_vit(0, config).eval()
    result = registry.run(name, model, _request(lambda seed: digits_vit(seed, config), _digits(20, 1), _digits(20, 2)))
    assert result.model is not model
    if name == "hft":
        assert len(result.details["frozen_matrices"]) * 2 in (result.details["matrices"], result.details["matrices"] - 1)


def test_continual_never_imports_the_service_or_its_infrastructure():
    root = Path(__file__).resolve().parents[2] / "continual"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
