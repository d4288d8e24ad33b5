"""Scenarios ``fictitious-updates`` and ``customer-updates``: a tiny LM learns 10 new people per update while 10
erased people stay forgotten (issue 12).

``fictitious-updates`` runs on the biographies and the GPT every LM default was tuned on; ``customer-updates``
on the second LM family (:mod:`unlearn.lm.customers`: customer records and a Llama-style model of the same
size, :data:`unlearn.lm.fictitious.CUSTOMER_SPEC`, the same recipe), on which nothing of this scenario was
tuned. Everything below holds for both; only the data and the architecture differ.

Data (:mod:`unlearn.lm.fictitious`, data seed 0): 100 trainable fictitious people and 20 never trained on,
five questions each. The run's seed (``numpy.random.default_rng(6000 + seed)``) shuffles the 100 people:

- the base GPT (:data:`unlearn.lm.fictitious.LM_SPEC`, :data:`~unlearn.lm.fictitious.LM_RECIPE`, seed = run
  seed, cached by data and seed) learns the first 40;
- updates 1, 2 and 3 each bring the next 10;
- 10 of the 40 base people are erased between updates 1 and 2, through ``unlearn``'s default chain for causal
  LMs, the service's (``unseen-kd`` -> ``simnpo+rt`` -> ``simnpo+rt`` with the fade at 0.8 -> ``unseen-kd`` with
  screened neighbours (since 2026-12-01; the recorded runs never reached it) -> ``retrain``, see
  :data:`CHAIN_METHODS`), judged by ``unlearn``'s gate (:mod:`continual.bench.erasure`); replay buffers are
  purged of them; after each later update they are re-checked as the service's update gate does (membership
  against the gate's audit people, and the ``knowledge`` check: their paraphrases' truth ratios against the
  audit people's, the service's check on data with paraphrases, also in the erasure gate) and erased again with the chain's approximate methods when they regressed
  (``--reerase on-regression``, the service's rule for classifiers) or after every update (``--reerase
  after-every-update``, the service's default for causal LMs since 2026-12-01)
  (:func:`continual.bench.harness.keep_erased`, timed with the update);
- 10 other base people are the tune data (WiSE-FT's coefficient) and the gate's utility set, and the 20
  never-trained people are dealt 5 / 5 / 10: ``chain-tune`` (what the chain's methods stop on), ``chain-audit``
  (the gate's membership reference) and ``report-audit`` (the reported membership reference, never used to
  select anything).

Metrics (answers scored token by token with the prompt masked; :mod:`unlearn.lm.metrics`):

- R[i][j], exact match: every answer token (and the end token) is the model's argmax given the true prefix,
  i.e. greedy decoding reproduces the answer exactly. Task 0 = the base people minus the erased and the tune
  people (20 people) in every row; task u = update u's people;
- ``new_em``: R[u][u]; ``old_em_drop``: exact match on the pooled people of tasks 0..u-1 just before update u
  (after the erasure, for update 2) minus just after it; ``old_em_drop_from_erasure``: what the erasure
  itself cost them (0 for updates without an erasure before them);
- ``erased_forget_quality``: KS-test p-value between the erased people's truth ratios under the lineage's
  model and under ``joint``'s model of the same update (trained from scratch without them); null for update
  1, which comes before the erasure;
- ``erased_mia_auc``: the loss-attack AUC of :func:`unlearn.membership.compare` (per-example answer NLL per
  token) of the erased people's answers against the report-audit people's; null for update 1 (its KS p-value
  is in ``per_update``). The same test right after the erasure, before update 2 trains anything, is in the
  erasure's evidence (``erasures[0].erased_right_after``): it tells what the erasure left from what the later
  updates brought back.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from continual.bench.erasure import erase, erase_again, recheck
from continual.bench.harness import Erasure, Keyed, LineageRun, Scenario, Stage, subject_hash
from continual.examples import join
from continual.registry import CAUSAL_LM
from unlearn.importance import TrainImportance
from unlearn.lm.fictitious import LM_FAMILIES, FictitiousSubjects, load_fictitious_subjects
from unlearn.lm.metrics import ParaphraseProbe, answer_statistics, forget_quality, truth_ratios
from unlearn.membership import compare
from unlearn.lm.model import GPTFactory, LMCache
from unlearn.registry import UnlearnRequest

BASE_PEOPLE = 40
UPDATES = 3
PEOPLE_PER_UPDATE = 10
ERASED_PEOPLE = 10
TUNE_PEOPLE = 10
# The update policy of this scenario: 40 passes over each update's 50 questions, old-task exact match every
# 10 steps, a replay buffer of 400 questions: every question the lineage ever trains on (200 base + 3 x 50)
# fits, so the buffer is the lineage's retained data, as a service replaying from its own catalog has it.
# With 200 (the base people only) the people of the updates not drawn into the reservoir lost 11-17 points
# of exact match per later update (docs/results/continual.md).
UPDATE_EPOCHS = 40
PROBE_EVERY = 10
BUFFER_CAPACITY = 400
# None: unlearn's causal-LM default chain (unlearn.chain.DEFAULT_CHAINS), the one the service runs, since
# 2026-11-30 (evening; docs/results/continual.md, "fictitious-updates"). Before it the scenario named its own,
# ("simnpo+rt", "gu+graddiff", "retrain") with gu+graddiff's alpha at 3: simnpo+rt's first Adam steps on an updated
# model failed the gate's utility check on seed 0 where gu+graddiff's projected steps passed. With unseen-kd
# first, that re-erasure passes (5 steps), and the targets are met on as many seeds. Earlier rows (before
# 2026-11-29 16:00 UTC) used ("gu+graddiff", "retrain") and a 200-question buffer.
CHAIN_METHODS: tuple[str, ...] | None = None
CHAIN_PARAMS: dict[str, dict] = {}
DATA_PEOPLE, DATA_NEVER_TRAINED = 120, 20  # not unlearn.lm.fictitious's defaults (200, 100) since issue 9
NEW_EM_MIN = 0.9
OLD_EM_DROP_MAX = 0.03
FORGET_QUALITY_MIN = 0.05
MIA_TOLERANCE = 0.1
SPLITS = {
    "r_matrix, acc, bwt, forgetting, new_em, old_em_drop, min_acc, wc_acc, stability_gap":
        "exact match on the trained questions of each task's people (recall is the skill); the tune people are "
        "left out of task 0",
    "tune (WiSE-FT coefficient) and the erasure gate's utility": f"{TUNE_PEOPLE} base people's questions",
    "erasure chain": "simnpo+rt and gu+graddiff stop on 5 never-trained people (chain-tune); the gate's "
                     "membership reference is 5 others (chain-audit), also the reference of the re-check after "
                     "each later update",
    "erased_mia_auc": "erased people vs 10 further never-trained people (report-audit)",
    "erased_forget_quality": "truth ratios of the erased people, lineage model vs joint model of the same update",
}


# scenario -> the LM family (unlearn.lm.fictitious.LM_FAMILIES) it runs on
FAMILIES = {"fictitious-updates": "fictitious-subjects", "customer-updates": "fictitious-customers"}


def keyed(data: FictitiousSubjects, subjects) -> Keyed:
    pairs = data.pairs_of(subjects)
    return Keyed(data.examples(subjects), tuple(f"fictitious-{p.subject_id}-{p.kind}" for p in pairs),
                 tuple(subject_hash(f"person-{p.subject_id}") for p in pairs))


def erased_truth_ratios(task, model, split) -> torch.Tensor:
    """Truth ratio of every erased question (paraphrase vs perturbed answers), no generation needed."""
    paraphrase = answer_statistics(task, model, split.paraphrases).normalised_probability
    perturbed = torch.stack([answer_statistics(task, model, p).normalised_probability for p in split.perturbed], dim=1)
    return truth_ratios(paraphrase, perturbed)


def fictitious_updates(seed: int, cache_dir: Path, device: torch.device,
                       name: str = "fictitious-updates") -> Scenario:
    """The scenario ``name`` (a key of :data:`FAMILIES`) for ``seed``."""
    family = LM_FAMILIES[FAMILIES[name]]
    # The data set this scenario was measured on (docs/results/continual.md): 120 people, 20 never trained.
    data = load_fictitious_subjects(cache_dir, people=DATA_PEOPLE, never_trained=DATA_NEVER_TRAINED,
                                    context=family.spec.context, schema=family.schema)
    task = data.task
    rng = np.random.default_rng(6000 + seed)
    order = [int(s) for s in rng.permutation(data.train_subjects)]
    base_people = sorted(order[:BASE_PEOPLE])
    update_people = [sorted(order[BASE_PEOPLE + PEOPLE_PER_UPDATE * i: BASE_PEOPLE + PEOPLE_PER_UPDATE * (i + 1)])
                     for i in range(UPDATES)]
    erased = sorted(int(s) for s in rng.choice(base_people, ERASED_PEOPLE, replace=False))
    tune_people = sorted(int(s) for s in rng.choice([p for p in base_people if p not in erased], TUNE_PEOPLE,
                                                    replace=False))
    holdout = [int(s) for s in rng.permutation(data.holdout_subjects)]
    chain_tune, chain_audit, report_audit = sorted(holdout[:5]), sorted(holdout[5:10]), sorted(holdout[10:])
    kept_base = [p for p in base_people if p not in erased and p not in tune_people]

    factory = GPTFactory(len(data.tokenizer), family.spec, data.tokenizer.eos_token_id)
    recipe = replace(family.recipe, seed=seed)
    base = keyed(data, base_people)
    model, _ = LMCache(cache_dir).get_or_train("continual-base", task, factory, base.examples, recipe, device)

    tune = data.examples(tune_people)
    updates = [keyed(data, people) for people in update_people]
    erased_keyed = keyed(data, erased)
    retain_after = keyed(data, [p for p in base_people if p not in erased]).join(updates[0])
    erase_request = UnlearnRequest(task=task, forget=erased_keyed.examples, retain=retain_after.examples,
                                   tune=data.examples(chain_tune),
                                   train_importance=TrainImportance(task, join(erased_keyed.examples,
                                                                               retain_after.examples)),
                                   model_factory=factory, recipe=recipe, seed=seed)

    erased_split, audit = data.split(erased), data.examples(report_audit)

    chain_audit_examples = data.examples(chain_audit)
    # The gate's knowledge check, as the service runs it on data with paraphrases: the erased people's truth
    # ratios against the chain-audit people's (the erasure gate, every re-check, every re-erasure).
    probe = ParaphraseProbe(task, erased_split, data.split(chain_audit))

    def erase_people(current):
        model, evidence = erase(current, erase_request, CAUSAL_LM, utility=tune, audit=chain_audit_examples,
                                params=CHAIN_PARAMS, methods=CHAIN_METHODS, knowledge=probe)
        # Right after the erasure, on the report-audit people (neither the method nor its gate saw them): tells
        # what the erasure left apart from what the later updates do.
        right_after = compare(task, model, erased_split.answers, audit)
        evidence["erased_right_after"] = {"mia_auc": right_after.auc, "membership_ks_p": right_after.ks_p_value}
        return model, evidence

    def people_still_erased(current) -> dict:  # the update gate's check, on the gate's audit people
        return recheck(task, current, erased_keyed.examples, chain_audit_examples, knowledge=probe)

    def erase_people_again(current, retain_now: Keyed):
        return erase_again(current, erase_request, retain_now.examples, CAUSAL_LM, utility=tune,
                           audit=chain_audit_examples, params=CHAIN_PARAMS, methods=CHAIN_METHODS, knowledge=probe)

    erasure = Erasure(f"{ERASED_PEOPLE} people", erase_people, record_ids=frozenset(erased_keyed.record_ids),
                      subject_hashes=frozenset(erased_keyed.subject_hashes), recheck=people_still_erased,
                      reerase=erase_people_again)
    stages, retain = [], base
    for u, update in enumerate(updates, start=1):
        stage = Stage(update=update, retain=retain, tune=tune)
        if u >= 2:
            stage.erased_subject_hashes = erasure.subject_hashes
            stage.erased_record_ids = erasure.record_ids
        if u == 2:
            stage.erasures_before = (erasure,)
            retain = retain_after
        stage.retain = retain
        stages.append(stage)
        retain = retain.join(update)

    def per_update(strategy: str, u: int, current) -> dict:
        if u < 2:
            return {"update": u, "after_erasure": False}
        membership = compare(task, current, erased_split.answers, audit)
        return {"update": u, "after_erasure": True,
                "erased_truth_ratios": erased_truth_ratios(task, current, erased_split).tolist(),
                "erased_mia_auc": membership.auc, "erased_membership_ks_p": membership.ks_p_value}

    eval_sets = [data.examples(kept_base)] + [update.examples for update in updates]
    notes = {"people": {"base": len(base_people), "per_update": PEOPLE_PER_UPDATE, "erased": len(erased),
                        "tune": len(tune_people), "chain_tune": len(chain_tune), "chain_audit": len(chain_audit),
                        "report_audit": len(report_audit)},
             "erased_people": erased, "metric": "exact match (greedy answer == reference, via teacher forcing)"}
    return Scenario(name, seed, task, model.to(device), base, stages, eval_sets, recipe, factory,
                    UPDATE_EPOCHS, PROBE_EVERY, BUFFER_CAPACITY, SPLITS, per_update=per_update, device=device,
                    notes=notes)


def _pooled_old(row: list[float], sizes: list[int], u: int) -> float:
    return sum(row[j] * sizes[j] for j in range(u)) / sum(sizes[:u])


def lm_metrics(run: LineageRun, joint: LineageRun, sizes: list[int]) -> dict:
    """new_em, old_em_drop, erased_forget_quality and erased_mia_auc per update (module docstring)."""
    rows, before = run.r_matrix, run.before_rows
    new_em = [rows[u][u] for u in range(1, len(rows))]
    # The update is measured from where it starts (after the erasure, for update 2); the erasure's own effect
    # on the old people is reported apart.
    old_drop = [_pooled_old(before[u - 1], sizes, u) - _pooled_old(rows[u], sizes, u) for u in range(1, len(rows))]
    erasure_drop = [_pooled_old(rows[u - 1], sizes, u) - _pooled_old(before[u - 1], sizes, u)
                    for u in range(1, len(rows))]
    quality, mia = [], []
    for ours, reference in zip(run.per_update, joint.per_update):
        if not ours["after_erasure"]:
            quality.append(None)
            mia.append(None)
            continue
        quality.append(forget_quality(ours["erased_truth_ratios"], reference["erased_truth_ratios"]))
        mia.append(ours["erased_mia_auc"])
    return {"new_em": new_em, "old_em_drop": old_drop, "erased_forget_quality": quality, "erased_mia_auc": mia,
            "old_em_drop_from_erasure": erasure_drop}


def finish(result: dict, runs: dict[str, LineageRun]) -> dict:
    sizes = [int(n) for n in result["eval_sizes"]]
    ours = lm_metrics(runs[result["strategy"]], runs["joint"], sizes)
    finetune = lm_metrics(runs["finetune"], runs["joint"], sizes)
    after = [i for i, q in enumerate(ours["erased_forget_quality"]) if q is not None]
    targets = {"new_em_at_least_0.9": all(v >= NEW_EM_MIN for v in ours["new_em"]),
               "old_em_drop_at_most_0.03": all(v <= OLD_EM_DROP_MAX for v in ours["old_em_drop"]),
               "erased_forget_quality_at_least_0.05": all(ours["erased_forget_quality"][i] >= FORGET_QUALITY_MIN
                                                          for i in after),
               "erased_mia_auc_within_0.1_of_0.5": all(abs(ours["erased_mia_auc"][i] - 0.5) <= MIA_TOLERANCE
                                                       for i in after)}
    per_update = [{k: v for k, v in row.items() if k != "erased_truth_ratios"} for row in result["per_update"]]
    joint_mia = [row.get("erased_mia_auc") for row in runs["joint"].per_update]  # never saw the erased people
    return {**ours, "finetune_lm": finetune, "joint_erased_mia_auc": joint_mia, "per_update": per_update,
            "targets": targets, "target_reached": all(targets.values())}
