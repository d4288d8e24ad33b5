"""The sweep's summary tables (:func:`unlearn.bench.sweep.targets`) on constructed results."""

from __future__ import annotations

from unlearn.bench.sweep import NOISE_FLOOR, targets


def run(scenario: str, method: str, gap: float, kept: float, retrained_kept: float, passed: bool = True) -> dict:
    return {"scenario": scenario, "method": method, "avg_gap": gap, "exact": method == "retrain", "speedup": 1.0,
            "gate": {"passed": passed}, "unlearned": {"test_retain_acc": kept},
            "retrained": {"test_retain_acc": retrained_kept}}


def test_a_scenario_where_only_auto_ran_still_gets_its_row():
    out = targets([run("x-class", "auto", 0.05, 0.9, 0.9), run("x-class", NOISE_FLOOR, 0.01, 0.9, 0.9)])
    assert "| x-class | - | - | - | 0.0100 | 0.0500 | 1/1 |" in out


def test_the_best_method_is_the_lowest_mean_gap_and_misses_are_marked():
    out = targets([run("x-random", "ssd", 0.02, 0.9, 0.9), run("x-random", "ga", 0.01, 0.9, 0.9),
                   run("y-random", "ssd", 0.05, 0.9, 0.9)])
    assert "| x-random | ga | 0.0100 | yes | - | - | - |" in out
    assert "| y-random | ssd | 0.0500 | **no** | - | - | - |" in out


def test_kept_class_drops_are_counted_for_the_chain_and_for_the_noise_reference():
    out = targets([run("x-class", "auto", 0.0, 0.90, 0.93), run("x-class", "auto", 0.0, 0.92, 0.93, passed=False),
                   run("x-class", NOISE_FLOOR, 0.0, 0.90, 0.93, passed=False), run("x-class", NOISE_FLOOR, 0.0, 0.93, 0.93)])
    assert "| auto | 2 | 1 | 1 | 1/2 |" in out  # 3 points below: counted, and the gate passed it
    assert f"| *{NOISE_FLOOR}* (noise: an exact retrain, another seed) | 2 | 1 | 0 | 1/2 |" in out
