"""Held-out families: data and architectures no method, default or gate threshold was tuned on.

The brief's rule: a method is not a default until it holds on families beyond the one it was tuned on, and
outside reviewers run hidden cases on other data. The three families of :mod:`unlearn.bench.families`
(digits CNN, tabular MLP, digits ViT) are where every default was measured; these are the check that the
default chain and the gate hold elsewhere. They are run through the same harness (:func:`prepare` with
``family=``, the same splits, gate and metrics), never by ``make bench``'s sweep, and nothing was changed
after looking at them.

- ``cancer``: scikit-learn's breast-cancer set (569 records, 30 features, 2 classes; real measurements, shipped
  with the package), the BatchNorm+dropout MLP at width 64, Adam 1e-3, 40 epochs, batch 32. Binary: erasing
  a class leaves one, so the kept-class accuracy is 1 by construction and the class scenario tests the
  forgetting checks alone.
- ``wine``: scikit-learn's wine set (178 records, 13 features, 3 classes), a tanh MLP without normalisation or
  dropout (:class:`unlearn.models.TanhMLP`), Adam 1e-3, 60 epochs, batch 16, subjects of 2 records. Tiny:
  about 35 audit records, so one record moves an accuracy by about 3 points.
- ``blobs``: ``make_blobs`` (2,000 records, 10 features, 8 overlapping centres, ``cluster_std`` 4,
  ``random_state`` 1), the tanh MLP trained with SGD (momentum 0.9, lr 0.05), 40 epochs, batch 64.

Four more, added on 2026-12-01 after one look at seeds 0-1 with ``auto`` and ``retrain`` (a probe of what an
outside reviewer's hidden case might be; no method, default or gate threshold was changed for them):

- ``iris``: scikit-learn's iris set (150 records, 4 features, 3 classes), a LayerNorm+GELU MLP 32-32
  (:class:`unlearn.models.LayerNormMLP`), Adam 1e-3, 100 epochs, batch 8, subjects of 2. The smallest: 30
  audit records.
- ``moons``: ``make_moons`` (1,000 records, noise 0.3, ``random_state`` 3), a ReLU MLP 64-64 with dropout
  0.3 and no normalisation (:class:`unlearn.models.DropoutMLP`), Adam 3e-3, 50 epochs, batch 32, subjects of 4.
- ``conv1d``: ``make_classification`` (2,000 records, 32 features of which 12 informative, 5 classes, 2%
  flipped labels, ``random_state`` 7), a 1-D CNN with BatchNorm and dropout (:class:`unlearn.models.Conv1dNet`),
  Adam 1e-3, 40 epochs, batch 32, subjects of 5. A weak model (about 57% on never-trained records).
- ``linear``: scikit-learn's 8x8 digits standardised (1,797 records, 10 classes), multinomial logistic
  regression (:class:`unlearn.models.LinearClassifier`), SGD (momentum 0.9) lr 0.01, 30 epochs, batch 32, subjects of 6.

Each family trains 60% of each class (stratified, seed 0) and standardises features with the training
records' mean and deviation; subjects own consecutive records of a fixed shuffle. The class scenario erases
class :data:`HELDOUT_FORGET_CLASS` (class 3 does not exist in two of them).

``python -m unlearn.bench.heldout --seeds 0,1,2 [--methods auto,retrain] [--families cancer,wine,blobs]``
(``make bench-heldout``) runs every classifier method and ``auto`` by default, writes each result as a JSON
line to ``--raw`` as it comes, and prints the sweep's tables (:mod:`unlearn.bench.sweep`: every method, the
original and retrained models, the best method per scenario against the noise floor of a retrain with another
seed).
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from unlearn.bench.families import (
    TABULAR_TRAIN_FRACTION,
    Family,
    Records,
    stratified_records,
)
from unlearn.bench.harness import prepare
from unlearn.bench.scenarios import SELECTORS
from unlearn.bench.sweep import (
    open_raw,
    parse_methods,
    references,
    run_all,
    table,
    targets,
)
from unlearn.device import resolve_device
from unlearn.errors import InvalidParameterError, UnlearnError
from unlearn.models import (
    Conv1dNet,
    DropoutMLP,
    LayerNormMLP,
    LinearClassifier,
    seeded,
    tabular_mlp,
    tanh_mlp,
)
from unlearn.training import TrainRecipe

HELDOUT_FORGET_CLASS = 1
"""The class the ``<family>-class`` scenarios erase (every held-out family has a class 1)."""
TRAIN_FRACTION = TABULAR_TRAIN_FRACTION


@functools.cache
def cancer_records() -> Records:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    return stratified_records(data.data, data.target, "cancer", per_subject=5)


@functools.cache
def wine_records() -> Records:
    from sklearn.datasets import load_wine

    data = load_wine()
    return stratified_records(data.data, data.target, "wine", per_subject=2)


@functools.cache
def iris_records() -> Records:
    from sklearn.datasets import load_iris

    data = load_iris()
    return stratified_records(data.data, data.target, "iris", per_subject=2)


@functools.cache
def moons_records() -> Records:
    from sklearn.datasets import make_moons

    features, labels = make_moons(n_samples=1000, noise=0.3, random_state=3)
    return stratified_records(features, labels, "moons", per_subject=4)


@functools.cache
def conv1d_records() -> Records:
    from sklearn.datasets import make_classification

    features, labels = make_classification(n_samples=2000, n_features=32, n_informative=12, n_classes=5,
                                           flip_y=0.02, random_state=7)
    return stratified_records(features, labels, "conv1d", per_subject=5)


@functools.cache
def linear_records() -> Records:
    from sklearn.datasets import load_digits

    data = load_digits()
    return stratified_records(data.data, data.target, "linear", per_subject=6)


@functools.cache
def blobs_records() -> Records:
    from sklearn.datasets import make_blobs

    features, labels = make_blobs(n_samples=2000, centers=8, n_features=10, cluster_std=4.0, random_state=1)
    return stratified_records(features, labels, "blobs", per_subject=5)


def _cancer() -> Family:
    return Family("cancer", "BatchNorm+dropout MLP 64-64 on scikit-learn's breast-cancer set (569 records, 2 classes)",
                  2, "heldout-cancer-mlp", lambda seed: tabular_mlp(seed, 30, 2, hidden=64),
                  TrainRecipe(epochs=40, batch_size=32, lr=1e-3, optimizer="adam"), cancer_records,
                  {"hidden": 64, "dropout": 0.1, "features": 30})


def _wine() -> Family:
    return Family("wine", "tanh MLP 64-64 on scikit-learn's wine set (178 records, 3 classes)", 3,
                  "heldout-wine-tanh", lambda seed: tanh_mlp(seed, 13, 3),
                  TrainRecipe(epochs=60, batch_size=16, lr=1e-3, optimizer="adam"), wine_records,
                  {"hidden": 64, "features": 13})


def _blobs() -> Family:
    return Family("blobs", "tanh MLP 64-64, SGD, on make_blobs (2,000 records, 8 overlapping classes)", 8,
                  "heldout-blobs-tanh", lambda seed: tanh_mlp(seed, 10, 8),
                  TrainRecipe(epochs=40, batch_size=64, lr=0.05, optimizer="sgd"), blobs_records,
                  {"hidden": 64, "features": 10})


def _iris() -> Family:
    return Family("iris", "LayerNorm+GELU MLP 32-32 on scikit-learn's iris set (150 records, 3 classes)", 3,
                  "heldout-iris-layernorm", lambda seed: seeded(LayerNormMLP, seed, 4, 3),
                  TrainRecipe(epochs=100, batch_size=8, lr=1e-3, optimizer="adam"), iris_records,
                  {"hidden": 32, "features": 4})


def _moons() -> Family:
    return Family("moons", "ReLU MLP 64-64 with dropout 0.3 on make_moons (1,000 records, 2 classes)", 2,
                  "heldout-moons-dropout", lambda seed: seeded(DropoutMLP, seed, 2, 2),
                  TrainRecipe(epochs=50, batch_size=32, lr=3e-3, optimizer="adam"), moons_records,
                  {"hidden": 64, "dropout": 0.3, "features": 2})


def _conv1d() -> Family:
    return Family("conv1d", "1-D CNN with BatchNorm and dropout on make_classification (2,000 records, 5 classes)",
                  5, "heldout-conv1d", lambda seed: seeded(Conv1dNet, seed, 32, 5),
                  TrainRecipe(epochs=40, batch_size=32, lr=1e-3, optimizer="adam"), conv1d_records,
                  {"channels": 8, "dropout": 0.2, "features": 32})


def _linear() -> Family:
    return Family("linear", "multinomial logistic regression, SGD, on scikit-learn's 8x8 digits (10 classes)", 10,
                  "heldout-digits-linear", lambda seed: seeded(LinearClassifier, seed, 64, 10),
                  TrainRecipe(epochs=30, batch_size=32, lr=1e-2, optimizer="sgd"), linear_records,
                  {"features": 64})


HELDOUT_FAMILIES: dict[str, Callable[[], Family]] = {
    "cancer": _cancer, "wine": _wine, "blobs": _blobs,
    "iris": _iris, "moons": _moons, "conv1d": _conv1d, "linear": _linear,
}


def prepare_heldout(family_name: str, selector: str, seed: int, device=None, cache_dir: Path | None = None):
    """The harness's :func:`~unlearn.bench.harness.prepare` on a held-out family (original, timed retrain)."""
    try:
        family = HELDOUT_FAMILIES[family_name]()
    except KeyError:
        raise InvalidParameterError("family", f"unknown held-out family {family_name!r}; "
                                              f"known: {', '.join(HELDOUT_FAMILIES)}") from None
    if selector not in SELECTORS:
        raise InvalidParameterError("scenario", f"selector must be one of {SELECTORS}, got {selector!r}")
    return prepare(f"{family_name}-{selector}", seed, HELDOUT_FORGET_CLASS, device=device, cache_dir=cache_dir,
                   family=family)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unlearn.bench.heldout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="", help="comma-separated (default: every classifier method and auto)")
    parser.add_argument("--families", default=",".join(HELDOUT_FAMILIES))
    parser.add_argument("--selectors", default=",".join(SELECTORS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--raw", default=".cache/lethe/heldout.jsonl", help="where raw JSON results go")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results: list[dict] = []
    try:
        device = resolve_device(args.device)
        seeds = [int(s) for s in args.seeds.split(",")]
        methods = parse_methods(args.methods)
        with open_raw(args.raw) as sink:
            for family_name in args.families.split(","):
                for selector in args.selectors.split(","):
                    for seed in seeds:
                        results += run_all(prepare_heldout(family_name, selector, seed, device), methods, sink)
    except (UnlearnError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Held-out families, raw results in {args.raw}; machine {platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, device {device}; total {time.perf_counter() - started:.0f} s\n")
    print(table(results))
    print("\nOriginal and retrained models:\n")
    print(references(results))
    print()
    print(targets(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
