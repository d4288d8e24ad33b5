"""The benchmark's JSON contract, on one real digits run (trains two small CNNs, a few seconds)."""

import json

import pytest

from unlearn.bench.__main__ import main

KEYS = {"scenario", "method", "seed", "original", "retrained", "unlearned", "avg_gap", "unlearn_seconds",
        "retrain_seconds", "speedup", "cost_vs_fwd_bwd"}
METRICS = {"forget_acc", "retain_acc", "test_acc", "test_retain_acc", "mia"}


@pytest.mark.slow
def test_json_last_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LETHE_CACHE_DIR", str(tmp_path))
    assert main(["--method", "ssd", "--scenario", "digits-class", "--seed", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert KEYS <= set(result)
    for model in ("original", "retrained", "unlearned"):
        assert METRICS <= set(result[model])
        assert all(0.0 <= result[model][k] <= 1.0 for k in METRICS)
    assert result["original"]["forget_acc"] > 0.9
    assert result["retrained"]["forget_acc"] == 0.0  # a model that never saw class 3 never predicts it
    assert result["unlearned"]["forget_acc"] < 0.5
    assert result["speedup"] > 1


def test_bad_method_is_a_clean_error(capsys):
    assert main(["--method", "nope", "--scenario", "digits-class"]) == 2
    assert "unknown method" in capsys.readouterr().err
