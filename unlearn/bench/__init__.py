"""Benchmark: any registered method against a model retrained from scratch, on scikit-learn's digits.

``python -m unlearn.bench --method ssd-auto --scenario digits-class --seed 0 --json``

Scenarios (train split of :mod:`unlearn.digits`):

- ``digits-class``: every training record of one class (``forget_class``, default 3);
- ``digits-random``: a random 10% of the training records (drawn with the run's seed);
- ``digits-subject``: every training record of 20 subjects (drawn with the run's seed).

Trained models (original and retrained) are cached under the cache directory keyed by recipe, seed and
data digest, together with the seconds their training took, so ``retrain_seconds`` stays a measurement.

``training="gr"`` (``--train gr``) trains both the original and the retrained model with IAU's gradient
restriction (:data:`GR_RECIPE`: ``gradient_restriction=0.005``), cached apart from the plain ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from unlearn import registry
from unlearn.data import ExampleSet, classification_examples
from unlearn.digits import DigitsRecords, load_digits_records
from unlearn.errors import CacheMismatchError, InvalidParameterError
from unlearn.evaluation import ClassificationMetrics, avg_gap, evaluate_classifier
from unlearn.gradient_restriction import DEFAULT_ALPHA_GR
from unlearn.importance import ImportanceCache, TrainImportance
from unlearn.models import digits_cnn
from unlearn.tasks import ClassificationTask
from unlearn.training import TrainRecipe, train_from_scratch

SCENARIOS = ("digits-class", "digits-random", "digits-subject")
DIGITS_RECIPE = TrainRecipe(epochs=30, batch_size=32, lr=1e-3, optimizer="adam")
TRAININGS = ("plain", "gr")  # gr: the same recipe with IAU's gradient restriction (arXiv 2507.23257)
GR_RECIPE = replace(DIGITS_RECIPE, gradient_restriction=DEFAULT_ALPHA_GR)
RANDOM_FRACTION = 0.10
SUBJECT_COUNT = 20
TIMING_BATCH_SIZE = 64


def default_cache_dir() -> Path:
    return Path(os.environ.get("LETHE_CACHE_DIR", ".cache/lethe"))


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    forget_index: np.ndarray  # positions within the train split
    forget_classes: tuple[int, ...] | None


def make_scenario(records: DigitsRecords, name: str, seed: int, forget_class: int = 3) -> Scenario:
    train_index = records.indices("train")
    labels = records.labels[train_index]
    rng = np.random.default_rng(1000 + seed)
    if name == "digits-class":
        if not 0 <= forget_class < 10:
            raise InvalidParameterError("forget_class", f"must be a digit 0-9, got {forget_class}")
        return Scenario(name, seed, np.flatnonzero(labels == forget_class), (forget_class,))
    if name == "digits-random":
        count = round(RANDOM_FRACTION * len(train_index))
        return Scenario(name, seed, np.sort(rng.choice(len(train_index), count, replace=False)), None)
    if name == "digits-subject":
        subjects = records.subject_ids[train_index]
        chosen = rng.choice(np.unique(subjects), SUBJECT_COUNT, replace=False)
        return Scenario(name, seed, np.flatnonzero(np.isin(subjects, chosen)), None)
    raise InvalidParameterError("scenario", f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")


class ModelCache:
    """Trained models as safetensors + JSON, keyed by recipe, seed and the training data's digest."""

    def __init__(self, directory: Path):
        self.directory = directory / "models"

    def path(self, kind: str, recipe: TrainRecipe, data_digest: str) -> Path:
        fields = asdict(recipe)
        if not fields["gradient_restriction"]:  # keeps the keys of models cached before the field existed
            del fields["gradient_restriction"]
        key = hashlib.sha256(json.dumps([kind, fields, data_digest]).encode()).hexdigest()[:24]
        return self.directory / f"{kind}-{key}"

    def get_or_train(self, kind: str, task, examples: ExampleSet, recipe: TrainRecipe,
                     device: torch.device) -> tuple[torch.nn.Module, float]:
        base = self.path(kind, recipe, examples.digest())
        weights, meta = base.with_suffix(".safetensors"), base.with_suffix(".json")
        model = digits_cnn(recipe.seed).to(device)
        if weights.exists() and meta.exists():
            try:
                model.load_state_dict({k: v.to(device) for k, v in load_file(str(weights)).items()})
                return model.eval(), float(json.loads(meta.read_text())["train_seconds"])
            except (RuntimeError, KeyError, ValueError) as error:
                raise CacheMismatchError(f"cached model {weights} does not fit: {error}") from error
        started = time.perf_counter()
        model = train_from_scratch(task, digits_cnn, examples, recipe, device)
        seconds = time.perf_counter() - started
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(weights))
        meta.write_text(json.dumps({"train_seconds": seconds, "recipe": asdict(recipe), "device": str(device)}))
        return model, seconds


def fwd_bwd_seconds(task, model: torch.nn.Module, examples: ExampleSet, batch_size: int, repeats: int = 5) -> float:
    """Median wall time of one forward+backward pass over ``examples`` (the cost unit of a request)."""
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in examples.batches(batch_size, next(model.parameters()).device):
            model.zero_grad(set_to_none=True)
            task.batch_loss(model, batch).backward()
        timings.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return statistics.median(timings)


_RETRAIN_SECONDS: dict[str, float] = {}


def measured_retrain_seconds(task, retain: ExampleSet, recipe: TrainRecipe, device: torch.device) -> float:
    """Wall time of retraining on Dr, measured once per process and forget set.

    The cached model's recorded time may come from another load or machine; the speed-up divides by the
    unlearning time measured now, so the retrain is timed under the same conditions.
    """
    key = json.dumps([asdict(recipe), retain.digest(), str(device)])
    if key not in _RETRAIN_SECONDS:
        started = time.perf_counter()
        train_from_scratch(task, digits_cnn, retain, recipe, device)
        _RETRAIN_SECONDS[key] = time.perf_counter() - started
    return _RETRAIN_SECONDS[key]


def warm_up(device: torch.device) -> None:
    """Pay torch's lazy one-off costs (optimizer modules, autograd engine) before anything is timed."""
    parameter = torch.zeros(4, device=device, requires_grad=True)
    for optimizer in (torch.optim.Adam([parameter]), torch.optim.AdamW([parameter]), torch.optim.SGD([parameter], lr=0.1)):
        (parameter * 2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def run_benchmark(method: str, scenario_name: str, seed: int, forget_class: int = 3,
                  params: dict[str, Any] | None = None, device: torch.device | None = None,
                  cache_dir: Path | None = None, training: str = "plain") -> dict[str, Any]:
    if training not in TRAININGS:
        raise InvalidParameterError("train", f"must be one of {list(TRAININGS)}, got {training!r}")
    device = device or torch.device("cpu")
    cache_dir = cache_dir or default_cache_dir()
    torch.manual_seed(seed)
    records = load_digits_records()
    task = ClassificationTask(10)

    def examples(index: np.ndarray) -> ExampleSet:
        return classification_examples(torch.from_numpy(records.features[index]), torch.from_numpy(records.labels[index]))

    train_index = records.indices("train")
    scenario = make_scenario(records, scenario_name, seed, forget_class)
    forget_mask = np.zeros(len(train_index), dtype=bool)
    forget_mask[scenario.forget_index] = True
    train, forget, retain = examples(train_index), examples(train_index[forget_mask]), examples(train_index[~forget_mask])
    holdout, test = examples(records.indices("holdout")), examples(records.indices("test"))

    recipe = replace(GR_RECIPE if training == "gr" else DIGITS_RECIPE, seed=seed)
    models = ModelCache(cache_dir)
    original, _ = models.get_or_train("original", task, train, recipe, device)
    retrained, _ = models.get_or_train("retrained", task, retain, recipe, device)
    retrain_seconds = measured_retrain_seconds(task, retain, recipe, device)

    importance = TrainImportance(task, train, ImportanceCache(cache_dir / "importance"))
    config = registry.parse_config(method, params)
    batch_size = getattr(config, "batch_size", TIMING_BATCH_SIZE)
    for variant in ("fisher", "label_free"):  # the one-off, per-model-version cost, paid before timing
        importance.get(original, batch_size, variant)
    importance_seconds = importance.last_seconds
    request = registry.UnlearnRequest(task=task, forget=forget, retain=retain, tune=holdout,
                                      train_importance=importance, model_factory=digits_cnn, recipe=recipe,
                                      forget_classes=scenario.forget_classes, seed=seed)
    # Measured first, which also warms up the autograd engine so the method is timed as a warm server runs it.
    warm_up(device)
    unit = fwd_bwd_seconds(task, original, forget, batch_size)
    started = time.perf_counter()
    result = registry.run(method, original, request, params)
    unlearn_seconds = time.perf_counter() - started

    def measure(model) -> ClassificationMetrics:
        return evaluate_classifier(task, model, forget, retain, test, scenario.forget_classes)

    before, gold, after = measure(original), measure(retrained), measure(result.model)
    return {
        "scenario": scenario_name, "method": method, "seed": seed, "train": training,
        "forget_class": forget_class if scenario.forget_classes else None,
        "forget_size": len(forget), "retain_size": len(retain),
        "original": before.as_dict(), "retrained": gold.as_dict(), "unlearned": after.as_dict(),
        "avg_gap": avg_gap(after, gold),
        "unlearn_seconds": unlearn_seconds, "retrain_seconds": retrain_seconds,
        "speedup": retrain_seconds / unlearn_seconds,
        "cost_vs_fwd_bwd": unlearn_seconds / unit, "fwd_bwd_seconds": unit,
        "train_importance_seconds": importance_seconds,
        "target_reached": result.target_reached, "message": result.message,
        "details": {k: v for k, v in result.details.items() if k != "search"},
        "device": str(device),
    }
