"""The gate's checks (unlearn.gate) each fail on a constructed case, and the chain escalates on failure."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from tests.unlearn.helpers import NUM_CLASSES, blobs, class_problem
from unlearn import registry
from unlearn.chain import default_chain, run_chain
from unlearn.errors import InvalidParameterError
from unlearn.gate import GatePolicy, judge, without_classes
from unlearn.models import tiny_mlp
from unlearn.tasks import ClassificationTask
from unlearn.training import TrainRecipe, train_from_scratch

TASK = ClassificationTask(NUM_CLASSES)


@functools.lru_cache(maxsize=1)
def _memorising_problem():
    """An MLP trained long on few noisy records (it memorises them): forget = 10 of its training records."""
    train = blobs(60, seed=11)
    noisy = train["labels"].clone()
    noisy[::3] = (noisy[::3] + 1) % NUM_CLASSES  # mislabelled records can only be learned by memorising
    train = type(train)({"inputs": train["inputs"] * 2.5, "labels": noisy})
    recipe = TrainRecipe(epochs=150, batch_size=60, lr=3e-2, seed=0)
    model = train_from_scratch(TASK, lambda s: tiny_mlp(s, 16, NUM_CLASSES, ), train, recipe, torch.device("cpu"))
    audit = blobs(200, seed=12)
    audit = type(audit)({"inputs": audit["inputs"] * 2.5, "labels": audit["labels"]})
    return model, train.subset(range(0, 30, 3)), audit


def test_memorised_records_fail_membership_and_the_failure_names_the_direction():
    model, forget, audit = _memorising_problem()
    result = judge(TASK, model, model, forget, audit, audit, GatePolicy())
    assert "membership_auc" in result.failures or "membership_ks" in result.failures
    assert result.evidence["membership_after"]["direction"] == "under"
    assert not result.passed


def test_over_forgetting_fails_membership_in_the_other_direction():
    model, forget, audit = _memorising_problem()
    # "Unlearned" by making every forget record maximally wrong: their losses now exceed unseen data's.
    over = copy.deepcopy(model)
    inputs = forget["inputs"]
    wrong = (forget["labels"] + 5) % NUM_CLASSES
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(over(inputs), wrong)
        over.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in over.parameters():
                p -= 0.05 * p.grad
    result = judge(TASK, model, over, forget, audit, audit, GatePolicy(max_utility_drop=0.1))
    assert result.evidence["membership_after"]["direction"] == "over"
    assert {"membership_ks", "membership_auc"} & set(result.failures)


def test_utility_check_fails_when_accuracy_drops():
    problem = class_problem(0)
    broken = copy.deepcopy(problem.model)
    with torch.no_grad():
        for p in broken.parameters():
            p.mul_(0.0)
    utility = without_classes(problem.holdout, (0,))
    result = judge(TASK, problem.model, broken, problem.forget, utility, problem.holdout, GatePolicy(),
                   forget_classes=(0,))
    assert "utility" in result.failures


def test_class_forgetting_fails_on_an_unchanged_model_and_acc_o_says_when_it_cannot_run():
    problem = class_problem(0)
    utility = without_classes(problem.holdout, (0,))
    result = judge(TASK, problem.model, problem.model, problem.forget, utility, problem.holdout, GatePolicy(),
                   forget_classes=(0,), earlier_classes=(5,), earlier=None)
    assert "forgetting" in result.failures
    earlier = next(c for c in result.checks if c.name == "forgetting_earlier")
    assert earlier.passed is None and "not checkable" in earlier.reason
    assert "forgetting_earlier" not in result.failures  # not a pass either: passed is None, and said why


@pytest.mark.parametrize("field,value", [("max_utility_drop", 1.0), ("min_forget_p", 0.0),
                                         ("mia_auc_margin", 0.5), ("class_forget_max_accuracy", 1.0),
                                         ("max_utility_drop", float("nan")), ("min_forget_p", True)])
def test_policy_cannot_switch_the_gate_off(field, value):
    with pytest.raises(InvalidParameterError) as error:
        GatePolicy(**{field: value})
    assert error.value.field == field


def test_chain_escalates_from_a_rejected_method_and_keeps_every_attempt():
    problem = class_problem(0)
    request = problem.request()
    utility = without_classes(problem.holdout, (0,))
    chain = [("ssd", {"alpha": 1e9}), ("ssd-auto", {})]  # alpha 1e9 dampens nothing: the class stays known
    outcome = run_chain(problem.model, request, chain,
                        lambda result: judge(TASK, problem.model, result.model, problem.forget, utility,
                                             problem.holdout, GatePolicy(), forget_classes=(0,)))
    assert [a.method for a in outcome.attempts] == ["ssd", "ssd-auto"]
    assert not outcome.attempts[0].gate_passed and "forgetting" in outcome.attempts[0].gate.failures
    assert outcome.passed and outcome.chosen.method == "ssd-auto"
    assert outcome.result.model is not problem.model


def test_default_chain_drops_retrain_without_a_recipe():
    assert [m for m, _ in default_chain("classification", has_training=False)] == ["ssd-auto", "gu+graddiff"]
    assert [m for m, _ in default_chain("classification")][-1] == "retrain"
    assert all(registry.get(m) for m, _ in default_chain("causal_lm"))
