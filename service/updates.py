"""Update and rectification jobs (issue 13): learn new or corrected records without forgetting, and without
re-learning anything erased.

One straight function, :func:`learn_and_register`, for both kinds (an update learns; a rectification first
erases the old values with the policy's method chain, exactly like an erasure, then learns the corrected
ones, under one certificate):

resolve -> measure before -> [rectification: unlearn the old values, erasure gate] -> learn (the continual
strategy, :mod:`continual.registry`) -> the update gate -> register; then the shared purge and audit of
:func:`service.pipeline.run_job`.

The update gate (:func:`update_gate`), on data no strategy selected on:

1. ``learned``: accuracy (causal LM: answer exact match) on the new records >= ``min_update_fit``;
2. ``utility``: utility on the audit split (causal LM: retained people) falls at most ``max_utility_drop``;
   the lowest utility measured DURING training (the stability gap) is evidence beside it;
3. erased stays erased: every earlier erasure of the lineage is checked again on its sealed verification
   set (:mod:`service.sealed`): class erasures by the class's accuracy, record and subject erasures by the
   membership test against the audit split and, on a causal LM whose sealed records carry paraphrases, the
   erasure gate's ``knowledge`` check (a re-erasure is judged with it too); a set whose key was destroyed is
   reported "not checkable", with the reason. A rectification's own old values are checked the same way, on the updated model;
4. ONNX parity and utility on the exported model.

A regression of an earlier erasure (check 3) escalates before the update is refused: the erasure's method
chain runs again on the updated model, with the regressed records as the forget set, and the gate judges the
result once more. When that repair made another sealed set fail its re-check (and nothing else failed), those
sets are erased again too, up to ``MAX_REERASE_ROUNDS`` rounds in all (:func:`escalate`); the evidence keeps
every round. With the policy's ``reerase_after_update`` (on by default for causal LMs) every sealed set
of the lineage is erased again after an update that passed the gate, even when its re-check passed (one
chain run for class erasures, one for record and subject erasures; the methods' own stop rules end at once
where the erasure holds); if the re-erased model then fails the update gate, the update keeps the model that
passed, and the evidence says so (``reverted_because``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from continual.examples import join
from service import lm_support
from service import store as db
from service.faults import fault_point
from service.audit import jsonable, sha256_hex
from service.context import ModelInfo, PipelineContext
from service.datasets import LoadedDataset
from service.domain import (
    FieldViolation,
    InvalidArgument,
    JobState,
    MethodStep,
    TaskType,
)
from service.lineage_state import load_buffer, load_state, save_pending
from service.pipeline import (
    STAGES,
    Progress,
    Scope,
    _factory,
    _recipe,
    build_scope,
    measure,
    register_version,
    unlearn,
)
from service.sealed import (
    RECHECK,
    erasure_rechecks,
    open_sealed,
    seal_erasure,
    sealed_examples,
)
from service.verification import effective_policy
from unlearn.data import ExampleSet
from unlearn.errors import InvalidParameterError, UnlearnError
from unlearn.gate import GateCheck, GateResult
from unlearn.lm.task import model_context_length
from unlearn.membership import compare
from unlearn.tasks import accuracy, accuracy_without_classes, eval_mode
from unlearn.training import TrainRecipe

DEFAULT_UPDATE_STRATEGY: dict[TaskType, MethodStep] = {
    # docs/benchmarks.md, "Continual learning": DER++ replay held ACC closest to the joint retrain at a
    # fraction of its cost on the digits sequences and kept old people on the tiny GPT.
    TaskType.CLASSIFICATION: MethodStep("replay", {"alpha": 0.3, "beta": 0.5}),
    TaskType.CAUSAL_LM: MethodStep("replay", {"alpha": 0.3, "beta": 1.0}),
}
BUFFER_CAPACITY = 500  # rows of a lineage's replay buffer (the DER++ paper's reference size)
STABILITY_EVERY_STEPS = 5  # utility measured during an update every this many optimiser steps
STABILITY_SAMPLE = 128  # records of the utility set measured during training (a fixed stride sample)
# Re-erasure rounds of one update's escalation, in all: a round whose repair makes another sealed set fail its
# re-check gets another, on those sets, up to this many; then the update is refused with every round's evidence.
MAX_REERASE_ROUNDS = 3


class UpdateRefused(UnlearnError):
    """Erased data found in an update when its job runs (an erasure accepted meanwhile): nothing is learned."""


# ------------------------------------------------------------------------------------------- strategy
def update_strategy(info: ModelInfo, requested: str | None, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The strategy of an update (the request's, else the policy's, else the task's default) and its
    parameters, validated against the strategy's config and task (INVALID_ARGUMENT naming the field)."""
    from continual import registry as strategies
    from continual.errors import UnknownStrategyError

    if requested:
        name, merged = requested, dict(params)
    else:
        step = info.policy.update_strategy or DEFAULT_UPDATE_STRATEGY[info.task_type]
        name, merged = step.name, {**step.params, **params}
    try:
        strategies.parse_config(name, merged, info.task_type.value)
    except UnknownStrategyError as error:
        raise InvalidArgument("unknown strategy", (FieldViolation("strategy", str(error)),)) from None
    except InvalidParameterError as error:
        field = "strategy" if error.field == "task" else f"strategy_params.{error.field}"
        raise InvalidArgument("invalid strategy or parameters", (FieldViolation(field, error.reason),)) from None
    return name, merged


# --------------------------------------------------------------------------------------------- the job
def learn_and_register(ctx: PipelineContext, job, request_rows, info: ModelInfo,
                       progress: Progress) -> JobState | None:
    """An update or a rectification job up to registration; None once the new version is registered."""
    rectify = job.selector == "rectify"
    staged = [row.payload[job.model_name] for row in request_rows if job.model_name in (row.payload or {})]
    strategy, strategy_params = staged[0]["strategy"], dict(staged[0]["strategy_params"])

    # ---- resolve: the base version plus the staged records ---------------------------------------------
    with ctx.store.read() as conn:
        dataset_row = db.dataset_for_model_version(conn, job.model_name, job.base_version)
    progress.stage("resolve", f"{len(staged)} staged batch(es) on dataset {dataset_row.digest[:12]}")
    base_frame = ctx.catalog.frame(ctx.catalog.local_path(dataset_row.path))
    batches = {row.request_id: ctx.catalog.frame(ctx.catalog.local_path(row.payload[job.model_name]["path"]))
               for row in request_rows if job.model_name in (row.payload or {})}
    new_frame = pd.concat(list(batches.values()), ignore_index=True)
    if new_frame["record_id"].duplicated().any() or new_frame["record_id"].isin(base_frame["record_id"]).any():
        raise UpdateRefused("two requests of this job stage the same record id (or one already in the data)")
    _refuse_erased_now(ctx, info, new_frame)
    # A causal LM's new records may carry paraphrase columns (service.datasets.PROBE_COLUMNS): the base data's
    # rows are null in them when only the update has them, the update's rows null when only the base has them.
    columns = [*base_frame.columns, *(c for c in new_frame.columns if c not in base_frame.columns)]
    combined = pd.concat([base_frame.reindex(columns=columns), new_frame.reindex(columns=columns)],
                         ignore_index=True)
    data = ctx.catalog.from_frame(combined, dataset_row.path, dataset_row.digest)
    new_rows = np.isin(data.record_ids, new_frame["record_id"].astype(str).to_numpy())
    learn = new_rows & data.split_mask("train")
    matched = ({row.request_id: np.isin(data.record_hashes, row.record_hashes) & ~new_rows for row in request_rows}
               if rectify else {})
    scope = build_scope(ctx, job, info, data, dataset_row, matched)
    scope.retain &= ~new_rows  # the current training data: what the model knows before the update
    scope.resolution["dataset_records"] = len(base_frame)  # the version the update starts from
    for row in request_rows:  # what each request brings (its certificate's "records")
        mine = new_rows & np.isin(data.record_ids, batches[row.request_id]["record_id"].astype(str).to_numpy())
        entry = scope.resolution["requests"].setdefault(row.request_id, {"matched": 0, "erased_from_training": 0})
        entry.update(learned=int((mine & learn).sum()),
                     learned_record_ids_sha256=sha256_hex("\n".join(sorted(data.record_ids[mine].astype(str)))))
        if not rectify:
            entry.update(matched=int(mine.sum()), record_ids_sha256=entry["learned_record_ids_sha256"])
    with ctx.store.write() as conn:
        db.update_job(conn, job.job_id, records=int(new_rows.sum() + scope.erase.sum()))
    fault_point("stage:resolve:inside")  # crash tests only: staged records resolved, nothing measured yet

    # ---- measure before -----------------------------------------------------------------------------
    measure(ctx, job, info, scope, progress)
    if info.task_type is TaskType.CAUSAL_LM:  # paraphrases and wrong answers too must fit (the knowledge check)
        problems = lm_support.record_violations(scope.task, model_context_length(scope.base_model), new_frame)
        if problems:
            raise UpdateRefused("records of this update do not fit the model's context: "
                                + "; ".join(p.description for p in problems))
    policy = effective_policy(info.policy, dict(job.policy_overrides))
    model, record = scope.base_model, {"attempts": []}

    # ---- rectification: erase the old values first (the erasure path, its gate and its chain) -----------
    if rectify and scope.forget.any():
        model, record, outcome = unlearn(ctx, job, info, scope, progress, policy)
        if outcome is not None and not outcome.passed:
            # No method of the chain forgot the old values alone within the utility tolerance (on a causal LM,
            # erasing one fact of a person disturbs that person's other facts, which are kept). The corrected
            # values are then learned over the old ones from the base model, and the update gate's
            # rectified_membership checks (the erasure gate's two-sided test against the audit split) decide
            # whether the old values are forgotten: the job is refused when they are not.
            progress.event(STAGES["verify"][1], "no erasure method passed alone; learning the corrected values "
                                                "over the old ones, the update gate checks they are forgotten")
            model, record = scope.base_model, {**record, "erasure_alone_passed": False}
    erasure = {k: record[k] for k in ("method", "attempts", "verification", "label", "erasure_alone_passed")
               if k in record}

    # ---- learn: the continual strategy from the (post-erasure) current version ---------------------------
    progress.stage("apply", f"learning {int(learn.sum())} record(s) with {strategy}")
    result, stability = _learn(ctx, job, info, scope, model, learn, strategy, strategy_params, progress)
    fault_point("stage:apply:inside")  # crash tests only: the strategy returned, its result not yet judged

    # ---- verify: the update gate ----------------------------------------------------------------------
    progress.stage("verify", "new records learned, utility kept, earlier erasures still hold, ONNX export")
    gate = update_gate(ctx, job, info, scope, result.model, learn, policy, stability)
    # Counted when found, whether the escalation below repairs them or the update is refused.
    ctx.metrics.update_regressions.inc(sum(1 for name in gate.failures if name.startswith(f"{RECHECK}[")))
    result, gate, escalation = escalate(
        result, gate, policy.reerases_after_update(info.task_type),
        reerase=lambda model, failed, everything: _reerase(ctx, job, info, scope, model, learn, failed, policy,
                                                           progress, everything=everything),
        judge=lambda model: update_gate(ctx, job, info, scope, model, learn, policy, stability))
    update_record = {"strategy": strategy, "params": strategy_params, "records_learned": int(learn.sum()),
                     "details": _plain(result.details), "target_reached": result.target_reached,
                     "message": result.message, "stability": stability, "escalation": escalation}
    record = {**record, "label": "rectification" if rectify else "update", "update": update_record,
              "erasure": erasure or None, "verification": gate.as_dict(),
              "method": {"name": strategy, "params": strategy_params, "details": update_record["details"],
                         "target_reached": result.target_reached, "message": result.message}}
    if not gate.passed:
        with ctx.store.write() as conn:
            db.update_job(conn, job.job_id, evidence=jsonable(record))
        _refuse(ctx, job, request_rows, record, gate, progress)
        return JobState.REJECTED_BY_VERIFICATION

    # ---- register: base (less the old values) plus the new records, then the model version -------------
    if scope.forget.any():  # a rectification's old values are sealed like any erasure's (service.sealed)
        record["sealed"] = seal_erasure(ctx, job, request_rows, data, scope.matched, scope.forget, policy, combined)
    frame = combined[~scope.erase]
    record["staged"] = staged
    save_pending(ctx, job.model_name, job.job_id, result.buffer, result.state)
    register_version(ctx, job, info, scope, result.model, record, frame, progress)
    return None


def _learn(ctx: PipelineContext, job, info: ModelInfo, scope: Scope, model: nn.Module, learn: np.ndarray,
           strategy: str, params: dict[str, Any], progress: Progress):
    """Run the continual strategy; returns its result and the utility measured during training."""
    from continual import registry as strategies
    from continual.registry import UpdateRequest

    with ctx.store.read() as conn:
        erased_subjects, pending_classes = db.erasure_selectors(conn, job.model_name)
    utility = scope.examples(scope.utility_mask)
    sample = utility.subset(np.linspace(0, len(utility) - 1, min(len(utility), STABILITY_SAMPLE)).astype(int))
    monitor = _UtilityMonitor(scope.task, sample, STABILITY_EVERY_STEPS)
    buffer = load_buffer(ctx, job.model_name) or _initial_buffer(scope, model)
    keys = list(buffer.record_ids) + list(scope.data.record_hashes[learn])
    with ctx.store.read() as conn:
        erased_records = db.tombstoned(conn, keys)
    request = UpdateRequest(
        task=scope.task, update=scope.examples(learn),
        update_record_ids=tuple(scope.data.record_hashes[learn].astype(str)),  # keyed hashes, never clear ids
        update_subject_hashes=tuple(scope.data.subject_hashes[learn].astype(str)),
        recipe=_recipe(info.training) or TrainRecipe(), retain=scope.examples(scope.retain),
        # What strategies may select on: never-trained records of a classifier; a causal LM's skill is
        # recall of trained facts, so a sample of retained questions (the gate measures on other ones).
        tune=scope.examples(scope.tune if info.task_type is TaskType.CLASSIFICATION
                            else _sample(scope.retain & ~scope.utility_mask, 256)),
        buffer=buffer, state=load_state(ctx, job.model_name), model_factory=_factory(info.training),
        erased_subject_hashes=frozenset(erased_subjects), erased_record_ids=frozenset(erased_records),
        erased_classes=frozenset(scope.lineage_classes) | frozenset(pending_classes), seed=0,
        progress=progress.method_progress, monitor=monitor)
    result = strategies.run(strategy, model, request, params)
    stability = {"utility_before": scope.utility_before, "min_utility_during": monitor.minimum,
                 "checks_during": monitor.count, "every_steps": STABILITY_EVERY_STEPS, "sample": len(sample),
                 "gap": None if monitor.minimum is None or scope.utility_before is None
                 else scope.utility_before - monitor.minimum}
    return result, stability


class _UtilityMonitor:
    """Utility on a fixed sample every ``every_steps`` optimiser steps (the stability gap, De Lange et al.)."""

    def __init__(self, task, sample, every_steps: int):
        self.task, self.sample, self.every_steps = task, sample, every_steps
        self.minimum: float | None = None
        self.count = 0

    def __call__(self, model: nn.Module, step: int) -> None:
        value = accuracy(self.task, model, self.sample)
        self.minimum = value if self.minimum is None else min(self.minimum, value)
        self.count += 1


def _initial_buffer(scope: Scope, model: nn.Module):
    """No buffer kept for this lineage here: one from its CURRENT training data (no erased record can be in
    it), logits from the current model, keyed by record hash."""
    from continual.buffer import ReplayBuffer

    buffer = ReplayBuffer(BUFFER_CAPACITY, seed=0)
    rows = _sample(scope.retain, BUFFER_CAPACITY)
    if rows.any():
        examples = scope.examples(rows)
        device = next(model.parameters()).device
        with eval_mode(model), torch.no_grad():
            logits = torch.cat([scope.task.outputs(model, batch).cpu()
                                for batch in examples.batches(256, device)])
        buffer.offer(examples, logits, list(scope.data.record_hashes[rows].astype(str)),
                     list(scope.data.subject_hashes[rows].astype(str)))
    return buffer


def _sample(mask: np.ndarray, count: int) -> np.ndarray:
    """At most ``count`` records of ``mask``, a fixed stride (deterministic)."""
    rows = np.flatnonzero(mask)
    if len(rows) > count:
        rows = rows[np.linspace(0, len(rows) - 1, count).astype(int)]
    out = np.zeros_like(mask)
    out[rows] = True
    return out


# ------------------------------------------------------------------------------------------- the gate
def _base_utility(scope: Scope, utility: ExampleSet) -> float:
    """The update gate's utility reference: the base version's accuracy on ``utility`` (measured before)."""
    if scope.utility_before is not None:
        return scope.utility_before
    return accuracy(scope.task, scope.base_model, utility)


def update_gate(ctx: PipelineContext, job, info: ModelInfo, scope: Scope, after: nn.Module, learn: np.ndarray,
                policy, stability: dict[str, Any]) -> GateResult:
    """The update gate (module docstring). ONNX checks run only when the others passed."""

    task = scope.task
    learned_before = accuracy(task, scope.base_model, scope.examples(learn))
    learned_after = accuracy(task, after, scope.examples(learn))
    utility, audit = scope.examples(scope.utility_mask), scope.examples(scope.audit)
    utility_before = _base_utility(scope, utility)
    utility_after = accuracy(task, after, utility)
    floor = utility_before - policy.max_utility_drop
    checks = [
        GateCheck("learned", learned_after, policy.min_update_fit, learned_after >= policy.min_update_fit - 1e-12,
                  "accuracy (causal LM: answer exact match) on the new records >= min_update_fit"),
        GateCheck("utility", utility_after, floor, utility_after >= floor - 1e-12,
                  "utility accuracy after >= before - max_utility_drop (audit split; causal LM: retained people)"),
    ]
    if scope.forget.any():  # a rectification: the old values stay forgotten after the corrected ones are learned
        test = compare(task, after, scope.examples(scope.forget), audit)
        slack = test.auc_slack(policy.mia_auc_margin)
        checks += [GateCheck("rectified_membership_ks", test.ks_p_value, policy.min_forget_p,
                             test.ks_passes(policy.min_forget_p), "old values vs audit: KS p-value >= min_forget_p"),
                   GateCheck("rectified_membership_auc", test.auc, slack, test.auc_passes(policy.mia_auc_margin),
                             "old values vs audit: loss-attack AUC within 0.5 +- the margin and the null's noise")]
    opened, unavailable = open_sealed(ctx, job.model_name)
    rechecks = erasure_rechecks(ctx.catalog, scope.support, task, after, audit, policy, opened, unavailable,
                                lambda erased: _sealed_probe(scope, after, erased))
    checks += rechecks.checks
    evidence = {"utility_acc_before": utility_before, "utility_acc_after": utility_after,
                "learned_acc_before": learned_before, "learned_acc_after": learned_after,
                "records_learned": int(learn.sum()), "stability": stability,
                "bwt_utility": utility_after - utility_before,
                "sizes": {"learned": int(learn.sum()), "utility": len(utility), "audit": len(audit)},
                "policy": {"max_utility_drop": policy.max_utility_drop, "min_update_fit": policy.min_update_fit,
                           "min_forget_p": policy.min_forget_p, "mia_auc_margin": policy.mia_auc_margin,
                           "class_forget_max_accuracy": policy.class_forget_max_accuracy,
                           "onnx_tolerance": policy.onnx_tolerance,
                           "reerase_after_update": policy.reerases_after_update(info.task_type)},
                "task_type": scope.support.task_type.value, **rechecks.evidence}
    if any(check.passed is False for check in checks):
        evidence["onnx"] = {"skipped": "the update's other checks failed; the model was not exported"}
        return GateResult(tuple(checks), evidence)
    fault_point("stage:verify:inside")  # crash tests only: the update's checks done, the ONNX export not yet
    onnx_path = ctx.settings.cache_dir / "onnx" / f"{job.job_id}.onnx"
    onnx = scope.support.onnx_evidence(after, audit, utility, onnx_path)
    checks += [GateCheck("onnx_parity", onnx["max_abs_diff"], policy.onnx_tolerance,
                         onnx["max_abs_diff"] <= policy.onnx_tolerance, "max |torch - onnxruntime| on a fixed batch"),
               GateCheck("onnx_utility", onnx["utility_acc"], floor, onnx["utility_acc"] >= floor - 1e-12,
                         "utility accuracy of the ONNX model >= before - max_utility_drop")]
    return GateResult(tuple(checks), {**evidence, "onnx": onnx})


def _sealed_probe(scope: Scope, model: nn.Module, erased: LoadedDataset) -> Any:
    """The ``knowledge`` probe of sealed records (a re-check's or a re-erasure's): their paraphrases (when
    their dataset had them) against the current audit records' (None: the gate reports the check as not
    checkable)."""
    return scope.support.knowledge(model, erased, np.ones(len(erased), dtype=bool), scope.data, scope.audit)


def escalate(result, gate: GateResult, reerase_after_update: bool, reerase, judge):
    """The escalation of an update whose only failures are earlier erasures' re-checks (or, with the policy's
    ``reerase_after_update``, of every update that passed): re-erase, judge again, and when that repair made
    ANOTHER sealed set fail its re-check (and nothing else failed), re-erase those too, up to
    :data:`MAX_REERASE_ROUNDS` rounds in all. ``reerase(model, gate, everything)`` returns (the re-erased model
    or None, its evidence or None); ``judge(model)`` the update gate on a model. Returns the result and gate the
    update goes on with, and the evidence (None when nothing was re-erased): the first round's as before
    (``trigger``, ``first_gate``, ``method``, ``repaired``), every further round in ``further_rounds`` with the
    gate that called for it, and ``rounds``. A policy re-erasure that ends failing the gate reverts to the
    update that passed without it (``reverted_because``)."""
    trigger = reerase_trigger(gate.failures, reerase_after_update)
    if trigger is None:
        return result, gate, None
    first, escalation, everything = (result, gate), None, reerase_after_update
    for round_number in range(1, MAX_REERASE_ROUNDS + 1):
        erased_again, record = reerase(result.model, gate, everything)
        if record is None:  # the policy asked, but the lineage has no sealed set
            break
        if escalation is None:
            escalation = {"trigger": trigger, "first_gate": gate.as_dict(), "method": record,
                          "repaired": erased_again is not None, "rounds": 1, "further_rounds": []}
        else:
            escalation["further_rounds"].append({"gate_before": gate.as_dict(), "method": record,
                                                 "repaired": erased_again is not None})
            escalation.update(rounds=round_number, repaired=erased_again is not None)
        # A re-erasure that found every erasure holding returns the same model: its gate would be the same.
        if erased_again is None or erased_again is result.model:
            break
        result = replace(result, model=erased_again)
        gate = judge(result.model)
        if gate.passed or reerase_trigger(gate.failures, False) != "regression":
            break  # passed, or a failure no re-erasure can repair
        everything = False  # the next round re-erases the sets this repair made fail
    if escalation is not None and not gate.passed:
        escalation["repaired"] = False
        if trigger == "policy":  # the update passed without it: keep that one
            escalation["reverted_because"] = list(gate.failures)
            result, gate = first
    return result, gate, escalation


def reerase_trigger(failures: tuple[str, ...], reerase_after_update: bool) -> str | None:
    """Why the update job erases earlier erasures again: ``"regression"`` (re-checks failed, and nothing else
    did), ``"policy"`` (the policy's ``reerase_after_update``, nothing failed), or None: no re-erasure (another
    check failed, which a re-erasure cannot repair, so the update is refused; or nothing to do)."""
    if not all(name.startswith(f"{RECHECK}[") for name in failures):
        return None
    if failures:
        return "regression"
    return "policy" if reerase_after_update else None


def _reerase(ctx: PipelineContext, job, info: ModelInfo, scope: Scope, model: nn.Module, learn: np.ndarray,
             gate: GateResult, policy, progress: Progress, everything: bool = False):
    """Escalation of a regressed earlier erasure: its chain again, on the updated model, the regressed sealed
    records as the forget set (with ``everything``, the policy's ``reerase_after_update``: every sealed set of
    the lineage that can be opened). Returns (the re-erased model or None when no method of the chain passed,
    the evidence: which sets, every attempt and why it failed); the evidence is None when ``everything``
    found no sealed set (nothing was erased on this lineage, or every key is destroyed)."""
    from unlearn.chain import run_chain
    from unlearn.gate import judge
    from unlearn.importance import TrainImportance
    from unlearn.registry import UnlearnRequest

    regressed = {name.removeprefix(f"{RECHECK}[").removesuffix("]") for name in gate.failures
                 if name.startswith(f"{RECHECK}[")}
    opened, _ = open_sealed(ctx, job.model_name)
    sets = [s for s in opened if everything or s.request_id in regressed]
    if not sets:
        if everything and not regressed:
            return None, None
        return None, {"sets": sorted(regressed), "attempts": [], "note": "no sealed set of them could be opened"}
    regressed |= {s.request_id for s in sets}
    why = "the policy re-erases after every update" if everything else "an earlier erasure regressed"
    progress.event(STAGES["verify"][0], f"{why} ({', '.join(sorted(regressed))}); erasing again")
    chain = [(step.name, dict(step.params)) for step in info.policy.method_chain
             if not _exact(step.name)]  # an exact retrain would also drop what the update just learned
    retain = scope.examples(scope.retain | learn)  # what the updated model should keep: old data and new
    utility = scope.examples(scope.utility_mask)  # without the lineage's erased classes, so without the sets'
    base_utility = _base_utility(scope, utility)
    groups, current = [], model
    # Class erasures and record/subject erasures are judged differently (forget accuracy vs membership): one
    # chain run per kind, the second from the first's result.
    for kind in sorted({bool(s.classes) for s in sets}, reverse=True):
        group = [s for s in sets if bool(s.classes) == kind]
        forget = sealed_examples(ctx.catalog, scope.support, current, group)
        classes = tuple(sorted({c for s in group for c in (s.classes or ())})) or None
        request = UnlearnRequest(task=scope.task, forget=forget, retain=retain, tune=scope.examples(scope.tune),
                                 # I_D of the UPDATED model over everything it trained on; in memory only
                                 train_importance=TrainImportance(scope.task, join(retain, forget)),
                                 model_factory=_factory(info.training), recipe=_recipe(info.training),
                                 forget_classes=classes, seed=0)
        before = current
        # An attempt keeps the utility of the model it starts from AND the floor the update gate will apply
        # (the base version's): judged from the higher of the two, a result the chain accepts is not then
        # refused by the update gate for utility while a later method of the chain could have passed.
        own = (accuracy_without_classes(scope.task, before, utility, classes) if classes
               else accuracy(scope.task, before, utility))  # as the judge measures it
        reference = max(own, base_utility)
        knowledge = None if classes else _sealed_probe(
            scope, before, ctx.catalog.from_frame(pd.concat([s.frame for s in group], ignore_index=True)))
        outcome = run_chain(before, request, chain,
                            lambda result, before=before, forget=forget, classes=classes, knowledge=knowledge,
                            reference=reference:
                            judge(scope.task, before, result.model, forget, utility, scope.examples(scope.audit),
                                  _gate_policy(policy), classes, utility_before=reference, knowledge=knowledge))
        groups.append({"sets": sorted(s.request_id for s in group), "utility_reference": reference,
                       "method": outcome.chosen.method if outcome.passed else None,
                       "attempts": [a.summary() for a in outcome.attempts]})
        if not outcome.passed:
            current = None
            break
        current = outcome.result.model
    evidence = {"sets": sorted(regressed), "chain": [name for name, _ in chain],
                "method": groups[-1]["method"], "attempts": [a for g in groups for a in g["attempts"]],
                "groups": groups}
    return current, evidence


def _exact(method: str) -> bool:
    from unlearn import registry

    return registry.get(method).exact


def _gate_policy(policy):
    from service.verification import gate_policy

    return gate_policy(policy)


def _refuse(ctx: PipelineContext, job, request_rows, record: dict[str, Any], gate: GateResult,
            progress: Progress) -> None:
    """The update gate refused the result: nothing registered, the requests stay pending, evidence kept."""
    from service.audit import canonical_json
    from service.domain import EventKind

    progress.finish()
    request_ids = tuple(r.request_id for r in request_rows)
    message = (f"update verification failed ({', '.join(gate.failures)}); nothing was registered and the "
               "requests stay pending")
    with ctx.store.write() as conn:
        db.update_job(conn, job.job_id, state=JobState.REJECTED_BY_VERIFICATION.value, stage="verify",
                      progress=1.0, message=message)
        db.add_event(conn, job.job_id, request_ids, EventKind.TERMINAL.value,
                     JobState.REJECTED_BY_VERIFICATION.value, "verify", 1.0, message)
        ctx.audit.append(conn, "job_rejected", {"job_id": job.job_id, "model_name": job.model_name,
                                                "job_kind": job.selector, "request_ids": list(request_ids),
                                                "failures": list(gate.failures),
                                                "evidence_sha256": sha256_hex(canonical_json(jsonable(record)))})
    ctx.metrics.updates.labels(job.selector, "rejected").inc()


def _refuse_erased_now(ctx: PipelineContext, info: ModelInfo, frame: pd.DataFrame) -> None:
    """An erasure accepted after the update (or a class erased meanwhile) wins: nothing erased is learned."""
    with ctx.store.read() as conn:
        subjects, classes = db.erasure_selectors(conn, info.name)
        dead = db.tombstoned(conn, [ctx.catalog.tombstone(r) for r in frame["record_id"].astype(str)])
    classes |= set(ctx.registry.erased_classes(info.name, info.serving_version))
    if any(ctx.catalog.subject_hash(s) in subjects for s in frame["subject_id"].astype(str)) or dead or (
            info.task_type is TaskType.CLASSIFICATION and frame["label"].isin(list(classes)).any()):
        raise UpdateRefused("records of this update were erased after it was accepted (an erased subject, record "
                            "or class); nothing is learned: close the request or send the update again without "
                            "them")


def _plain(details: dict[str, Any]) -> dict[str, Any]:
    return jsonable({k: v for k, v in details.items() if not isinstance(v, (torch.Tensor, np.ndarray))
                     or np.asarray(v).size <= 64})
