"""Small, fast problems shared by the unlearning tests: Gaussian blobs and a tiny MLP trained on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unlearn.data import ExampleSet, classification_examples
from unlearn.importance import TrainImportance
from unlearn.models import tiny_mlp
from unlearn.registry import UnlearnRequest
from unlearn.tasks import ClassificationTask
from unlearn.training import TrainRecipe, train_from_scratch

NUM_CLASSES = 10
FEATURES = 16
RECIPE = TrainRecipe(epochs=15, batch_size=32, lr=1e-2, optimizer="adam", seed=0)


def blobs(count: int, seed: int) -> ExampleSet:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(NUM_CLASSES, FEATURES, generator=torch.Generator().manual_seed(123)) * 1.0
    labels = torch.arange(count) % NUM_CLASSES
    inputs = centres[labels] + torch.randn(count, FEATURES, generator=generator)
    return classification_examples(inputs, labels)


def factory(seed: int):
    return tiny_mlp(seed, FEATURES, NUM_CLASSES)


@dataclass
class Problem:
    task: ClassificationTask
    model: torch.nn.Module
    train: ExampleSet
    forget: ExampleSet
    retain: ExampleSet
    holdout: ExampleSet
    forget_classes: tuple[int, ...] | None

    def request(self, **overrides) -> UnlearnRequest:
        fields = dict(task=self.task, forget=self.forget, retain=self.retain, tune=self.holdout,
                      train_importance=TrainImportance(self.task, self.train), model_factory=factory,
                      recipe=RECIPE, forget_classes=self.forget_classes, seed=0)
        fields.update(overrides)
        return UnlearnRequest(**fields)


_TRAINED: dict[int, torch.nn.Module] = {}


def class_problem(forget_class: int = 0) -> Problem:
    """A tiny MLP trained on 4 blobs (~100% accuracy); the forget set is one whole class."""
    task = ClassificationTask(NUM_CLASSES)
    train = blobs(400, seed=1)
    if 0 not in _TRAINED:
        _TRAINED[0] = train_from_scratch(task, factory, train, RECIPE, torch.device("cpu"))
    mask = train["labels"] == forget_class
    return Problem(task, _TRAINED[0], train, train.subset(torch.nonzero(mask).flatten()),
                   train.subset(torch.nonzero(~mask).flatten()), blobs(120, seed=2), (forget_class,))
