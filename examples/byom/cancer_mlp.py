"""The model code of the bring-your-own-model example: a small MLP for scikit-learn's breast-cancer data.

This module travels with the model: ``byom.py`` logs it with ``code_paths=[this file]``, so whoever loads the
model (Lethe's server and workers, your serving stack) can unpickle ``CancerMLP`` without installing anything,
and Lethe can import the factory ``cancer_mlp:make_model`` for an exact retrain. Give such a module a name
unique in your organisation: every model's code lands on the same ``sys.path`` in Lethe's process.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

FEATURES = 30  # scikit-learn's breast-cancer data: 30 measurements per patient
CLASSES = 2  # malignant (0) / benign (1)


class CancerMLP(nn.Module):
    """Standardised measurements [batch, 30] (float32) -> logits [batch, 2]. No softmax: Lethe's losses and
    its ONNX check work on logits."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                    nn.Linear(hidden, CLASSES))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layers(inputs)


def make_model(seed: int) -> CancerMLP:
    """The model factory Lethe calls as ``make_model(seed)`` (docs/models.md): a fresh, seeded initialisation,
    without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CancerMLP()
