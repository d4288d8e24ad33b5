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
2. **Real forget sets on real retrains** (few, but the exact case): for every seed, the ``random`` and
   ``subject`` scenarios' forget sets judged against ``audit`` on a model retrained from scratch without
   them (:func:`unlearn.bench.harness.prepare`'s reference).

Only the membership checks are counted (utility and class forgetting are not about membership); a run
passes when both ``membership_ks`` and ``membership_auc`` pass. The last stdout line is one JSON object
with every rate.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch

from unlearn.bench.families import get_family
from unlearn.bench.harness import prepare
from unlearn.bench.scenarios import RANDOM_FRACTION, SUBJECT_COUNT
from unlearn.device import resolve_device
from unlearn.gate import GatePolicy
from unlearn.membership import compare

MEMBERSHIP_CHECKS = ("membership_ks", "membership_auc")


def membership_passes(policy: GatePolicy, result) -> dict[str, bool]:
    """The gate's two membership checks on one :class:`unlearn.membership.MembershipResult`."""
    ks, auc = result.ks_passes(policy.min_forget_p), result.auc_passes(policy.mia_auc_margin)
    return {"membership_ks": ks, "membership_auc": auc, "both": ks and auc}


def _rate(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else float("nan")


def calibrate_family(family_name: str, seeds: list[int], draws: int, device: torch.device,
                     policy: GatePolicy) -> dict:
    """Both measurements (module docstring) for one family."""
    family = get_family(family_name)
    pseudo: dict[str, dict[str, list[bool]]] = {"random": {}, "subject": {}}
    real: dict[str, list[dict]] = {"random": [], "subject": []}
    sizes: dict[str, list[int]] = {"random": [], "subject": []}
    for seed in seeds:
        for selector in ("random", "subject"):
            prepared = prepare(f"{family_name}-{selector}", seed, device=device, policy=policy)
            gate = prepared.retrained_gate
            checks = {c.name: c for c in gate.checks}
            real[selector].append({
                "seed": seed, "forget_size": len(prepared.sets["forget"]),
                "ks_p": checks["membership_ks"].value, "auc": checks["membership_auc"].value,
                "passed": all(checks[name].passed for name in MEMBERSHIP_CHECKS)})
            sizes[selector].append(len(prepared.sets["forget"]))
            # Pseudo-forget draws on the ORIGINAL model (it never trained on tune); done once per seed.
            if selector != "random":
                continue
            model, task = prepared.original, prepared.task
            tune, audit = prepared.sets["tune"], prepared.sets["audit"]
            records = family.load_records()
            subject_of = dict(zip(records.record_ids, records.subject_ids))
            subjects_in_order = np.array([subject_of[rid] for rid in prepared.record_ids["tune"]])
            rng = np.random.default_rng(7000 + seed)
            random_size = round(RANDOM_FRACTION * len(prepared.sets["train"]))
            unique_subjects = np.unique(subjects_in_order)
            for draw in range(draws):
                for kind in ("random", "subject"):
                    if kind == "random":
                        index = rng.choice(len(tune), min(random_size, len(tune) // 2), replace=False)
                    else:
                        chosen = rng.choice(unique_subjects, min(SUBJECT_COUNT, len(unique_subjects)), replace=False)
                        index = np.flatnonzero(np.isin(subjects_in_order, chosen))
                    result = compare(task, model, tune.subset(np.sort(index)), audit)
                    for name, passed in membership_passes(policy, result).items():
                        pseudo[kind].setdefault(name, []).append(passed)
    return {
        "family": family_name, "seeds": seeds, "draws_per_seed": draws,
        "pseudo_forget": {kind: {name: _rate(flags) for name, flags in checks.items()} | {
            "draws": len(checks.get("both", []))} for kind, checks in pseudo.items()},
        "retrained": {kind: {"passed": sum(r["passed"] for r in runs), "runs": len(runs), "runs_detail": runs}
                      for kind, runs in real.items()},
        "forget_sizes": sizes,
    }


def table(results: list[dict]) -> str:
    rows = ["| family | pseudo-forget draws (random-size) | both checks pass | KS pass | AUC pass | "
            "pseudo-forget draws (20 subjects) | both checks pass | real forget sets on retrained models, passed |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rnd, sub = r["pseudo_forget"]["random"], r["pseudo_forget"]["subject"]
        real = r["retrained"]
        passed = sum(v["passed"] for v in real.values())
        runs = sum(v["runs"] for v in real.values())
        rows.append(f"| {r['family']} | {rnd['draws']} | {rnd['both']:.4f} | {rnd['membership_ks']:.4f} | "
                    f"{rnd['membership_auc']:.4f} | {sub['draws']} | {sub['both']:.4f} | {passed}/{runs} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unlearn.bench.calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="digits,tabular,vit")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--draws", type=int, default=500, help="pseudo-forget draws per model and size")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    policy = GatePolicy()
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for family in [f for f in args.families.split(",") if f]:
        results.append(calibrate_family(family, seeds, args.draws, device, policy))
        print(f"{family}: {json.dumps(results[-1]['pseudo_forget'])}", file=sys.stderr, flush=True)
    print(f"Command: python -m unlearn.bench.calibration --families {args.families} --seeds {args.seeds} "
          f"--draws {args.draws}")
    print(f"Policy: {policy}; machine {platform.machine()}, {torch.get_num_threads()} torch threads, device "
          f"{device}; total {time.perf_counter() - started:.0f} s\n")
    print(table(results))
    print(json.dumps({"policy": policy.__dict__, "families": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
