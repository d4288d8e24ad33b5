"""``python -m unlearn.bench`` on the held-out families and on a family of your own (``--family module:function``)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from unlearn.bench.__main__ import main
from unlearn.bench.families import Family, code_digest, import_family, stratified_records
from unlearn.models import tanh_mlp, tiny_mlp
from unlearn.training import TrainRecipe


def own_records():
    from sklearn.datasets import make_blobs

    features, labels = make_blobs(n_samples=300, centers=3, n_features=5, cluster_std=2.0, random_state=4)
    return stratified_records(features, labels, "own", per_subject=3)


def own_family() -> Family:
    """What a reviewer writes for a hidden case: a factory, a class count, records with subjects, a recipe."""
    return Family("own", "tanh MLP on three blobs", 3, "test-own-tanh", lambda seed: tanh_mlp(seed, 5, 3),
                  TrainRecipe(epochs=8, batch_size=32, lr=1e-2, optimizer="adam"), own_records, {"features": 5})


def not_a_family() -> str:
    return "own"


def _with_records(**changes) -> Family:
    records = own_records()
    return replace(own_family(), load_records=lambda: replace(records, **changes))


def all_trained() -> Family:
    return _with_records(trained=np.ones(len(own_records()), dtype=bool))


def labels_out_of_range() -> Family:
    labels = own_records().labels.copy()
    labels[0] = 7
    return _with_records(labels=labels)


def nan_features() -> Family:
    features = own_records().features.copy()
    features[3, 2] = np.nan
    return _with_records(features=features)


def duplicate_ids() -> Family:
    ids = own_records().record_ids.copy()
    ids[1] = ids[0]
    return _with_records(record_ids=ids)


def wrong_class_count() -> Family:
    return replace(own_family(), num_classes=4)  # the model gives 3 logits


def own_lm_family(name: str = "pets", first_names: tuple[str, ...] | None = None):
    """An LM hidden case: fictitious people of your own (a FactSchema), a model shape and a recipe."""
    from unlearn.lm.fictitious import LMFamily
    from unlearn.lm.model import TINY_SPEC
    from unlearn.lm.people import FactSchema

    firsts = first_names or tuple(a + b for a in ("Ka", "Lo", "Mi", "Ro", "Su") for b in ("ren", "dan", "lia", "mon"))
    lasts = tuple(a + b for a in ("Vel", "Thorn", "Ash", "Brook", "Quill") for b in ("by", "wick"))
    schema = FactSchema(
        name=name, first_names=firsts, last_names=lasts, kinds=("animal", "colour"),
        values={"animal": ("ferret", "parrot", "tortoise", "hamster", "gecko", "rabbit"),
                "colour": ("amber", "slate", "teal", "crimson", "ivory", "olive")},
        questions={"animal": ("Which pet does {name} keep?", "What animal lives with {name}?"),
                   "colour": ("What colour is {name}'s pet?", "Which colour does {name}'s pet have?")},
        frames={"animal": ("{value}.", "{value}, the pet."), "colour": ("{value}.", "{value}, its colour.")})
    return LMFamily(schema, TINY_SPEC, TrainRecipe(epochs=3, batch_size=32, lr=1e-2, optimizer="adamw",
                                                   lr_schedule="linear"))


def few_names_lm_family():
    return own_lm_family(first_names=("Kai", "Lena"))


def dashed_lm_family():
    return own_lm_family(name="my-pets")


def odd_heads_lm_family():
    from unlearn.lm.model import GPTSpec

    return replace(own_lm_family(), spec=GPTSpec(layers=1, width=50, heads=3))


def schemaless_lm_family():
    return replace(own_lm_family(), schema=None)


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_family_of_your_own_runs_the_chain_with_the_issue_json(tmp_path, capsys):
    assert main(["--method", "auto", "--scenario", "own-class", "--family", f"{__name__}:own_family", "--seed", "0",
                 "--json", "--cache-dir", str(tmp_path)]) == 0
    result = _last_json(capsys)
    assert result["scenario"] == "own-class" and result["family"] == "own" and result["forget_class"] == 1
    assert result["attempts"] and set(result["gate"]) >= {"passed", "checks"}
    assert result["retrain_seconds"] > 0 and result["evidence"]["audit_records_in_request"] == 0


def test_an_lm_family_of_your_own_runs_the_lm_benchmark_on_its_people(tmp_path, capsys):
    from unlearn.lm.fictitious import load_family

    assert main(["--method", "unseen-kd", "--params", '{"max_steps": 2}', "--scenario", "pets-subject", "--family",
                 f"{__name__}:own_lm_family", "--seed", "0", "--json", "--cache-dir", str(tmp_path)]) == 0
    result = _last_json(capsys)
    assert result["scenario"] == "pets-subject" and len(result["people"]["forget"]) == 10
    assert result["forget_size"] == 20 and result["details"]["steps"] <= 2  # 10 people x 2 questions
    assert set(result["gate"]) >= {"passed", "checks"} and result["retrain_seconds"] > 0
    _, data, factory = load_family("pets-subject", tmp_path, own_lm_family())
    assert {pair.answer.strip().split(",")[0].rstrip(".") for pair in data.pairs} <= {
        *own_lm_family().schema.values["animal"], *own_lm_family().schema.values["colour"]}
    assert factory.spec.layers == 1  # the family's model shape, not the benchmark GPT's


def test_a_held_out_family_runs_from_the_main_command(tmp_path, capsys):
    assert main(["--method", "retrain", "--scenario", "wine-random", "--seed", "0", "--json",
                 "--cache-dir", str(tmp_path)]) == 0
    result = _last_json(capsys)
    assert result["family"] == "wine" and result["avg_gap"] == 0.0


@pytest.mark.parametrize("argv, message", [
    (["--family", "no_such_module_here:f", "--scenario", "own-class"], "cannot import 'no_such_module_here'"),
    (["--family", f"{__name__}:no_such_function", "--scenario", "own-class"], "has no function 'no_such_function'"),
    (["--family", f"{__name__}:not_a_family", "--scenario", "own-class"], "returned str, expected an unlearn"),
    (["--family", f"{__name__}", "--scenario", "own-class"], "must be module:function"),
    (["--family", f"{__name__}:own_family", "--scenario", "other-class"], "known: own-class, own-random, own-subject"),
    (["--scenario", "nowhere-class"], "unknown scenario 'nowhere-class'"),
    (["--family", f"{__name__}:own_lm_family", "--scenario", "pets-class"], "known: pets-subject"),
    (["--family", f"{__name__}:few_names_lm_family", "--scenario", "pets-subject"], "names 20 distinct people"),
    (["--family", f"{__name__}:dashed_lm_family", "--scenario", "my-pets-subject"], "without '-'"),
    (["--family", f"{__name__}:own_lm_family", "--scenario", "pets-subject", "--train", "gr"], "--train gr is only"),
    (["--family", f"{__name__}:odd_heads_lm_family", "--scenario", "pets-subject"], "must be a multiple of heads"),
    (["--family", f"{__name__}:schemaless_lm_family", "--scenario", "pets-subject"],
     "must be a unlearn.lm.people.FactSchema, got NoneType"),
    (["--family", f"{__name__}:all_trained", "--scenario", "own-random"], "tune and audit need records it never"),
    (["--family", f"{__name__}:labels_out_of_range", "--scenario", "own-random"], "labels must be integers in [0, 3)"),
    (["--family", f"{__name__}:nan_features", "--scenario", "own-random"], "features contain NaN or inf"),
    (["--family", f"{__name__}:duplicate_ids", "--scenario", "own-random"], "record ids must be unique"),
    (["--family", f"{__name__}:wrong_class_count", "--scenario", "own-random"], "expected [batch, 4]"),
])
def test_bad_families_and_scenarios_are_refused_before_any_training(tmp_path, capsys, argv, message):
    assert main(["--method", "retrain", "--cache-dir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_your_family_s_cache_key_follows_its_code():
    family = import_family(f"{__name__}:own_family")
    assert len(family.architecture["code"]) == 64 and family.architecture["features"] == 5
    assert import_family(f"{__name__}:own_family").architecture == family.architecture
    other = replace(family, model_factory=lambda seed: tiny_mlp(seed, 5, 3))  # another model class, same module
    assert code_digest(other) != family.architecture["code"]


def test_the_lm_family_example_loads_as_the_benchmark_reads_it(tmp_path):
    from unlearn.lm.fictitious import load_family

    family = import_family("examples.lm_family.staff:family")
    _, data, factory = load_family("staff-subject", tmp_path, family)
    assert len(data.train_subjects) == 100 and len(data.tune_subjects) + len(data.audit_subjects) == 100
    assert factory.spec.architecture == "neox" and len(data.pairs) == 200 * len(family.schema.kinds)
