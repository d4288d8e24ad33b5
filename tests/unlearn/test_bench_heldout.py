"""The held-out families (:mod:`unlearn.bench.heldout`): data and architectures no default was tuned on,
run through the same harness. The wine family is tiny (107 training records), so a whole run takes seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unlearn.bench import heldout
from unlearn.bench.harness import run_method
from unlearn.errors import InvalidParameterError
from unlearn.models import tanh_mlp


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LETHE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", sorted(heldout.HELDOUT_FAMILIES))
def test_each_family_trains_sixty_percent_of_every_class_with_standardised_features(name):
    family = heldout.HELDOUT_FAMILIES[name]()
    records = family.load_records()
    assert len(set(records.record_ids)) == len(records)
    for label in np.unique(records.labels):
        share = records.trained[records.labels == label].mean()
        assert abs(share - heldout.TRAIN_FRACTION) < 0.02
    trained = records.features[records.trained]
    deviation = trained.std(axis=0)  # a constant feature (the digits' blank border pixels) stays constant
    assert np.allclose(trained.mean(axis=0), 0, atol=1e-4)
    assert np.all(np.isclose(deviation, 1, atol=1e-3) | (deviation == 0)) and (deviation > 0).any()
    assert family.num_classes == len(np.unique(records.labels)) > heldout.HELDOUT_FORGET_CLASS


def test_tanh_mlp_is_seeded_and_has_no_normalisation_or_dropout():
    first, second = tanh_mlp(3, 13, 3), tanh_mlp(3, 13, 3)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.Dropout)) for m in first.modules())


@pytest.mark.parametrize("name, present, absent", [
    ("iris", (torch.nn.LayerNorm, torch.nn.GELU), (torch.nn.BatchNorm1d, torch.nn.Dropout)),
    ("moons", (torch.nn.Dropout, torch.nn.ReLU), (torch.nn.BatchNorm1d, torch.nn.LayerNorm)),
    ("conv1d", (torch.nn.Conv1d, torch.nn.BatchNorm1d, torch.nn.Dropout), (torch.nn.LayerNorm,)),
    ("linear", (torch.nn.Linear,), (torch.nn.ReLU, torch.nn.Tanh, torch.nn.Dropout, torch.nn.BatchNorm1d)),
])
def test_the_later_families_models_are_seeded_and_have_the_layers_they_claim(name, present, absent):
    family = heldout.HELDOUT_FAMILIES[name]()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, second, other = family.model_factory(3), family.model_factory(3), family.model_factory(4)
    assert torch.equal(torch.rand(1), expected_next)  # the factory leaves the caller's generator alone
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))
    kinds = {type(module) for module in first.modules()}
    assert all(kind in kinds for kind in present) and not any(kind in kinds for kind in absent)
    if name == "linear":
        assert sum(isinstance(module, torch.nn.Linear) for module in first.modules()) == 1
    records = family.load_records()
    logits = first.eval()(torch.from_numpy(records.features[:7]))
    assert logits.shape == (7, family.num_classes)


def test_retrain_on_a_heldout_family_equals_the_reference_and_auto_runs_the_chain():
    prepared = heldout.prepare_heldout("wine", "subject", 0)
    retrain, auto = (run_method(prepared, method) for method in ("retrain", "auto"))
    assert retrain["family"] == "wine" and retrain["avg_gap"] == 0.0
    assert retrain["evidence"]["tune_records_in_evaluation"] == 0
    assert retrain["evidence"]["audit_records_in_request"] == 0
    assert auto["chain"][0] == "ssd-auto" and auto["attempts"]
    assert auto["gate"]["passed"] == (auto["chosen"] is not None)


def test_class_scenarios_erase_the_heldout_class():
    prepared = heldout.prepare_heldout("wine", "class", 0)
    assert prepared.forget_classes == (heldout.HELDOUT_FORGET_CLASS,)
    assert set(prepared.sets["forget"]["labels"].tolist()) == {heldout.HELDOUT_FORGET_CLASS}


def test_unknown_family_or_selector_is_refused_before_any_training(tmp_path, capsys):
    with pytest.raises(InvalidParameterError, match="held-out family"):
        heldout.prepare_heldout("digits", "class", 0)
    with pytest.raises(InvalidParameterError, match="selector"):
        heldout.prepare_heldout("wine", "everything", 0)
    assert heldout.main(["--families", "nope", "--seeds", "0", "--raw", str(tmp_path / "raw.jsonl")]) == 2
    assert "unknown held-out family" in capsys.readouterr().err
    assert heldout.main(["--methods", "no-such-method", "--raw", str(tmp_path / "raw.jsonl")]) == 2


def test_cli_writes_raw_results_and_prints_the_sweep_tables(tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    assert heldout.main(["--families", "wine", "--selectors", "random", "--seeds", "0", "--methods", "retrain",
                         "--raw", str(raw)]) == 0
    lines = [json.loads(line) for line in raw.read_text().splitlines()]
    assert [(r["scenario"], r["method"]) for r in lines] == [("wine-random", "retrain"),
                                                             ("wine-random", "retrain, seed + 1")]
    out = capsys.readouterr().out
    assert "| wine-random | retrain | 1 |" in out and "| wine-random | *retrained* | 1 |" in out
