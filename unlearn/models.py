"""Small models the project trains itself (no downloads): the digits CNN, the tabular MLP, the held-out
families' models (a tanh MLP, a LayerNorm MLP, a dropout MLP, a 1-D CNN, a linear classifier) and a tiny MLP
for tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits, taking flat [batch, 64] inputs scaled to [0, 1].

    Flat inputs keep the dataset format task-agnostic (a ``features`` vector per record); the model
    reshapes to one 8x8 channel. ~39k parameters; batch norm is there on purpose, so that importance is
    computed in eval mode as SSD prescribes.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.features(inputs.reshape(-1, 1, 8, 8)))


class TinyMLP(nn.Module):
    """Two-layer perceptron used by the contract tests."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 32):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layers(inputs)


class TabularMLP(nn.Module):
    """An MLP for tabular features with BatchNorm AND dropout in every hidden block (the benchmark's
    ``tabular`` family).

    ``Linear -> BatchNorm1d -> ReLU -> Dropout`` twice, then a linear head. Both layer kinds are there on
    purpose: BatchNorm makes training mode and eval mode differ (importance and gradients must be taken in
    eval mode; a training batch of one example crashes it), and dropout makes training random (the training
    loop must seed it for a retrain to be exact).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layers(inputs)


def digits_cnn(seed: int, num_classes: int = 10) -> DigitsCNN:
    """Factory with seeded initialisation (the retrain baseline calls this with the recipe's seed)."""
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        return DigitsCNN(num_classes)


def tiny_mlp(seed: int, in_features: int = 64, num_classes: int = 10) -> TinyMLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyMLP(in_features, num_classes)


def tabular_mlp(seed: int, in_features: int, num_classes: int, hidden: int = 128, dropout: float = 0.1) -> TabularMLP:
    """Factory with seeded initialisation (the retrain baseline calls it with the recipe's seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TabularMLP(in_features, num_classes, hidden, dropout)


class TanhMLP(nn.Module):
    """``Linear -> Tanh`` twice, then a linear head: no normalisation layer, no dropout, a saturating
    activation (the held-out benchmark families, :mod:`unlearn.bench.heldout`: an architecture no method was
    tuned on)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                    nn.Linear(hidden, num_classes))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layers(inputs)


def tanh_mlp(seed: int, in_features: int, num_classes: int, hidden: int = 64) -> TanhMLP:
    """Factory with seeded initialisation (the retrain baseline calls it with the recipe's seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TanhMLP(in_features, num_classes, hidden)


class LayerNormMLP(nn.Module):
    """``Linear -> LayerNorm -> GELU`` twice, then a linear head: per-example normalisation (no running
    statistics, training and eval mode alike) and a smooth activation (held-out family ``iris``)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 32):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                    nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                    nn.Linear(hidden, num_classes))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layers(inputs)


class DropoutMLP(nn.Module):
    """``Linear -> ReLU -> Dropout`` twice, then a linear head: heavy dropout (0.3) and no normalisation
    (held-out family ``moons``)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64, dropout: float = 0.3):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, num_classes))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layers(inputs)


class Conv1dNet(nn.Module):
    """A 1-D CNN over the feature vector: ``Conv1d(1, 8, 5) -> BatchNorm1d -> ReLU -> MaxPool1d(2)``, then
    dropout (0.2) and a linear head (held-out family ``conv1d``: convolution and BatchNorm over channels of a
    sequence rather than an image or a hidden layer)."""

    def __init__(self, in_features: int, num_classes: int, channels: int = 8, dropout: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(1, channels, 5, padding=2), nn.BatchNorm1d(channels), nn.ReLU(),
                                      nn.MaxPool1d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * (in_features // 2),
                                                                              num_classes))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.features(inputs.reshape(inputs.shape[0], 1, -1)))


class LinearClassifier(nn.Module):
    """Multinomial logistic regression, one ``Linear`` layer (held-out family ``linear``: a convex model
    with no hidden layer, trained with SGD)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.linear(inputs)


def seeded(build, seed: int, *args, **kwargs) -> nn.Module:
    """``build(*args, **kwargs)`` with its initialisation drawn from ``seed`` (the caller's RNG undisturbed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(*args, **kwargs)
