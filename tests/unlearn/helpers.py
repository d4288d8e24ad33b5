"""Small, fast problems shared by the unlearning tests: Gaussian blobs and a tiny MLP trained on them."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from unlearn.data import ExampleSet, classification_examples
from unlearn.importance import TrainImportance
from unlearn.models import TinyMLP, tiny_mlp
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


def _wide_factory(seed: int) -> TinyMLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyMLP(FEATURES, NUM_CLASSES, hidden=64)


MEMORISING_RECIPE = TrainRecipe(epochs=80, batch_size=32, lr=1e-2, seed=0)


@dataclass
class Memorised:
    """A model that memorised mislabelled records, a random fifth of them to erase, and its exact retrain."""

    task: ClassificationTask
    model: torch.nn.Module
    retrained: torch.nn.Module
    train: ExampleSet
    forget: ExampleSet
    retain: ExampleSet
    tune: ExampleSet
    audit: ExampleSet

    def request(self, **overrides) -> UnlearnRequest:
        fields = dict(task=self.task, forget=self.forget, retain=self.retain, tune=self.tune,
                      train_importance=TrainImportance(self.task, self.train), model_factory=_wide_factory,
                      recipe=MEMORISING_RECIPE, seed=0)
        fields.update(overrides)
        return UnlearnRequest(**fields)


@functools.lru_cache(maxsize=1)
def mislabelled_problem() -> Memorised:
    """20% of ALL labels flipped (training and never-trained alike); an MLP trained to 100% training accuracy.

    It can only fit the flipped training labels by memorising those records, so a random fifth of its
    training records is recognisable to a loss attack. A model retrained without them sees them as it sees
    any never-trained record (20% of which are flipped as well): that is the never-seen level. The
    never-trained records are dealt alternately into ``audit`` (the gate's) and ``tune`` (the methods').
    Callers must not train the returned models in place (copy them).
    """
    task = ClassificationTask(NUM_CLASSES)
    data = blobs(600, seed=21)
    labels = data["labels"].clone()
    flip = torch.zeros(600, dtype=torch.bool)
    flip[torch.randperm(600, generator=torch.Generator().manual_seed(5))[:120]] = True
    labels[flip] = (labels[flip] + 3) % NUM_CLASSES
    data = type(data)({"inputs": data["inputs"] * 1.5, "labels": labels})
    train, never = data.subset(range(300)), data.subset(range(300, 600))
    model = train_from_scratch(task, _wide_factory, train, MEMORISING_RECIPE, torch.device("cpu"))
    order = torch.randperm(300, generator=torch.Generator().manual_seed(6))
    forget, retain = train.subset(order[:60].sort().values), train.subset(order[60:].sort().values)
    retrained = train_from_scratch(task, _wide_factory, retain, MEMORISING_RECIPE, torch.device("cpu"))
    return Memorised(task, model, retrained, train, forget, retain, never.subset(range(1, 300, 2)),
                     never.subset(range(0, 300, 2)))
