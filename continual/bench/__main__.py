"""``python -m continual.bench --strategy S --scenario X --seed N [--params JSON] [--json]``

With ``--json`` the last line of stdout is one JSON object: ``r_matrix``, ``acc``, ``bwt``, ``forgetting``,
``min_acc``, ``wc_acc``, ``stability_gap``, ``seconds``, ``joint_acc``, ``joint_seconds``, ``finetune_acc``,
the scenario's own keys, ``targets`` (one boolean per target of issue 12) and ``definitions``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from continual import registry
from continual.bench.harness import REERASE_POLICIES
from continual.bench.scenarios import SCENARIOS, run_scenario
from unlearn.device import resolve_device
from unlearn.errors import UnlearnError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m continual.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", required=True, help=f"one of: {', '.join(registry.names())}")
    parser.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default="{}", help="strategy parameters as a JSON object")
    parser.add_argument("--device", default="cpu", help="cpu (the recorded numbers), auto or cuda[:N]")
    parser.add_argument("--cache-dir", default=os.environ.get("LETHE_CACHE_DIR", ".cache/lethe"),
                        help="where base models are cached (their training time is never used)")
    parser.add_argument("--buffer-capacity", type=int, help="replay-buffer size (default: the scenario's)")
    parser.add_argument("--reerase", default="on-regression", choices=REERASE_POLICIES,
                        help="when an earlier erasure is erased again after an update: when its re-check fails "
                             "(default here; the service's rule for classifiers) or after every update (the "
                             "service's default for causal LMs: the policy's reerase_after_update)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    try:
        result = run_scenario(args.scenario, args.strategy, args.seed, json.loads(args.params),
                              resolve_device(args.device), Path(args.cache_dir), args.buffer_capacity,
                              args.reerase)
    except (UnlearnError, json.JSONDecodeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else _human(result))
    return 0


def _human(result: dict) -> str:
    rows = [f"{result['strategy']} on {result['scenario']} seed {result['seed']}"]
    for row in result["r_matrix"]:
        rows.append("  R " + " ".join(f"{v:.3f}" for v in row))
    rows.append(f"  acc={result['acc']:.4f} bwt={result['bwt']:.4f} forgetting={result['forgetting']:.4f} "
                f"min_acc={result['min_acc']} wc_acc={result['wc_acc']} stability_gap={result['stability_gap']}")
    rows.append(f"  seconds={result['seconds']:.2f} joint: acc={result['joint_acc']:.4f} "
                f"seconds={result['joint_seconds']:.2f}  finetune acc={result['finetune_acc']:.4f}")
    rows.append(f"  targets={result.get('targets')}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
