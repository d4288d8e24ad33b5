"""Small, fast problems shared by the continual tests: class-incremental Gaussian blobs on a tiny MLP, and a
tiny GPT that learns new fictitious people."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from continual.buffer import ReplayBuffer
from continual.registry import UpdateRequest
from unlearn.data import ExampleSet, classification_examples
from unlearn.models import tiny_mlp
from unlearn.tasks import ClassificationTask, collect
from unlearn.training import TrainRecipe, train_from_scratch

NUM_CLASSES = 10
FEATURES = 16
OLD_CLASSES = (0, 1, 2, 3, 4)
NEW_CLASS = 5
RECIPE = TrainRecipe(epochs=15, batch_size=32, lr=1e-2, optimizer="adam", seed=0)


def blobs(count: int, seed: int, classes=tuple(range(NUM_CLASSES))) -> ExampleSet:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(NUM_CLASSES, FEATURES, generator=torch.Generator().manual_seed(123)) * 1.5
    labels = torch.tensor(classes)[torch.arange(count) % len(classes)]
    inputs = centres[labels] + torch.randn(count, FEATURES, generator=generator)
    return classification_examples(inputs, labels)


def factory(seed: int):
    return tiny_mlp(seed, FEATURES, NUM_CLASSES)


def keys(prefix: str, count: int, subjects: int | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Record ids and subject hashes: ``subjects`` subjects own the rows in turn (one per row by default)."""
    subjects = subjects or count
    return (tuple(f"{prefix}-{i}" for i in range(count)), tuple(f"{prefix}-subject-{i % subjects}" for i in range(count)))


@dataclass
class ClassProblem:
    task: ClassificationTask
    model: torch.nn.Module
    retain: ExampleSet
    update: ExampleSet
    tune: ExampleSet
    old_test: ExampleSet
    new_test: ExampleSet

    def buffer(self, capacity: int = 100) -> ReplayBuffer:
        buffer = ReplayBuffer(capacity, seed=0)
        logits, _ = collect(self.task, self.model, self.retain)
        record_ids, subject_hashes = keys("retain", len(self.retain))
        buffer.offer(self.retain, logits, record_ids, subject_hashes)
        return buffer

    def request(self, **overrides) -> UpdateRequest:
        record_ids, subject_hashes = keys("update", len(self.update))
        fields = dict(task=self.task, update=self.update, update_record_ids=record_ids,
                      update_subject_hashes=subject_hashes, recipe=RECIPE, update_epochs=30, retain=self.retain,
                      tune=self.tune, buffer=self.buffer(), model_factory=factory, new_classes=(NEW_CLASS,), seed=0)
        fields.update(overrides)
        return UpdateRequest(**fields)


@functools.lru_cache(maxsize=1)
def _trained_old_classes() -> torch.nn.Module:
    task = ClassificationTask(NUM_CLASSES)
    return train_from_scratch(task, factory, blobs(300, 1, OLD_CLASSES), RECIPE, torch.device("cpu"))


def class_problem() -> ClassProblem:
    """A tiny MLP trained on classes 0-4 of 10 blobs; the update teaches class 5."""
    import copy

    task = ClassificationTask(NUM_CLASSES)
    return ClassProblem(task, copy.deepcopy(_trained_old_classes()), blobs(300, 1, OLD_CLASSES),
                        blobs(60, 3, (NEW_CLASS,)), blobs(100, 4, OLD_CLASSES), blobs(200, 5, OLD_CLASSES),
                        blobs(60, 6, (NEW_CLASS,)))


FAST_RECIPE = replace(RECIPE, epochs=3)


def lm_update_request(problem, people=(8, 9), **overrides) -> UpdateRequest:
    """An update teaching the tiny GPT of :func:`tests.unlearn.lm_helpers.lm_problem` two of its held-out people."""
    update = problem.holdout.subset([i for i, s in enumerate(problem.holdout["subject_id"].tolist()) if s in people])
    old = problem.forget.concat(problem.retain)
    record_ids = tuple(f"lm-update-{i}" for i in range(len(update)))
    subject_hashes = tuple(f"person-{int(s)}" for s in update["subject_id"])
    from tests.unlearn.lm_helpers import RECIPE as LM_RECIPE
    from tests.unlearn.lm_helpers import SPEC
    from unlearn.lm.model import GPTFactory

    factory = GPTFactory(len(problem.task.tokenizer), SPEC, problem.task.eos_token_id)
    fields = dict(task=problem.task, update=update, update_record_ids=record_ids, update_subject_hashes=subject_hashes,
                  recipe=replace(LM_RECIPE, lr=3e-3), update_epochs=2, retain=old, tune=old.subset(list(range(10))),
                  buffer=lm_buffer(problem, old), model_factory=factory, seed=0)
    fields.update(overrides)
    return UpdateRequest(**fields)


def lm_buffer(problem, old: ExampleSet, capacity: int = 16) -> ReplayBuffer:
    buffer = ReplayBuffer(capacity, seed=0)
    logits, _ = collect(problem.task, problem.model, old)
    buffer.offer(old, logits, [f"lm-old-{i}" for i in range(len(old))],
                 [f"person-{int(s)}" for s in old["subject_id"]])
    return buffer
