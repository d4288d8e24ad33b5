"""Every benchmark scenario by name, with the targets issue 12 sets for it.

Targets are reported, never hidden: ``targets`` maps each one to a boolean and ``target_reached`` is their
conjunction (null for a scenario without targets).

- ``digits-incremental`` (issue 12): ACC within 3 points of ``joint``'s, BWT >= -0.03, stability gap <= 5
  points, seconds <= 0.2x ``joint``'s. ``digits-domain-shift`` reports the same four flags (informative:
  issue 12 sets no target for it).
- ``digits-erase-then-update``: after every update that follows the erasures, forget accuracy of the erased
  class <= 0.02 and the erased records' loss-attack AUC within 0.5 +- 0.1 (the bare band of issue 12; the
  KS p-value of the same two-sided test is reported beside it).
- ``fictitious-updates``: after every update, new-people exact match >= 0.9 and old-people exact-match drop
  <= 0.03; after every update that follows the erasure, the erased people's forget quality >= 0.05 and their
  loss-attack AUC within 0.5 +- 0.1. ``customer-updates``: the same scenario and targets on the second LM family
  (customer records, a Llama-style model; :mod:`continual.bench.fictitious`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from continual import registry
from continual.bench.harness import REERASE_POLICIES, LineageRun, compare
from continual.registry import CAUSAL_LM, CLASSIFICATION

ACC_TOLERANCE = 0.03
BWT_FLOOR = -0.03
STABILITY_GAP_MAX = 0.05
COST_MAX = 0.2
CLASS_FORGET_MAX = 0.02
MIA_TOLERANCE = 0.1


def incremental_targets(result: dict, runs: dict[str, LineageRun]) -> dict:
    targets = {"acc_within_3_points_of_joint": result["acc"] >= result["joint_acc"] - ACC_TOLERANCE,
               "bwt_at_least_minus_0.03": result["bwt"] >= BWT_FLOOR,
               "stability_gap_at_most_0.05": result["stability_gap"] is not None
               and result["stability_gap"] <= STABILITY_GAP_MAX,
               "cost_at_most_0.2x_joint": result["seconds"] <= COST_MAX * result["joint_seconds"]}
    return {"targets": targets, "target_reached": all(targets.values())}


def erase_targets(result: dict, runs: dict[str, LineageRun]) -> dict:
    later = [row for row in result["per_update"] if row["after_erasure"]]
    forget = [row["erased_class_forget_acc"] for row in later]
    mia = [row["erased_records_mia_auc"] for row in later]
    finetune_later = [row for row in runs["finetune"].per_update if row["after_erasure"]]
    joint_later = [row for row in runs["joint"].per_update if row["after_erasure"]]  # never saw the erased data
    targets = {"erased_class_forget_acc_at_most_0.02": all(v <= CLASS_FORGET_MAX for v in forget),
               "erased_records_mia_auc_within_0.1_of_0.5": all(abs(v - 0.5) <= MIA_TOLERANCE for v in mia)}
    return {"erased_class_forget_acc": forget, "erased_records_mia_auc": mia,
            "erased_records_membership_ks_p": [row["erased_records_membership_ks_p"] for row in later],
            "finetune_erased_class_forget_acc": [row["erased_class_forget_acc"] for row in finetune_later],
            "finetune_erased_records_mia_auc": [row["erased_records_mia_auc"] for row in finetune_later],
            "joint_erased_class_forget_acc": [row["erased_class_forget_acc"] for row in joint_later],
            "joint_erased_records_mia_auc": [row["erased_records_mia_auc"] for row in joint_later],
            "targets": targets, "target_reached": all(targets.values())}


def _digits(builder_name: str):
    def build(seed: int, cache_dir: Path, device: torch.device):
        from continual.bench import digits

        return getattr(digits, builder_name)(seed, cache_dir, device)

    return build


def _fictitious(name: str):
    def build(seed: int, cache_dir: Path, device: torch.device):
        from continual.bench.fictitious import fictitious_updates  # imports transformers: only these scenarios pay

        return fictitious_updates(seed, cache_dir, device, name)

    return build


def _fictitious_finish(result: dict, runs: dict[str, LineageRun]) -> dict:
    from continual.bench.fictitious import finish

    return finish(result, runs)


# name -> (task kind, builder, finish)
SCENARIOS = {
    "digits-incremental": (CLASSIFICATION, _digits("digits_incremental"), incremental_targets),
    "digits-domain-shift": (CLASSIFICATION, _digits("digits_domain_shift"), incremental_targets),
    "digits-erase-then-update": (CLASSIFICATION, _digits("digits_erase_then_update"), erase_targets),
    "fictitious-updates": (CAUSAL_LM, _fictitious("fictitious-updates"), _fictitious_finish),
    "customer-updates": (CAUSAL_LM, _fictitious("customer-updates"), _fictitious_finish),
}


def run_scenario(name: str, strategy: str, seed: int, params: dict | None, device: torch.device,
                 cache_dir: Path, buffer_capacity: int | None = None, reerase: str = "on-regression") -> dict:
    """One run; ``buffer_capacity`` overrides the scenario's replay-buffer size (a service policy, not a
    strategy parameter); ``reerase`` says when earlier erasures are erased again after an update
    (:data:`continual.bench.harness.REERASE_POLICIES`)."""
    if reerase not in REERASE_POLICIES:
        raise ValueError(f"reerase: {reerase!r} is not one of {', '.join(REERASE_POLICIES)}")
    kind, build, finish = SCENARIOS[name]
    registry.parse_config(strategy, params, kind)  # an unknown parameter or task kind fails before any work
    torch.manual_seed(seed)
    scenario = build(seed, cache_dir, device)
    if buffer_capacity is not None:
        scenario = replace(scenario, buffer_capacity=buffer_capacity)
    scenario = replace(scenario, reerase=reerase)
    return compare(scenario, strategy, params, finish)
