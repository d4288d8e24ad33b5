"""Continual scenarios on scikit-learn's digits (:mod:`unlearn.digits`), with the digits CNN.

Splits (fixed by :mod:`unlearn.digits`): strategies train on ``train`` records; ``holdout`` records are the
tune data (WiSE-FT's coefficient; ``digits-erase-then-update`` deals them further, see there); every
reported number is measured on ``test`` records, which nothing selects or stops on.

- ``digits-incremental`` (class incremental): the base CNN is trained on the train records of classes 0-4
  (:data:`unlearn.bench.DIGITS_RECIPE`, seed = run seed); updates 1-5 each bring the train records of one
  new class (5, 6, 7, 8, 9). Task 0 = classes 0-4, task u = class 4 + u. The head has 10 outputs from the
  start, so a new class is an output the model already has.
- ``digits-domain-shift`` (domain incremental): the train records are shuffled (seed 2000 + run seed); the base
  CNN learns the first half, clean; update u (1-4) brings the next eighth, shifted right by ceil(u / 2)
  pixels (zero fill) with Gaussian noise of standard deviation 0.1 u, clipped to [0, 1]. Task u's test and
  tune records are the test and holdout splits under the same transformation (noise seed fixed per task).
- ``digits-erase-then-update``: ``digits-incremental`` with two erasures between updates 1 and 2, each through
  ``unlearn``'s default chain (``ssd-auto`` -> ``shrink-perturb`` -> ``gu+graddiff`` -> ``retrain``) judged
  by ``unlearn``'s gate (:mod:`continual.bench.erasure`): every record of class 3, then every record of 10
  subjects (drawn with seed 5000 + run seed among the subjects with training records in classes 0, 1, 2, 4,
  5). Later updates leave out the erased subjects' records (an update carrying one is refused, which the run
  checks: ``erased_update_refused``); buffers are purged. After each later update both erasures are re-checked as the
  service's update gate does (class accuracy on its erased records against the policy's limit, 0.02 here
  (:data:`POLICY`); the subjects' membership against the gate's audit records) and a regressed one is erased
  again with the chain's approximate methods (:func:`continual.bench.harness.keep_erased`). Class 3 is left out of task 0's evaluation in every row (it
  is meant to be forgotten). Here the holdout split is dealt into ``tune`` and ``audit`` halves by
  :mod:`unlearn.splits` (benchmark key): strategies and unlearning methods see ``tune``, the chain's gate
  judges on ``audit``, and the reported numbers use ``test``. After each later update:
  ``erased_class_forget_acc`` (accuracy on class 3's train records) and ``erased_records_mia_auc`` (the
  loss-attack AUC of :func:`unlearn.membership.compare`: the erased subjects' train records of classes other
  than 3 against test records of the same classes, never trained on; 0.5 = indistinguishable; its KS p-value
  is ``erased_records_membership_ks_p``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from continual.bench.erasure import erase, erase_again, recheck
from continual.bench.harness import Erasure, Keyed, Scenario, Stage, subject_hash
from continual.errors import ErasedDataError
from continual.registry import CLASSIFICATION
from unlearn.bench import DIGITS_RECIPE, ModelCache
from unlearn.data import ExampleSet, classification_examples
from unlearn.digits import DigitsRecords, load_digits_records
from unlearn.gate import GatePolicy
from unlearn.importance import ImportanceCache, TrainImportance
from unlearn.membership import compare
from unlearn.models import digits_cnn
from unlearn.registry import UnlearnRequest
from unlearn.splits import AUDIT, BENCH_SPLIT_KEY, TUNE, audit_mask
from unlearn.tasks import ClassificationTask, accuracy

BASE_CLASSES = (0, 1, 2, 3, 4)
NEW_CLASSES = (5, 6, 7, 8, 9)
ERASED_CLASS = 3
ERASED_SUBJECTS = 10
DOMAIN_UPDATES = 4
# The update policy of the digits scenarios: 10 passes over each update, old-task accuracy every 2 steps, a
# replay buffer of 500 records (the DER++ paper's reference size; about 43% of the training records).
UPDATE_EPOCHS = 10
PROBE_EVERY = 2
BUFFER_CAPACITY = 500
# The model policy of digits-erase-then-update: the service's defaults, with the class limit of the scenario's
# target (issue 12: the erased class's forget accuracy <= 0.02 after every later update; the default is
# 0.05). It judges the erasures and the re-check after each update, which erases the class again when it is
# over the limit.
POLICY = GatePolicy(class_forget_max_accuracy=0.02)
SPLITS = {
    "r_matrix, acc, bwt, forgetting, min_acc, wc_acc, stability_gap": "test split (never trained or tuned on)",
    "tune (WiSE-FT coefficient)": "holdout split of the classes known before each update",
    "training": "train split",
}


class DigitsData:
    """The digits records as keyed example sets, selected by split and class."""

    def __init__(self, records: DigitsRecords):
        self.records = records

    def index(self, split: str, classes=None) -> np.ndarray:
        """Record positions of a split (``train``, ``holdout``, ``test``, or the holdout's ``tune`` / ``audit``
        halves of :mod:`unlearn.splits`), optionally of some classes only."""
        if split in (TUNE, AUDIT):
            index = self.records.indices("holdout")
            in_audit = audit_mask(self.records.record_ids[index], BENCH_SPLIT_KEY)
            index = index[in_audit if split == AUDIT else ~in_audit]
        else:
            index = self.records.indices(split)
        if classes is not None:
            index = index[np.isin(self.records.labels[index], list(classes))]
        return index

    def keyed(self, index: np.ndarray, transform=None, suffix: str = "") -> Keyed:
        features = torch.from_numpy(self.records.features[index])
        if transform is not None:
            features = transform(features)
        examples = classification_examples(features, torch.from_numpy(self.records.labels[index]))
        return Keyed(examples, tuple(f"{r}{suffix}" for r in self.records.record_ids[index]),
                     tuple(subject_hash(s) for s in self.records.subject_ids[index]))

    def examples(self, index: np.ndarray, transform=None) -> ExampleSet:
        return self.keyed(index, transform).examples


def base_model(task, examples: ExampleSet, seed: int, cache_dir: Path, device: torch.device, kind: str):
    """The base CNN, trained once per data and seed and cached (its training time is never used)."""
    recipe = replace(DIGITS_RECIPE, seed=seed)
    model, _ = ModelCache(cache_dir).get_or_train(kind, task, examples, recipe, device)
    return model.eval(), recipe


def _incremental_stages(data: DigitsData, base: Keyed, classes_before, new_classes, excluded_subjects=frozenset(),
                        dropped_class=None, tune_split: str = "holdout") -> list[Stage]:
    stages, retain, known = [], base, list(classes_before)
    for new_class in new_classes:
        update = data.keyed(data.index("train", [new_class]))
        if excluded_subjects:
            update = update.keep([h not in excluded_subjects for h in update.subject_hashes])
        tune = data.examples(data.index(tune_split, [c for c in known if c != dropped_class]))
        stages.append(Stage(update=update, retain=retain, tune=tune, new_classes=(new_class,)))
        retain, known = retain.join(update), known + [new_class]
    return stages


def digits_incremental(seed: int, cache_dir: Path, device: torch.device) -> Scenario:
    data, task = DigitsData(load_digits_records()), ClassificationTask(10)
    base = data.keyed(data.index("train", BASE_CLASSES))
    model, recipe = base_model(task, base.examples, seed, cache_dir, device, "continual-base-0-4")
    eval_sets = [data.examples(data.index("test", BASE_CLASSES))] + [data.examples(data.index("test", [c]))
                                                                     for c in NEW_CLASSES]
    return Scenario("digits-incremental", seed, task, model.to(device), base,
                    _incremental_stages(data, base, BASE_CLASSES, NEW_CLASSES), eval_sets, recipe, digits_cnn,
                    UPDATE_EPOCHS, PROBE_EVERY, BUFFER_CAPACITY, SPLITS, device=device,
                    notes={"tasks": [list(BASE_CLASSES)] + [[c] for c in NEW_CLASSES]})


def shift_and_noise(strength: int, seed: int):
    """Shift right by ceil(strength / 2) pixels (zero fill), add N(0, (0.1 strength)^2) noise, clip to [0, 1]."""
    def transform(features: torch.Tensor) -> torch.Tensor:
        if strength == 0:
            return features
        images = features.reshape(-1, 8, 8)
        shift = math.ceil(strength / 2)
        shifted = torch.zeros_like(images)
        shifted[:, :, shift:] = images[:, :, : 8 - shift]
        noise = torch.randn(shifted.shape, generator=torch.Generator().manual_seed(seed)) * (0.1 * strength)
        return (shifted + noise).clamp(0.0, 1.0).reshape(-1, 64)

    return transform


def digits_domain_shift(seed: int, cache_dir: Path, device: torch.device) -> Scenario:
    data, task = DigitsData(load_digits_records()), ClassificationTask(10)
    order = np.random.default_rng(2000 + seed).permutation(data.index("train"))
    half, eighth = len(order) // 2, len(order) // 8
    base = data.keyed(np.sort(order[:half]))
    model, recipe = base_model(task, base.examples, seed, cache_dir, device, "continual-base-clean-half")
    stages, retain, tune_sets, eval_sets = [], base, [data.examples(data.index("holdout"))], [data.examples(data.index("test"))]
    for u in range(1, DOMAIN_UPDATES + 1):
        chunk = np.sort(order[half + (u - 1) * eighth: half + u * eighth])
        update = data.keyed(chunk, shift_and_noise(u, 10_000 * seed + u), suffix=f"-shift{u}")
        stages.append(Stage(update=update, retain=retain, tune=_join_all(tune_sets)))
        retain = retain.join(update)
        tune_sets.append(data.examples(data.index("holdout"), shift_and_noise(u, 10_000 * seed + 100 + u)))
        eval_sets.append(data.examples(data.index("test"), shift_and_noise(u, 10_000 * seed + 200 + u)))
    return Scenario("digits-domain-shift", seed, task, model.to(device), base, stages, eval_sets, recipe, digits_cnn,
                    UPDATE_EPOCHS, PROBE_EVERY, BUFFER_CAPACITY, SPLITS, device=device,
                    notes={"tasks": ["clean"] + [f"shift {math.ceil(u / 2)} px, noise sd {0.1 * u:.1f}"
                                                 for u in range(1, DOMAIN_UPDATES + 1)]})


def _join_all(sets: list[ExampleSet]) -> ExampleSet:
    result = sets[0]
    for other in sets[1:]:
        result = result.concat(other)
    return result


def digits_erase_then_update(seed: int, cache_dir: Path, device: torch.device) -> Scenario:
    data, task = DigitsData(load_digits_records()), ClassificationTask(10)
    base = data.keyed(data.index("train", BASE_CLASSES))
    model, recipe = base_model(task, base.examples, seed, cache_dir, device, "continual-base-0-4")
    kept_base_classes = tuple(c for c in BASE_CLASSES if c != ERASED_CLASS)
    first_new, later_new = NEW_CLASSES[0], NEW_CLASSES[1:]

    # The data state: update 1 (class 5), then the erasures, then updates 2-5 without the erased data.
    update_1 = data.keyed(data.index("train", [first_new]))
    trained = base.join(update_1)
    in_class = [int(label) == ERASED_CLASS for label in trained.examples["labels"]]
    after_class = trained.keep([not c for c in in_class])
    rng = np.random.default_rng(5000 + seed)
    candidates = sorted(set(after_class.subject_hashes))
    erased_subjects = frozenset(rng.choice(candidates, ERASED_SUBJECTS, replace=False).tolist())
    of_subjects = [h in erased_subjects for h in after_class.subject_hashes]
    retain_after = after_class.keep([not s for s in of_subjects])
    class_records, subject_records = trained.keep(in_class), after_class.keep(of_subjects)
    known_after = kept_base_classes + (first_new,)
    tune_before = data.examples(data.index(TUNE, BASE_CLASSES))
    tune_after, audit_after = data.examples(data.index(TUNE, known_after)), data.examples(data.index(AUDIT, known_after))

    importance_cache = ImportanceCache(cache_dir / "importance")
    class_request = UnlearnRequest(task=task, forget=class_records.examples, retain=after_class.examples,
                                   tune=tune_after, train_importance=TrainImportance(task, trained.examples,
                                                                                     importance_cache),
                                   model_factory=digits_cnn, recipe=recipe, forget_classes=(ERASED_CLASS,), seed=seed)
    subject_request = UnlearnRequest(task=task, forget=subject_records.examples, retain=retain_after.examples,
                                     tune=tune_after, train_importance=TrainImportance(task, after_class.examples,
                                                                                       importance_cache),
                                     model_factory=digits_cnn, recipe=recipe, seed=seed)

    def erase_class(current):
        return erase(current, class_request, CLASSIFICATION, utility=audit_after, audit=audit_after, policy=POLICY)

    def erase_subjects(current):
        return erase(current, subject_request, CLASSIFICATION, utility=audit_after, audit=audit_after, policy=POLICY)

    def audit_of(retain_now: Keyed) -> ExampleSet:  # the audit records of every class the lineage now has
        return data.examples(data.index(AUDIT, sorted({int(c) for c in retain_now.examples["labels"]})))

    def again(request: UnlearnRequest, current, retain_now: Keyed):
        audit_now = audit_of(retain_now)
        return erase_again(current, request, retain_now.examples, CLASSIFICATION, utility=audit_now,
                           audit=audit_now, policy=POLICY)

    erasures = (Erasure(f"class {ERASED_CLASS}", erase_class, record_ids=frozenset(class_records.record_ids),
                        classes=frozenset({ERASED_CLASS}),
                        recheck=lambda current: recheck(task, current, class_records.examples, audit_after,
                                                        classes=(ERASED_CLASS,), policy=POLICY),
                        reerase=lambda current, retain_now: again(class_request, current, retain_now)),
                Erasure(f"{ERASED_SUBJECTS} subjects", erase_subjects, subject_hashes=erased_subjects,
                        record_ids=frozenset(subject_records.record_ids),
                        recheck=lambda current: recheck(task, current, subject_records.examples, audit_after,
                                                        policy=POLICY),
                        reerase=lambda current, retain_now: again(subject_request, current, retain_now)))
    stages = [Stage(update=update_1, retain=base, tune=tune_before, new_classes=(first_new,))]
    later = _incremental_stages(data, retain_after, known_after, later_new, excluded_subjects=erased_subjects,
                                dropped_class=ERASED_CLASS, tune_split=TUNE)
    erased_ids = frozenset(class_records.record_ids) | frozenset(subject_records.record_ids)
    for index, stage in enumerate(later):
        stage.erased_subject_hashes, stage.erased_record_ids = erased_subjects, erased_ids
        stage.erased_classes = frozenset({ERASED_CLASS})
        if index == 0:
            stage.erasures_before = erasures
    stages += later

    class_train = class_records.examples
    member_classes = sorted({int(c) for c in subject_records.examples["labels"]})
    never_trained = data.examples(data.index("test", member_classes))

    def per_update(strategy: str, u: int, current) -> dict:
        membership = compare(task, current, subject_records.examples, never_trained)
        return {"update": u, "after_erasure": u >= 2,
                "erased_class_forget_acc": accuracy(task, current, class_train),
                "erased_class_test_acc": accuracy(task, current, data.examples(data.index("test", [ERASED_CLASS]))),
                "erased_records_mia_auc": membership.auc, "erased_records_membership_ks_p": membership.ks_p_value}

    eval_sets = [data.examples(data.index("test", kept_base_classes))] + [data.examples(data.index("test", [c]))
                                                                          for c in NEW_CLASSES]
    refusal = _erased_update_refused(task, model, stages[1], subject_records, recipe)
    splits = {**SPLITS, "tune (WiSE-FT coefficient; the unlearning methods' stop rules)": "tune half of the holdout "
              "split (unlearn.splits)", "erasure chain's gate": "audit half of the holdout split"}
    splits.pop("tune (WiSE-FT coefficient)")
    notes = {"tasks": [list(kept_base_classes)] + [[c] for c in NEW_CLASSES],
             "erased_class": ERASED_CLASS, "erased_subjects": len(erased_subjects),
             "erased_subject_records": len(subject_records), "erased_class_records": len(class_records),
             "erased_update_refused": refusal,
             "membership_reference": f"test records of classes {member_classes} (never trained on)"}
    return Scenario("digits-erase-then-update", seed, task, model.to(device), base, stages, eval_sets, recipe,
                    digits_cnn, UPDATE_EPOCHS, PROBE_EVERY, BUFFER_CAPACITY, splits, per_update=per_update,
                    device=device, notes=notes)


def _erased_update_refused(task, model, stage: Stage, erased: Keyed, recipe) -> bool:
    """Submitting an update that carries an erased subject's record must be refused before training."""
    from continual import registry

    poisoned = stage.update.join(erased.keep([i == 0 for i in range(len(erased))]))
    request = registry.UpdateRequest(task=task, update=poisoned.examples, update_record_ids=poisoned.record_ids,
                                     update_subject_hashes=poisoned.subject_hashes, recipe=recipe,
                                     erased_subject_hashes=stage.erased_subject_hashes,
                                     erased_record_ids=stage.erased_record_ids, erased_classes=stage.erased_classes)
    try:
        registry.run("finetune", model, request)
    except ErasedDataError:
        return True
    return False


SCENARIOS = {"digits-incremental": digits_incremental, "digits-domain-shift": digits_domain_shift,
             "digits-erase-then-update": digits_erase_then_update}
