"""Stress of the gate on memorised records (issue 10): a model that memorised mislabelled records must not pass
an erasure of those records unless they are forgotten to the never-seen level.

The model: an MLP trained to 100% training accuracy on digits whose training labels were 20% flipped (fixed
seeds), so it has memorised every mislabelled record. The mislabelled records belong to subjects of their own;
twenty-four of those subjects (72 records) are erased through the engine, with the default escalation chain
(``ssd-auto``, ``shrink-perturb``, ``gu+graddiff`` and ``retrain``, since the factory and recipe are
registered).

The never-seen level of a MISLABELLED record is measured on mislabelled records no model saw: 20% of the
``test`` split's labels are flipped too (Lethe never reads that split). A model that never saw a mislabelled
record predicts its true class, so its loss on the wrong label is high.

FOUND: the gate compared only the erased records' losses with the ``audit`` records', which are correctly
labelled. Memorised mislabelled records have low losses, like correctly classified unseen records: on the
unchanged model, loss-attack AUC 0.49 and KS p 0.03, so the membership checks PASS. An exact retrain, which
forgets them perfectly, FAILS them as over-forgetting (AUC 0.01 against audit). A population reference cannot
stand for records that are not exchangeable with it (mislabelled records, outliers).

Since then the gate also runs ``forget_accuracy`` (unlearn.gate, check 4): the erased records' training labels
may not be predicted significantly (one-sided Fisher exact) and by more than 0.05 better than audit's. Its power
depends on the sizes: with twelve subjects (36 records) against 56 audit records, ``ssd-auto`` still passed
with the records memorised (35/36 right against 44/56 is p 0.0098, above ``min_forget_p`` 0.005). With
twenty-four subjects (72 records, this test) every attempt of the chain is rejected: ``ssd-auto`` and
``gu+graddiff`` on ``forget_accuracy`` and the KS test, ``shrink-perturb`` and the exact ``retrain`` as
over-forgetting (2026-11-29), so the job ends REJECTED_BY_VERIFICATION with the alias unmoved: the erasure is refused,
never certified with the records still memorised. The retrain's rejection is the population reference's
limit (above): such a request stays pending with every attempt's evidence for an operator; the gate has no
reference of never-seen records labelled like the erased ones.

Measured again on 2026-12-01 (the same at 3b0336a, so the environment moved, not the code): ``gu+graddiff``
stopped after 8 steps as "over-forgetting" with 68 of 72 flipped labels still predicted, and the gate passed it
(Fisher p 0.027 against the audit accuracy, KS p 0.0058): the job was certified with the records memorised.
The gate cannot see this at its 0.5% level with 56 audit records. The methods' stop rule now asks what the
gate's ``forget_accuracy`` check asks, against ``tune`` at the stop level (0.05), and while the training labels
are still predicted significantly better than tune's a run has neither reached the target nor gone beyond it
(:mod:`unlearn.forget_target`). ``gu+graddiff`` then runs on and is rejected as over-forgetting (66 of 72 still
predicted, Fisher p 0.089 on audit, KS p 0.0002), like every other attempt: REJECTED_BY_VERIFICATION, 21 s.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from lethe_demo.data import DEMO_POLICY, digits_frame
from service.domain import ErasureRequest, JobState, ModelRegistration, TaskType
from service.engine import Engine
from tests.service.conftest import make_settings, wait_for_jobs
from unlearn.data import classification_examples
from unlearn.gate import GatePolicy, judge
from unlearn.membership import compare
from unlearn.splits import audit_mask
from unlearn.tasks import ClassificationTask, accuracy
from unlearn.training import TrainRecipe, train

RECIPE = TrainRecipe(epochs=60, batch_size=32, lr=3e-3, seed=0)  # 100% training accuracy, 20% noise included
ROWS, FLIP_FRACTION, RECORDS_PER_NOISY_SUBJECT, ERASED_SUBJECTS = 1000, 0.2, 3, 24
MEMBERSHIP = {"membership_ks", "membership_auc"}
TASK = ClassificationTask(10)


def memorising_mlp(seed: int) -> nn.Module:
    """Wide enough to memorise every flipped label (the registered factory)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def _noisy_frame():
    """Digits rows (own record ids) with 20% of the training labels flipped, and 20% of the ``test`` split's;
    the flipped training records belong to subjects of their own, three records each. Returns (frame, the
    flipped training records' subjects, mask of the flipped never-seen ``test`` records)."""
    frame = digits_frame().head(ROWS).copy()
    frame["record_id"] = "mem-" + frame["record_id"]
    frame["subject_id"] = "mem-" + frame["subject_id"]
    rng = np.random.default_rng(0)
    labels = frame["label"].to_numpy().copy()
    flipped = {}
    for split in ("train", "test"):
        rows = np.flatnonzero(frame["split"].to_numpy() == split)
        flipped[split] = rng.choice(rows, size=round(FLIP_FRACTION * len(rows)), replace=False)
        labels[flipped[split]] = (labels[flipped[split]] + rng.integers(1, 10, len(flipped[split]))) % 10  # wrong
    frame["label"] = labels
    subjects = [f"mem-noisy-{i // RECORDS_PER_NOISY_SUBJECT:03d}" for i in range(len(flipped["train"]))]
    frame.iloc[flipped["train"], frame.columns.get_loc("subject_id")] = subjects
    never_seen_mislabelled = np.zeros(len(frame), dtype=bool)
    never_seen_mislabelled[flipped["test"]] = True
    return frame, sorted(set(subjects)), never_seen_mislabelled


def _examples(frame, mask) -> object:
    rows = frame[mask]
    return classification_examples(torch.tensor(np.stack(rows["features"]), dtype=torch.float32),
                                   torch.tensor(rows["label"].to_numpy(), dtype=torch.long))


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Iterator[Engine]:
    """An engine of this module's own, with a fixed subject-hash key: the tune/audit split of never-trained
    records is keyed by it (unlearn.splits), so the same records land in ``audit`` on every run."""
    engine = Engine(make_settings(tmp_path_factory.mktemp("memorised"), subject_hash_key="5e" * 32))
    engine.start()
    yield engine
    engine.stop(30)
    engine.store.dispose()


@pytest.fixture(scope="module")
def memorised(engine):
    """The noisy data, the memorising model, and the sets both tests judge on."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared by many processes: one intra-op thread trains several times faster
    try:
        frame, noisy_subjects, never_seen_mislabelled = _noisy_frame()
        train_mask = (frame["split"] == "train").to_numpy()
        original = train(TASK, memorising_mlp(RECIPE.seed), _examples(frame, train_mask), RECIPE)
    finally:
        torch.set_num_threads(threads)
    erased = noisy_subjects[:ERASED_SUBJECTS]
    forget_mask = frame["subject_id"].isin(erased).to_numpy() & train_mask
    holdout = (frame["split"] == "holdout").to_numpy()
    audit = holdout & audit_mask(frame["record_id"].astype(str), engine.settings.split_key_bytes)
    return {"frame": frame, "original": original, "erased": erased, "train": _examples(frame, train_mask),
            "forget_mask": forget_mask, "forget": _examples(frame, forget_mask), "audit": _examples(frame, audit),
            "never_seen_mislabelled": _examples(frame, never_seen_mislabelled)}


REJECTS = MEMBERSHIP | {"forget_accuracy"}


@pytest.mark.slow
def test_the_gate_rejects_the_unchanged_memorising_model(memorised):
    """The one-sided forget_accuracy check fails: 72 of 72 training labels predicted against ~79% on audit
    (Fisher p 2e-5). At 36 erased records the membership test was blind (AUC ~0.49 against the correctly
    labelled audit split); at 72 its KS test sees the difference too, the AUC still does not."""
    assert accuracy(TASK, memorised["original"], memorised["train"]) == 1.0  # every flipped label memorised
    unchanged = judge(TASK, memorised["original"], memorised["original"], memorised["forget"], memorised["audit"],
                      memorised["audit"], GatePolicy())
    assert "forget_accuracy" in unchanged.failures, unchanged.as_dict()
    assert "membership_auc" not in unchanged.failures, "the loss-attack AUC saw it after all: update the docstring"


@pytest.mark.slow
@pytest.mark.long  # trains the memorising MLP, then a chain of up to four methods through the engine
def test_an_erasure_of_memorised_records_passes_only_if_they_are_forgotten(engine, tmp_path, memorised):
    """Through the engine: REJECTED_BY_VERIFICATION with membership or forget_accuracy failures, or a new version
    on which the erased records are at the never-seen level of mislabelled records."""
    # Teeth: against never-seen MISLABELLED records, the unchanged model's memorisation is plain.
    reference = compare(TASK, memorised["original"], memorised["forget"], memorised["never_seen_mislabelled"])
    assert not reference.ks_passes(DEMO_POLICY.min_forget_p) and reference.direction == "under", reference

    version = engine.registry.log_initial_model(memorised["original"], "memorised-mlp", run_name="memorised")
    path = tmp_path / "noisy.parquet"
    memorised["frame"].to_parquet(path, index=False)
    engine.register_model(ModelRegistration(
        model_name="memorised-mlp", version=version, alias=None, task_type=TaskType.CLASSIFICATION,
        dataset_uri=str(path), policy=DEMO_POLICY, num_classes=10, model_factory=f"{__name__}:memorising_mlp",
        train_recipe={k: getattr(RECIPE, k) for k in ("epochs", "batch_size", "lr", "seed")}))
    outcome = engine.submit_erasure(ErasureRequest(
        request_id="memorised-1", subject_ids=tuple(memorised["erased"]), model_names=("memorised-mlp",)))
    (job,) = wait_for_jobs(engine, outcome.job_ids, timeout_s=1200)
    assert job.records == int(memorised["forget_mask"].sum())
    attempts = job.evidence["attempts"]
    report = [(a["method"], a["failures"], (a["verification"] or {}).get("membership_after", {}).get("direction"),
               (a["verification"] or {}).get("membership_after", {}).get("ks_p_value"),
               (a["verification"] or {}).get("forget_accuracy"), a["error"]) for a in attempts]
    print("memorised erasure:", job.state.value, report)
    if job.state is JobState.REJECTED_BY_VERIFICATION:
        judged = [a for a in attempts if a["verification"] is not None]
        assert judged and all(REJECTS & set(a["failures"]) for a in judged), report
        assert engine.registry.serving_version("memorised-mlp") == version  # the alias did not move
        return
    assert job.state is JobState.SUCCEEDED, (job.state, job.message, report)
    after = engine.registry.load_model("memorised-mlp", job.result_version)
    forgotten = compare(TASK, after, memorised["forget"], memorised["never_seen_mislabelled"])
    assert forgotten.ks_passes(DEMO_POLICY.min_forget_p) and forgotten.auc_passes(DEMO_POLICY.mia_auc_margin), (
        f"version {job.result_version} passed the gate with {report}, but the erased records are not at the "
        f"never-seen level of mislabelled records: {forgotten.as_dict()}")
