"""``python -m unlearn.bench.sweep``: the benchmark table of docs/benchmarks.md (what ``make bench`` runs).

Runs every listed method on every listed scenario and seed through :func:`unlearn.bench.run_benchmark`
(the same code as ``python -m unlearn.bench``), then prints Markdown: one row per (scenario, method) with
means over seeds, and the class-erasure robustness sweep (every class x every seed) for the SSD family.
Raw results go to a JSON-lines file so a table can be rebuilt without rerunning.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from unlearn import registry
from unlearn.bench import SCENARIOS, run_benchmark
from unlearn.device import resolve_device

DEFAULT_METHODS = ("retrain", "finetune", "ssd", "lfssd", "assd", "ssd-auto", "ga", "graddiff", "npo", "iau",
                   "gu+ga", "gu+graddiff", "gu+npo", "gu+iau")
ROBUSTNESS_METHODS = ("ssd", "ssd-auto")
COLUMNS = ("forget_acc", "retain_acc", "test_acc", "test_retain_acc", "mia")


def table(results: list[dict]) -> str:
    rows = ["| scenario | method | forget | retain | test | test (kept classes) | MIA | avg_gap | unlearn s | "
            "speed-up | cost vs fwd+bwd |", "|" + "---|" * 11]
    groups: dict[tuple[str, str], list[dict]] = {}
    for result in results:
        groups.setdefault((result["scenario"], result["method"]), []).append(result)
    for (scenario, method), runs in groups.items():
        def mean(get):
            return statistics.fmean(get(r) for r in runs)
        cells = [f"{mean(lambda r, k=k: r['unlearned'][k]):.3f}" for k in COLUMNS]
        rows.append(f"| {scenario} | {method} | " + " | ".join(cells) +
                    f" | {mean(lambda r: r['avg_gap']):.4f} | {mean(lambda r: r['unlearn_seconds']):.3f} | "
                    f"{mean(lambda r: r['speedup']):.1f} | {mean(lambda r: r['cost_vs_fwd_bwd']):.2f} |")
    references = {}
    for result in results:
        references.setdefault(result["scenario"], []).append(result)
    for scenario, runs in references.items():
        for name in ("original", "retrained"):
            cells = [f"{statistics.fmean(r[name][k] for r in runs):.3f}" for k in COLUMNS]
            rows.append(f"| {scenario} | *{name} model* | " + " | ".join(cells) + " | | | | |")
    return "\n".join(rows)


def robustness(results: list[dict], tolerance: float = 0.02) -> str:
    rows = ["| method | runs | kept-class test acc drop > 2 pts | forget acc > 0.02 | target not reached "
            "(reported) | worst drop | mean avg_gap |", "|" + "---|" * 7]
    for method in sorted({r["method"] for r in results}):
        runs = [r for r in results if r["method"] == method]
        drops = [r["original"]["test_retain_acc"] - r["unlearned"]["test_retain_acc"] for r in runs]
        rows.append(
            f"| {method} | {len(runs)} | {sum(d > tolerance for d in drops)} | "
            f"{sum(r['unlearned']['forget_acc'] > 0.02 for r in runs)} | "
            f"{sum(r['target_reached'] is False for r in runs)} | {max(drops):.3f} | "
            f"{statistics.fmean(r['avg_gap'] for r in runs):.4f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unlearn.bench.sweep", description=__doc__)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--robustness-methods", default=",".join(ROBUSTNESS_METHODS),
                        help="methods swept over all 10 classes x seeds of digits-class ('' to skip)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--raw", default=".cache/lethe/sweep.jsonl", help="where raw JSON results go")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        registry.get(method)
    raw = Path(args.raw)
    raw.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results, sweep = [], []
    with raw.open("w") as sink:
        for scenario in args.scenarios.split(","):
            for method in methods:
                for seed in seeds:
                    result = run_benchmark(method, scenario, seed, device=device)
                    results.append(result)
                    sink.write(json.dumps(result) + "\n")
                    print(f"{scenario} {method} seed {seed}: avg_gap {result['avg_gap']:.4f}", file=sys.stderr)
        for method in [m for m in args.robustness_methods.split(",") if m]:
            for seed in seeds:
                for forget_class in range(10):
                    result = run_benchmark(method, "digits-class", seed, forget_class, device=device)
                    sweep.append(result)
                    sink.write(json.dumps({**result, "sweep": "robustness"}) + "\n")
    print(f"Command: python -m unlearn.bench.sweep --methods {','.join(methods)} --seeds {args.seeds}")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, device {device}; "
          f"torch {torch.__version__}; total {time.perf_counter() - started:.0f} s\n")
    print(table(results))
    if sweep:
        print("\nClass-erasure robustness (digits-class, every class x every seed):\n")
        print(robustness(sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
