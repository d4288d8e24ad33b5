"""The benchmark harness: its JSON contract, the evidence rule, ``auto``, honest costs, any family.

Most tests run the harness on a tiny family (blobs, an MLP with BatchNorm and dropout, a few epochs) built
here, which is also the proof that the harness takes any model and data set. The CLI test on the digits
family trains two small CNNs (a few seconds each).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from unlearn import registry
from unlearn.bench import harness
from unlearn.bench.__main__ import main
from unlearn.bench.families import Family, Records
from unlearn.bench.scenarios import SCENARIOS, parse_scenario
from unlearn.chain import DEFAULT_CHAINS
from unlearn.errors import InvalidParameterError
from unlearn.models import tabular_mlp
from unlearn.splits import BENCH_SPLIT_KEY, audit_mask
from unlearn.training import TrainRecipe

KEYS = {"scenario", "method", "seed", "original", "retrained", "unlearned", "avg_gap", "unlearn_seconds",
        "retrain_seconds", "speedup", "cost_vs_fwd_bwd", "gate", "splits", "evidence"}
METRICS = {"forget_acc", "retain_acc", "test_acc", "test_retain_acc", "mia"}
FEATURES, CLASSES = 8, 4


def _tiny_records() -> Records:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(480) % CLASSES
    centres = torch.randn(CLASSES, FEATURES, generator=generator) * 2.0
    features = (centres[labels] + torch.randn(480, FEATURES, generator=generator)).numpy().astype(np.float32)
    trained = np.zeros(480, dtype=bool)
    trained[:300] = True
    return Records(features, labels.numpy().astype(np.int64), np.array([f"tiny-{i:04d}" for i in range(480)]),
                   np.array([f"subject-{i // 4:03d}" for i in range(480)]), trained)


TINY = Family("tiny", "test family", CLASSES, "tiny-mlp",
              lambda seed: tabular_mlp(seed, FEATURES, CLASSES, hidden=16, dropout=0.2),
              TrainRecipe(epochs=4, batch_size=32, lr=1e-2), _tiny_records)


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory):
    return harness.prepare("tiny-random", 0, cache_dir=tmp_path_factory.mktemp("cache"), family=TINY)


def test_evidence_rule_methods_see_tune_and_every_number_comes_from_audit_and_training(tiny_random, monkeypatch):
    prepared = tiny_random
    ids = prepared.record_ids
    records = TINY.load_records()
    never = records.record_ids[~records.trained]
    assert set(ids["audit"]) == set(never[audit_mask(never, BENCH_SPLIT_KEY)])
    assert set(ids["tune"]) | set(ids["audit"]) == set(never) and not set(ids["tune"]) & set(ids["audit"])
    for name in harness.EVALUATION_SETS:
        assert not set(ids["tune"]) & set(ids[name]), f"tune records in evaluation set {name}"
    for name in harness.REQUEST_SETS:
        assert not set(ids["audit"]) & set(ids[name]), f"audit records in request set {name}"

    seen = {}
    real_run = registry.run

    def spy(method, model, request, params=None):
        seen["request"] = request
        return real_run(method, model, request, params)

    monkeypatch.setattr(harness.registry, "run", spy)
    result = harness.run_method(prepared, "ga")
    request = seen["request"]
    audit_rows = {tuple(row.tolist()) for row in prepared.sets["audit"]["inputs"]}
    for name in ("forget", "retain", "tune"):
        rows = {tuple(row.tolist()) for row in getattr(request, name)["inputs"]}
        assert not rows & audit_rows, f"the method's {name} set holds audit records"
    assert request.tune.digest() == prepared.sets["tune"].digest()
    assert result["evidence"]["tune_records_in_evaluation"] == 0
    assert result["evidence"]["audit_records_in_request"] == 0
    assert result["splits"]["test_acc"].startswith("audit")


def test_evidence_rule_violation_is_detected(tiny_random):
    broken = replace(tiny_random, record_ids={**tiny_random.record_ids,
                                              "audit": np.concatenate([tiny_random.record_ids["audit"],
                                                                       tiny_random.record_ids["tune"][:1]])})
    with pytest.raises(AssertionError, match="evidence rule broken"):
        broken.evidence()


def test_auto_runs_the_default_chain_judged_by_the_gate(tiny_random):
    result = harness.run_method(tiny_random, "auto")
    assert KEYS <= set(result) and result["method"] == "auto"
    assert result["chain"] == list(DEFAULT_CHAINS["classification"])
    assert result["attempts"] and all({"method", "target_reached", "gate_passed"} <= set(a) for a in result["attempts"])
    assert [a["method"] for a in result["attempts"]] == result["chain"][: len(result["attempts"])]
    assert {"passed", "checks"} <= set(result["gate"])
    passed = [a for a in result["attempts"] if a["gate_passed"]]
    assert result["gate"]["passed"] == bool(passed)
    if passed:  # the chain stops at the first verified result
        assert result["attempts"][-1]["gate_passed"] and result["chosen"] == passed[0]["method"]
    names = {c["name"] for c in result["gate"]["checks"]}
    assert {"utility", "membership_ks", "membership_auc"} <= names  # record erasure is gated on membership


def test_retrain_through_the_harness_is_the_reference_exactly(tiny_random):
    """Deterministic training (dropout seeded, BatchNorm-safe batches): retrain == the retrained reference."""
    result = harness.run_method(tiny_random, "retrain")
    assert result["avg_gap"] == 0.0 and result["unlearned"] == result["retrained"]
    assert result["exact"] is True and result["gate"]["passed"] == result["gate_retrained"]["passed"]
    assert result["train_importance_passes"] == [] and result["train_importance_seconds"] == 0.0


@pytest.mark.parametrize("method,variant", [("ssd", "fisher"), ("lfssd", "label_free")])
def test_ssd_reports_first_request_and_steady_state_with_the_importance_pass_it_used(tiny_random, method, variant):
    result = harness.run_method(tiny_random, method)
    assert result["train_importance_passes"] == [{"batch_size": 64, "variant": variant}]
    assert result["train_importance_seconds"] > 0
    assert result["first_request_seconds"] > 0 and result["unlearn_seconds"] > 0
    assert result["speedup_first_request"] == pytest.approx(result["retrain_seconds"] / result["first_request_seconds"])


def test_class_only_and_unsupported_methods_are_refused_with_the_reason(tiny_random):
    assert "vision transformer" in harness.refusal(tiny_random, "gslora++")
    assert "causal_lm" in harness.refusal(tiny_random, "gu+flat")
    with pytest.raises(InvalidParameterError):
        harness.run_method(tiny_random, "gu+flat")


def test_scenario_names():
    assert {"digits-class", "digits-random", "digits-subject", "tabular-class", "tabular-random",
            "tabular-subject", "vit-class", "vit-random", "vit-subject"} <= set(SCENARIOS)
    assert parse_scenario("tabular-random") == ("tabular", "random")
    with pytest.raises(InvalidParameterError):
        parse_scenario("tabular-everything")


@pytest.mark.slow
def test_cli_auto_json_last_line(tmp_path, capsys):
    assert main(["--method", "auto", "--scenario", "digits-class", "--seed", "0", "--json",
                 "--cache-dir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert KEYS | {"attempts"} <= set(result)
    for model in ("original", "retrained", "unlearned"):
        assert METRICS <= set(result[model])
        assert all(0.0 <= result[model][k] <= 1.0 for k in METRICS)
    assert result["original"]["forget_acc"] > 0.9
    assert result["retrained"]["forget_acc"] == 0.0  # a model that never saw class 3 never predicts it
    assert result["attempts"][0]["method"] == "ssd-auto"
    assert result["gate"]["passed"] and result["unlearned"]["forget_acc"] <= 0.05
    # a fresh cache: the original was trained here, at this process's thread count, and the JSON says so
    assert result["original_from_cache"] is False and result["original_threads"] == result["threads"]


def test_bad_method_is_a_clean_error(capsys):
    assert main(["--method", "nope", "--scenario", "digits-class"]) == 2
    assert "unknown method" in capsys.readouterr().err
