"""Names the service imported from ``unlearn.bench`` before the harness had families (kept until it moves).

``service/demo_data.py`` trains the digits demo model through ``ModelCache(...).get_or_train(kind, task,
examples, recipe, device) -> (model, seconds)``. New code uses :meth:`unlearn.cache.ModelCache.trained`
with a factory and namespace; this subclass is that call for the digits CNN, on the same cache entries as
the benchmark's ``digits`` family (so the demo and the benchmark share the trained seed-0 model).
"""

from __future__ import annotations

import torch
from torch import nn

from unlearn import cache
from unlearn.data import ExampleSet
from unlearn.models import digits_cnn
from unlearn.tasks import TaskAdapter
from unlearn.training import TrainRecipe

DIGITS_NAMESPACE = "digits-cnn"


class ModelCache(cache.ModelCache):
    """The digits CNN through :class:`unlearn.cache.ModelCache` (the seconds returned are informational)."""

    def get_or_train(self, kind: str, task: TaskAdapter, examples: ExampleSet, recipe: TrainRecipe,
                     device: torch.device) -> tuple[nn.Module, float]:
        entry = self.trained(DIGITS_NAMESPACE, task, digits_cnn, examples, recipe, device, kind)
        return entry.model, float(entry.meta["train_seconds"])
