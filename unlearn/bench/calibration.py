"""``python -m unlearn.bench.calibration``: how often does a model that never saw the records pass the gate?

Issue 9: a true retrain must pass the gate's membership checks (:func:`unlearn.gate.judge` with the default
:class:`~unlearn.gate.GatePolicy`: KS p-value >= ``min_forget_p`` and loss-attack AUC within
``0.5 +- (mia_auc_margin + z * null sd)``) at least 99% of the time. Two measurements per family:

1. **Pseudo-forget draws** (many): the original model never trained on its ``tune`` records, so any set
   drawn from them is "erased records of a perfectly retrained model". ``--draws`` sets are drawn per
   model and size, the size of the family's ``random`` scenario (10% of the training records, drawn
   uniformly from ``tune``) and of its ``subject`` scenario (20 subjects' records among ``tune``), and each
   is judged against ``audit`` on the model's weights. The draws overlap (they come from one ``tune``
   split), so the rate is conditional on that split; it is repeated for every seed's model.
2. **Real forget sets on real retrains** (fewer, but the exact case): for every ``--retrain-seeds`` seed,
   the ``random`` and ``subject`` scenarios' forget sets judged against ``audit`` on a model retrained from
   scratch without them with the family's recipe (the harness's retrained reference).

3. **An update's re-checks** (``--lineage``): an update re-checks every earlier subject erasure of the
   lineage on one model (:func:`unlearn.gate.still_erased`, as ``service.sealed.erasure_rechecks`` runs
   it). ``--draws`` lineages of N single-subject erasures are drawn from ``tune`` per model; the rate is
   how often all N pass, once with each tested alone (the single-erasure level) and once as a family of N
   (Bonferroni, the service's rule).

Only the checks about the erased records are counted (utility and class forgetting are not about them): a
run passes ("both") when ``membership_ks`` and ``membership_auc`` pass; ``forget_accuracy`` (the one-sided
check that the forget records' labels are predicted no better than audit's) is counted beside them, and
"all" is the three together. The last stdout line is one JSON object
with every rate.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from unlearn.bench.families import get_family
from unlearn.bench.harness import split_indices
from unlearn.bench.scenarios import RANDOM_FRACTION, SUBJECT_COUNT, select_forget
from unlearn.cache import ModelCache
from unlearn.device import resolve_device
from unlearn.gate import GatePolicy, family_thresholds
from unlearn.membership import accuracy_excess, compare, membership_losses, membership_test
from unlearn.tasks import accuracy
from unlearn.training import train_from_scratch

MEMBERSHIP_CHECKS = ("membership_ks", "membership_auc")


def forget_accuracy_passes(policy: GatePolicy, task, model, forget, audit) -> bool:
    """The gate's ``forget_accuracy`` check (:func:`unlearn.gate.judge`) of ``model`` on one forget set."""
    forget_acc, audit_acc = accuracy(task, model, forget), accuracy(task, model, audit)
    return not accuracy_excess(forget_acc, len(forget), audit_acc, len(audit), policy.min_forget_p)


def _with_forget_accuracy(flags: dict[str, bool], forget_accuracy: bool) -> dict[str, bool]:
    return {**flags, "forget_accuracy": forget_accuracy, "all": flags["both"] and forget_accuracy}


def membership_passes(policy: GatePolicy, result) -> dict[str, bool]:
    """The gate's two membership checks on one :class:`unlearn.membership.MembershipResult`."""
    ks, auc = result.ks_passes(policy.min_forget_p), result.auc_passes(policy.mia_auc_margin)
    return {"membership_ks": ks, "membership_auc": auc, "both": ks and auc}


def _rate(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else float("nan")


def _retrained_case(family, selector: str, seed: int, device: torch.device, policy: GatePolicy) -> dict:
    """The real case: a scenario's forget set judged against audit on a model retrained without it."""
    records = family.load_records()
    index = split_indices(records)
    train_index = index["train"]
    selection = select_forget(f"{family.name}-{selector}", records.labels[train_index],
                              records.subject_ids[train_index], family.num_classes, seed)
    forget_mask = np.zeros(len(train_index), dtype=bool)
    forget_mask[selection.positions] = True
    forget = family.examples(records, train_index[forget_mask])
    retain = family.examples(records, train_index[~forget_mask])
    audit = family.examples(records, index["audit"])
    recipe = replace(family.recipe, seed=seed)
    model = train_from_scratch(family.task(), family.model_factory, retain, recipe, device)
    result = compare(family.task(), model, forget, audit)
    flags = _with_forget_accuracy(membership_passes(policy, result),
                                  forget_accuracy_passes(policy, family.task(), model, forget, audit))
    return {"selector": selector, "seed": seed, "forget_size": len(forget), "ks_p": result.ks_p_value,
            "auc": result.auc, "forget_acc": accuracy(family.task(), model, forget),
            "audit_acc": accuracy(family.task(), model, audit), **flags}


def _pseudo_draws(family, seed: int, draws: int, device: torch.device, policy: GatePolicy,
                  cache_dir) -> dict[str, dict[str, list[bool]]]:
    """Pseudo-forget sets drawn from ``tune``, judged against ``audit`` on the original model of ``seed``."""
    records = family.load_records()
    index = split_indices(records)
    recipe = replace(family.recipe, seed=seed)
    task = family.task()
    train = family.examples(records, index["train"])
    model = ModelCache(cache_dir).trained(family.namespace, task, family.model_factory, train, recipe, device,
                                          "original", family.architecture).model
    tune, audit = family.examples(records, index["tune"]), family.examples(records, index["audit"])
    tune_subjects = records.subject_ids[index["tune"]]
    unique_subjects = np.unique(tune_subjects)
    random_size = min(round(RANDOM_FRACTION * len(index["train"])), len(tune) // 2)
    rng = np.random.default_rng(7000 + seed)
    flags: dict[str, dict[str, list[bool]]] = {"random": {}, "subject": {}}
    for _ in range(draws):
        for kind in ("random", "subject"):
            if kind == "random":
                chosen = rng.choice(len(tune), random_size, replace=False)
            else:
                subjects = rng.choice(unique_subjects, min(SUBJECT_COUNT, len(unique_subjects)), replace=False)
                chosen = np.flatnonzero(np.isin(tune_subjects, subjects))
            forget = tune.subset(np.sort(chosen))
            result = compare(task, model, forget, audit)
            checks = _with_forget_accuracy(membership_passes(policy, result),
                                           forget_accuracy_passes(policy, task, model, forget, audit))
            for name, passed in checks.items():
                flags[kind].setdefault(name, []).append(passed)
    return flags


def _lineage_draws(family, seed: int, draws: int, sizes: list[int], device: torch.device, policy: GatePolicy,
                   cache_dir) -> dict[str, dict[str, float]]:
    """Measurement 3 (module docstring) on the original model of ``seed``: per lineage size N, how often N
    never-seen subjects all pass their membership re-checks, alone and as a family. Losses are computed once
    per record; each subject's test is :func:`unlearn.membership.membership_test` on its losses, judged as
    :func:`unlearn.gate.still_erased` judges it."""
    records = family.load_records()
    index = split_indices(records)
    task = family.task()
    model = ModelCache(cache_dir).trained(family.namespace, task, family.model_factory,
                                          family.examples(records, index["train"]),
                                          replace(family.recipe, seed=seed), device, "original",
                                          family.architecture).model
    tune_losses = membership_losses(task, model, family.examples(records, index["tune"]))
    audit_losses = membership_losses(task, model, family.examples(records, index["audit"]))
    tune_subjects = records.subject_ids[index["tune"]]
    subjects = np.unique(tune_subjects)
    rng = np.random.default_rng(9000 + seed)
    found: dict[str, dict[str, float]] = {}
    for size in sizes:
        count = min(size, len(subjects))
        min_p, z = family_thresholds(policy, count)
        alone, together = [], []
        for _ in range(draws):
            tests = [membership_test(tune_losses[tune_subjects == subject], audit_losses)
                     for subject in rng.choice(subjects, count, replace=False)]
            alone.append(all(t.passes(policy.min_forget_p, policy.mia_auc_margin) for t in tests))
            together.append(all(t.passes(min_p, policy.mia_auc_margin, z) for t in tests))
        found[str(count)] = {"lineages": draws, "all_pass_alone": _rate(alone), "all_pass_family": _rate(together)}
    return found


def calibrate_lineages(family_name: str, seeds: list[int], sizes: list[int], draws: int, device: torch.device,
                       policy: GatePolicy, cache_dir=None) -> dict:
    """Measurement 3 (module docstring) for one family, per seed's model."""
    family = get_family(family_name)
    return {"family": family_name, "draws_per_seed": draws,
            "per_seed": {str(seed): _lineage_draws(family, seed, draws, sizes, device, policy, cache_dir)
                         for seed in seeds}}


def calibrate_family(family_name: str, seeds: list[int], retrain_seeds: list[int], draws: int,
                     device: torch.device, policy: GatePolicy, cache_dir=None) -> dict:
    """Measurements 1 and 2 (module docstring) for one family."""
    family = get_family(family_name)
    pseudo: dict[str, dict[str, list[bool]]] = {"random": {}, "subject": {}}
    for seed in seeds:
        for kind, checks in _pseudo_draws(family, seed, draws, device, policy, cache_dir).items():
            for name, flags in checks.items():
                pseudo[kind].setdefault(name, []).extend(flags)
    real = [_retrained_case(family, selector, seed, device, policy)
            for seed in retrain_seeds for selector in ("random", "subject")]
    return {
        "family": family_name, "seeds": seeds, "draws_per_seed": draws, "retrain_seeds": retrain_seeds,
        "pseudo_forget": {kind: {name: _rate(flags) for name, flags in checks.items()}
                          | {"draws": len(checks.get("both", []))} for kind, checks in pseudo.items()},
        "retrained": {"passed": sum(r["both"] for r in real), "runs": len(real),
                      "ks_passed": sum(r["membership_ks"] for r in real),
                      "auc_passed": sum(r["membership_auc"] for r in real),
                      "forget_accuracy_passed": sum(r["forget_accuracy"] for r in real),
                      "all_passed": sum(r["all"] for r in real), "cases": real},
    }


def table(results: list[dict]) -> str:
    rows = ["| family | pseudo-forget draws (random-size) | both checks pass | KS pass | AUC pass | "
            "forget_accuracy pass | pseudo-forget draws (20 subjects) | both checks pass | forget_accuracy pass | "
            "real forget sets on retrained models, passed (membership / forget_accuracy / all) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rnd, sub = r["pseudo_forget"]["random"], r["pseudo_forget"]["subject"]
        real = r["retrained"]
        rows.append(f"| {r['family']} | {rnd['draws']} | {rnd['both']:.4f} | {rnd['membership_ks']:.4f} | "
                    f"{rnd['membership_auc']:.4f} | {rnd['forget_accuracy']:.4f} | {sub['draws']} | "
                    f"{sub['both']:.4f} | {sub['forget_accuracy']:.4f} | {real['passed']}/{real['runs']} / "
                    f"{real['forget_accuracy_passed']}/{real['runs']} / {real['all_passed']}/{real['runs']} |")
    return "\n".join(rows)


def lineage_table(found: list[dict]) -> str:
    rows = ["| family | seed | N subject erasures | lineages | all pass, each alone | all pass, as a family |",
            "|---|---|---|---|---|---|"]
    for family in found:
        for seed, sizes in family["per_seed"].items():
            for size, rates in sizes.items():
                rows.append(f"| {family['family']} | {seed} | {size} | {rates['lineages']} | "
                            f"{rates['all_pass_alone']:.3f} | {rates['all_pass_family']:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unlearn.bench.calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="digits,tabular,vit")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--draws", type=int, default=500, help="pseudo-forget draws per model and size")
    parser.add_argument("--retrain-seeds", default="0-9",
                        help="seeds of the real cases (random and subject forget sets, each retrained), e.g. 0-9")
    parser.add_argument("--lineage", default="",
                        help="lineage sizes N for measurement 3 alone (e.g. 10,100): how often N never-seen subjects "
                             "all pass their re-checks, alone and as a family; skips measurements 1 and 2")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    policy = GatePolicy()
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    first, _, last = args.retrain_seeds.partition("-")
    retrain_seeds = list(range(int(first), int(last or first) + 1))
    families = [f for f in args.families.split(",") if f]
    command = (f"python -m unlearn.bench.calibration --families {args.families} --seeds {args.seeds} "
               f"--draws {args.draws}")
    if args.lineage:
        sizes = [int(n) for n in args.lineage.split(",")]
        found = [calibrate_lineages(family, seeds, sizes, args.draws, device, policy) for family in families]
        _report(f"{command} --lineage {args.lineage}", policy, device, started, lineage_table(found),
                {"lineages": found})
        return 0
    results = []
    for family in families:
        results.append(calibrate_family(family, seeds, retrain_seeds, args.draws, device, policy))
        print(f"{family}: {json.dumps(results[-1]['pseudo_forget'])}", file=sys.stderr, flush=True)
    _report(f"{command} --retrain-seeds {args.retrain_seeds}", policy, device, started, table(results),
            {"families": results})
    return 0


def _report(command: str, policy: GatePolicy, device: torch.device, started: float, rendered: str,
            found: dict) -> None:
    """The command, the machine, the table, and (last line) one JSON object with every number."""
    print(f"Command: {command}")
    print(f"Policy: {policy}; machine {platform.machine()}, {torch.get_num_threads()} torch threads, device "
          f"{device}; total {time.perf_counter() - started:.0f} s\n")
    print(rendered)
    print(json.dumps({"policy": policy.__dict__, **found}))


if __name__ == "__main__":
    sys.exit(main())
