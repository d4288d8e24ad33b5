"""``python -m unlearn.bench --method NAME --scenario NAME --seed N [--json]``

``NAME`` is a registered method or ``auto`` (the default escalation chain of the scenario's task, judged
by the gate). Scenarios: ``<family>-<class|random|subject>`` for the families ``digits``, ``tabular`` and
``vit`` (:mod:`unlearn.bench.harness`), for the held-out families of :mod:`unlearn.bench.heldout` (``wine``,
``cancer``, ...), and for a family of your own, ``--family module:function`` (``function()`` returns an
:class:`unlearn.bench.families.Family`: a model factory, a class count, records with subject ids, and the
recipe; :func:`unlearn.bench.families.import_family`); plus ``digits-vit-continual``, ``fictitious-subjects``,
``fictitious-customers`` and ``fictitious-patients`` (held out), and ``<name>-subject`` for an LM family of your
own (``--family`` naming a function that returns an :class:`unlearn.lm.fictitious.LMFamily`). A
``<family>-class`` scenario erases ``--forget-class``: 3 on the three families, 1 on held-out families and yours
(every family has a class 1).

With ``--json`` the last line of stdout is one JSON object: the run's result, or for a sweep
(``--seeds``, ``--all-classes``) a summary holding every result and the means.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

from unlearn import registry
from unlearn.bench.families import Family, get_family, import_family
from unlearn.bench.harness import AUTO, TRAININGS, run_benchmark
from unlearn.bench.heldout import HELDOUT_FAMILIES, HELDOUT_FORGET_CLASS
from unlearn.bench.lm_subjects import SCENARIOS as LM_SCENARIOS, run_lm_subjects
from unlearn.bench.scenarios import DEFAULT_FORGET_CLASS, SCENARIOS, parse_scenario
from unlearn.bench.vit_continual import run_vit_continual
from unlearn.device import resolve_device
from unlearn.errors import UnlearnError
from unlearn.lm.fictitious import LMFamily

# Scenarios with their own runner (same signature as run_benchmark); the digits classifier ones use it.
RUNNERS: dict = {"digits-vit-continual": run_vit_continual, **dict.fromkeys(LM_SCENARIOS, run_lm_subjects)}

SUMMARY_KEYS = ("avg_gap", "unlearn_seconds", "retrain_seconds", "speedup", "cost_vs_fwd_bwd")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unlearn.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, help=f"{AUTO} or one of: {', '.join(registry.names())}")
    parser.add_argument("--scenario", required=True,
                        help=f"one of {', '.join(SCENARIOS + tuple(RUNNERS))}; <family>-<class|random|subject> for "
                             f"the held-out families ({', '.join(HELDOUT_FAMILIES)}) and --family's")
    parser.add_argument("--family", help="module:function returning an unlearn.bench.families.Family: run the "
                                         "harness on your own model and data (scenario <its name>-<selector>); "
                                         "or an unlearn.lm.fictitious.LMFamily: the LM benchmark on people of "
                                         "your own (scenario <its schema's name>-subject)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", help="comma-separated seeds to sweep, e.g. 0,1,2")
    parser.add_argument("--forget-class", type=int,
                        help=f"the class <family>-class erases (default {DEFAULT_FORGET_CLASS}; "
                             f"{HELDOUT_FORGET_CLASS} on held-out families and --family's)")
    parser.add_argument("--all-classes", action="store_true", help="sweep every forget class (<family>-class)")
    parser.add_argument("--params", default="{}", help="method parameters as a JSON object")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--json", action="store_true", help="print JSON lines; the last is the result")
    parser.add_argument("--train", default="plain", choices=TRAININGS,
                        help="original/retrained models: plain recipe, or gr = with IAU's gradient restriction")
    parser.add_argument("--cache-dir", help="model cache (default LETHE_CACHE_DIR or .cache/lethe)")
    args = parser.parse_args(argv)

    try:
        params = json.loads(args.params)
        device = resolve_device(args.device)
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
        family = other_family(args.scenario, args.family)
        if family is None and args.scenario not in SCENARIOS + tuple(RUNNERS):
            raise ValueError(f"unknown scenario {args.scenario!r}; known: {', '.join(SCENARIOS + tuple(RUNNERS))}, "
                             f"<family>-<class|random|subject> for {', '.join(HELDOUT_FAMILIES)}, or --family")
        if args.all_classes:
            if args.scenario in RUNNERS or not args.scenario.endswith("-class"):
                raise ValueError("--all-classes needs a <family>-class scenario")
            classes = list(range((family or get_family(parse_scenario(args.scenario)[0])).num_classes))
        elif args.forget_class is not None:
            classes = [args.forget_class]
        else:
            classes = [DEFAULT_FORGET_CLASS if family is None else HELDOUT_FORGET_CLASS]
        results = []
        for seed in seeds:
            for forget_class in classes:
                if (args.scenario in RUNNERS or isinstance(family, LMFamily)) and args.train != "plain":
                    raise ValueError(f"--train {args.train} is only available for the digits scenarios")
                if isinstance(family, LMFamily):
                    runner = functools.partial(run_lm_subjects, family=family)
                else:
                    runner = RUNNERS.get(args.scenario) or functools.partial(run_benchmark, training=args.train,
                                                                             family=family)
                cache = {"cache_dir": Path(args.cache_dir)} if args.cache_dir else {}
                result = runner(args.method, args.scenario, seed, forget_class, params, device, **cache)
                results.append(result)
                print(json.dumps(result) if args.json else _human(result), flush=True)
    except (UnlearnError, json.JSONDecodeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if len(results) > 1:
        summary = {
            "scenario": args.scenario, "method": args.method, "runs": len(results),
            "mean": {k: statistics.fmean(r[k] for r in results) for k in SUMMARY_KEYS},
            "mean_unlearned": {k: statistics.fmean(r["unlearned"][k] for r in results) for k in results[0]["unlearned"]},
            "mean_original": {k: statistics.fmean(r["original"][k] for r in results) for k in results[0]["original"]},
            "mean_retrained": {k: statistics.fmean(r["retrained"][k] for r in results) for k in results[0]["retrained"]},
            "results": results,
        }
        print(json.dumps(summary) if args.json else _human_summary(summary))
    return 0


def other_family(scenario: str, target: str | None) -> Family | LMFamily | None:
    """``--family``'s family, else the held-out family ``scenario`` names, else None (a built-in scenario)."""
    if target:
        return import_family(target)
    name = scenario.rpartition("-")[0]
    return HELDOUT_FAMILIES[name]() if name in HELDOUT_FAMILIES else None


def _human(result: dict) -> str:
    rows = [f"{result['method']} on {result['scenario']} seed {result['seed']}"
            + (f" class {result['forget_class']}" if result["forget_class"] is not None else "")]
    for name in ("original", "retrained", "unlearned"):
        metrics = result[name]
        rows.append(f"  {name:10s} " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    rows.append(f"  avg_gap={result['avg_gap']:.4f} unlearn={result['unlearn_seconds']:.3f}s "
                f"retrain={result['retrain_seconds']:.2f}s speedup={result['speedup']:.1f} "
                f"cost_vs_fwd_bwd={result['cost_vs_fwd_bwd']:.2f} target_reached={result['target_reached']}")
    if "gate" in result:
        rows.append(f"  gate passed={result['gate']['passed']} failures={result['gate']['failures']}")
    for attempt in result.get("attempts", []):
        rows.append(f"  attempt {attempt['method']}: target_reached={attempt['target_reached']} "
                    f"gate_passed={attempt['gate_passed']} {attempt['error'] or ''}")
    return "\n".join(rows)


def _human_summary(summary: dict) -> str:
    mean = summary["mean"]
    return (f"mean over {summary['runs']} runs: " + "  ".join(f"{k}={v:.4f}" for k, v in mean.items()))


if __name__ == "__main__":
    sys.exit(main())
