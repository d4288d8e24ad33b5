"""Benchmark families: a model, a task, a record set with subjects and a training recipe.

A *family* is everything a classifier benchmark needs that is not a forget request (issue 9, "a harness
that takes any model and data set"):

- ``model_factory(seed) -> nn.Module`` (seeded initialisation; the retrain baseline calls it) and the
  architecture's cache ``namespace``;
- the task adapter (:class:`unlearn.tasks.ClassificationTask` with the family's class count);
- :class:`Records`: features, labels, ``record_id`` and ``subject_id`` per record, and which records the
  original model is trained on. Every other record is *never trained*; the harness deals those into
  ``tune`` and ``audit`` with :func:`unlearn.splits.audit_mask` and :data:`unlearn.splits.BENCH_SPLIT_KEY`;
- the :class:`~unlearn.training.TrainRecipe` of the original model (repeated exactly by ``retrain``).

Families (``FAMILIES``; scenario names are ``<family>-<class|random|subject>``):

- ``digits``: scikit-learn's 8x8 digits (:mod:`unlearn.digits`, 1,797 records, 10 classes) and the digits
  CNN (:func:`unlearn.models.digits_cnn`, ~39k parameters, BatchNorm2d). Trained on the ``train`` split
  (1,168 records); ``holdout`` and ``test`` (629) are never trained.
- ``tabular``: 3,000 records of ``sklearn.datasets.make_classification`` (20 features, 10 informative,
  4 redundant, 6 classes of 2 clusters, ``flip_y=0.05``, ``class_sep=1.0``, ``random_state=0``),
  standardised with the training split's mean and deviation, and an MLP with BatchNorm1d AND dropout
  (:class:`unlearn.models.TabularMLP`, 128-128, dropout 0.1, ~21k parameters). 60% of each class is trained
  on (1,800), 40% never (1,200). Why this set: it ships with scikit-learn (generated, nothing downloaded),
  and it is hard in the way the digits are not. 5% of its labels are flipped at random and its clusters
  overlap, so the MLP can only fit its training set by memorising records: 97% training accuracy against
  77% on never-trained records. A random 10% of the training records is then clearly recognisable to a loss
  attack (AUC 0.64, KS p 1e-7 on seed 0) and a retrained model classifies the same records at 76%: record
  erasure is not passed by doing nothing, unlike on the digits CNN, which generalises (a retrained model
  still gets 99% of erased digits right).
- ``vit``: the digits again, with the small vision transformer of :mod:`unlearn.vit` (4 blocks, hidden 128,
  ~534k parameters, LayerNorm, no BatchNorm, no dropout) and its AdamW recipe: another architecture on the
  same records, so the families differ by the model alone. GS-LoRA runs here only.

Subjects: records are dealt to synthetic subjects (digits: 6 records each, :mod:`unlearn.digits`; tabular:
5 each, shuffled with a fixed seed), so a subject owns records of several classes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from unlearn.data import ExampleSet, classification_examples
from unlearn.errors import InvalidDataError, InvalidParameterError
from unlearn.models import digits_cnn, tabular_mlp
from unlearn.tasks import ClassificationTask
from unlearn.training import TrainRecipe

if TYPE_CHECKING:
    from unlearn.lm.fictitious import LMFamily

DIGITS_RECIPE = TrainRecipe(epochs=30, batch_size=32, lr=1e-3, optimizer="adam")
"""The digits CNN's recipe (also the service demo's)."""
TABULAR_RECIPE = TrainRecipe(epochs=60, batch_size=64, lr=1e-3, optimizer="adam")
"""The tabular MLP's recipe: 60 epochs, so that it memorises its noisy records (97% train accuracy)."""
TABULAR_SAMPLES, TABULAR_FEATURES, TABULAR_CLASSES = 3000, 20, 6
TABULAR_TRAIN_FRACTION = 0.6
TABULAR_RECORDS_PER_SUBJECT = 5


@dataclass(frozen=True)
class Records:
    """A family's records. ``trained`` marks the original model's training set; the rest is never trained."""

    features: np.ndarray  # float32 [N, F]
    labels: np.ndarray  # int64 [N]
    record_ids: np.ndarray  # str [N]
    subject_ids: np.ndarray  # str [N]
    trained: np.ndarray  # bool [N]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Family:
    """Model factory, task, records and recipe of one benchmark family (module docstring)."""

    name: str
    summary: str
    num_classes: int
    namespace: str  # the architecture's name in the model cache
    model_factory: Callable[[int], nn.Module]
    recipe: TrainRecipe
    load_records: Callable[[], Records]
    architecture: dict[str, Any] = field(default_factory=dict)  # what else determines the model (cache key)

    def task(self) -> ClassificationTask:
        return ClassificationTask(self.num_classes)

    def examples(self, records: Records, index: np.ndarray) -> ExampleSet:
        return classification_examples(torch.from_numpy(records.features[index]),
                                       torch.from_numpy(records.labels[index]))

    def with_recipe(self, recipe: TrainRecipe) -> Family:
        return replace(self, recipe=recipe)


@functools.cache
def digits_records() -> Records:
    from unlearn.digits import load_digits_records

    digits = load_digits_records()
    return Records(digits.features, digits.labels, digits.record_ids.astype(str), digits.subject_ids.astype(str),
                   digits.splits == "train")


def stratified_records(features: np.ndarray, labels: np.ndarray, prefix: str, per_subject: int,
                       train_fraction: float = TABULAR_TRAIN_FRACTION) -> Records:
    """Records of a feature matrix: ``train_fraction`` of each class trained on (seed 0), features standardised
    with the training records' mean and deviation, subjects of ``per_subject`` records dealt in a fixed
    shuffle, ids ``<prefix>-00000``. The tabular family's records, and the held-out families'
    (:mod:`unlearn.bench.heldout`)."""
    rng = np.random.default_rng(0)
    trained = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):  # stratified: every class keeps the same share in training
        members = rng.permutation(np.flatnonzero(labels == label))
        trained[members[: round(train_fraction * len(members))]] = True
    mean, deviation = features[trained].mean(axis=0), features[trained].std(axis=0)
    features = ((features - mean) / np.where(deviation > 0, deviation, 1.0)).astype(np.float32)
    subject_ids = np.empty(len(labels), dtype=object)
    subject_ids[rng.permutation(len(labels))] = [f"subject-{i // per_subject:04d}" for i in range(len(labels))]
    record_ids = np.array([f"{prefix}-{i:05d}" for i in range(len(labels))])
    return Records(features, labels.astype(np.int64), record_ids, subject_ids.astype(str), trained)


@functools.cache
def tabular_records() -> Records:
    """The tabular family's records (module docstring); deterministic for a given scikit-learn."""
    from sklearn.datasets import make_classification

    features, labels = make_classification(
        n_samples=TABULAR_SAMPLES, n_features=TABULAR_FEATURES, n_informative=10, n_redundant=4,
        n_classes=TABULAR_CLASSES, n_clusters_per_class=2, flip_y=0.05, class_sep=1.0, random_state=0)
    return stratified_records(features, labels, "tabular", TABULAR_RECORDS_PER_SUBJECT)


def _tabular_factory(seed: int) -> nn.Module:
    return tabular_mlp(seed, TABULAR_FEATURES, TABULAR_CLASSES)


def _vit_factory(seed: int) -> nn.Module:
    from unlearn.vit import digits_vit  # transformers takes seconds to import: only the vit family pays it

    return digits_vit(seed)


def _digits() -> Family:
    return Family("digits", "digits CNN (BatchNorm2d, ~39k parameters) on scikit-learn's 8x8 digits", 10,
                  "digits-cnn", digits_cnn, DIGITS_RECIPE, digits_records)


def _tabular() -> Family:
    return Family("tabular", "MLP 128-128 with BatchNorm1d and dropout 0.1 on make_classification "
                  "(3,000 records, 20 features, 6 classes, 5% flipped labels)", TABULAR_CLASSES,
                  "tabular-mlp", _tabular_factory, TABULAR_RECIPE, tabular_records,
                  {"hidden": 128, "dropout": 0.1, "features": TABULAR_FEATURES})


def _vit() -> Family:
    from dataclasses import asdict

    from unlearn.vit import DIGITS_VIT, DIGITS_VIT_RECIPE

    return Family("vit", "ViT (4 blocks, hidden 128, ~534k parameters) on scikit-learn's 8x8 digits", 10,
                  "digits-vit", _vit_factory, DIGITS_VIT_RECIPE, digits_records, {"vit": asdict(DIGITS_VIT)})


FAMILIES: dict[str, Callable[[], Family]] = {"digits": _digits, "tabular": _tabular, "vit": _vit}
"""Family builders by name (built on demand: the ViT imports transformers)."""


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]()
    except KeyError:
        raise InvalidParameterError("family", f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


def check_records(family: Family, records: Records) -> None:
    """Raise :class:`InvalidDataError` (field ``family.<name>``) when the records cannot make a benchmark: the
    harness runs every family through this before any training, so a family of your own is refused naming
    what is wrong rather than failing deep inside a method."""
    field_name = f"family.{family.name}"
    count = len(records)
    if count == 0:
        raise InvalidDataError(field_name, "has no records")
    if records.features.ndim != 2 or len(records.features) != count:
        raise InvalidDataError(field_name, f"features must be [records, features], got {records.features.shape} "
                                           f"for {count} labels")
    for name in ("record_ids", "subject_ids", "trained"):
        if len(getattr(records, name)) != count:
            raise InvalidDataError(field_name, f"{name} has {len(getattr(records, name))} entries for {count} records")
    if not np.isfinite(records.features).all():
        raise InvalidDataError(field_name, "features contain NaN or inf")
    labels = np.asarray(records.labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= family.num_classes:
        raise InvalidDataError(field_name, f"labels must be integers in [0, {family.num_classes}), got "
                                           f"{labels.dtype} in [{labels.min()}, {labels.max()}]")
    if len(set(records.record_ids.tolist())) != count:
        raise InvalidDataError(field_name, "record ids must be unique (tune and audit are dealt by record id)")
    trained = np.asarray(records.trained, dtype=bool)
    if trained.all() or not trained.any():
        raise InvalidDataError(field_name, f"{int(trained.sum())} of {count} records are trained on: the original "
                               "needs training records, and tune and audit need records it never trained on")


def import_family(target: str) -> Family | LMFamily:
    """``module:function`` -> the :class:`Family` that ``function()`` returns: the harness on a model and data
    set of your own, from the command line (``python -m unlearn.bench --family module:function``). Or an
    :class:`unlearn.lm.fictitious.LMFamily` (a :class:`unlearn.lm.people.FactSchema` of fictitious people, a
    :class:`unlearn.lm.model.GPTSpec` and a recipe): the LM benchmark on people of your own, scenario
    ``<the schema's name>-subject``.

    The model cache keys an original on the family's ``namespace``, ``architecture``, recipe and data. A family
    from outside the project is also keyed on the source code of its factory's module and of its model's
    class (:func:`code_digest`), so a model edited between two runs is trained anew, not loaded from the first.
    An LM family's model is ``transformers``' (its spec is in the key, its people in the data digest).
    """
    import importlib

    from unlearn.lm.fictitious import LMFamily  # here: the classifier harness need not load transformers

    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise InvalidParameterError("family", f"must be module:function, got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InvalidParameterError("family", f"cannot import {module_name!r}: {error}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InvalidParameterError("family", f"module {module_name!r} has no function {function_name!r}")
    family = function()
    if not isinstance(family, (Family, LMFamily)):
        raise InvalidParameterError("family", f"{target}() returned {type(family).__name__}, expected an "
                                              "unlearn.bench.families.Family or an unlearn.lm.fictitious.LMFamily")
    language_model = isinstance(family, LMFamily)
    if language_model:
        check_lm_family(family)
    name = family.schema.name if language_model else family.name
    if "-" in name or not name:
        raise InvalidParameterError("family", f"the family's name must be non-empty without '-' (scenarios are "
                                              f"<name>-<class|random|subject>), got {name!r}")
    return family if language_model else replace(family, architecture={**family.architecture,
                                                                       "code": code_digest(family)})


def check_lm_family(family: LMFamily) -> None:
    """An LM family's parts have the types the LM benchmark reads (a reviewer's module may build anything)."""
    from unlearn.lm.model import GPTSpec
    from unlearn.lm.people import FactSchema

    for field_name, kind in (("schema", FactSchema), ("spec", GPTSpec), ("recipe", TrainRecipe)):
        value = getattr(family, field_name)
        if not isinstance(value, kind):
            raise InvalidParameterError(f"family.{field_name}", f"must be a {kind.__module__}.{kind.__name__}, "
                                                                f"got {type(value).__name__}")


def code_digest(family: Family) -> str:
    """SHA-256 of the source of the module that defines ``family.model_factory`` and of the model's class;
    ``"no source"`` where Python cannot find it (then an edited model under the same namespace, recipe and
    data is loaded from the cache: give it a new ``namespace``)."""
    import hashlib
    import inspect

    digest = hashlib.sha256()
    try:
        for owner in (inspect.getmodule(family.model_factory), type(family.model_factory(0))):
            digest.update(inspect.getsource(owner).encode())
    except (OSError, TypeError):
        return "no source"
    return digest.hexdigest()
