"""Boundary Shrink (unlearn.methods.boundary_shrink): neighbour labels are kept classes found by one FGSM step
on the original model, the erased class's records end confidently in those classes, and it erases classes
only."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tests.unlearn.helpers import class_problem
from unlearn import registry
from unlearn.errors import InvalidDataError, InvalidParameterError
from unlearn.gate import without_classes
from unlearn.methods.boundary_shrink import neighbour_labels
from unlearn.tasks import accuracy, accuracy_without_classes


def test_neighbour_labels_are_kept_classes_and_bound_zero_is_the_best_kept_class():
    problem = class_problem()
    model, forget = copy.deepcopy(problem.model), problem.forget
    labels, crossed = neighbour_labels(model, forget["inputs"], forget["labels"], problem.forget_classes, 0.0)
    assert not torch.isin(labels, torch.tensor(problem.forget_classes)).any()
    with torch.no_grad():
        logits = model(forget["inputs"])
    logits[:, list(problem.forget_classes)] = float("-inf")
    assert torch.equal(labels, logits.argmax(dim=1))  # no step: the kept class the model scores highest
    assert crossed == 0  # a confident model's own argmax is the erased class itself

    # A large step crosses the boundary for every record: the FGSM argmax is then the label as it stands.
    far, crossed_far = neighbour_labels(model, forget["inputs"], forget["labels"], problem.forget_classes, 5.0)
    assert crossed_far == len(forget) and not torch.isin(far, torch.tensor(problem.forget_classes)).any()
    for key, value in problem.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key])  # the original is not trained by the search


def test_erased_records_end_confidently_in_their_neighbour_class():
    problem = class_problem()
    # lr for the tiny MLP (its default, 3e-4, needs more than the 200-step budget here)
    result = registry.run("boundary-shrink", problem.model, problem.request(), {"bound": 0.0, "lr": 1e-2})
    assert result.target_reached is True and accuracy(problem.task, result.model, problem.forget) <= 0.02
    labels, _ = neighbour_labels(copy.deepcopy(problem.model), problem.forget["inputs"], problem.forget["labels"],
                                 problem.forget_classes, 0.0)
    with torch.no_grad():
        probabilities = F.softmax(result.model(problem.forget["inputs"]), dim=1)
    predicted = probabilities.argmax(dim=1)
    assert (predicted == labels).float().mean() >= 0.9  # where the relabelling sent them
    confidence = probabilities.max(dim=1).values.mean()
    assert confidence > 0.5, confidence  # not spread over the classes, as gradient ascent leaves them
    assert result.details["neighbours_total"] == len(problem.forget)


def test_it_erases_classes_only_and_says_when_its_budget_ran_out():
    problem = class_problem()
    record_request = problem.request()
    record_request = type(record_request)(**{**record_request.__dict__, "forget_classes": None})
    with pytest.raises(InvalidDataError) as raised:
        registry.run("boundary-shrink", problem.model, record_request, {})
    assert raised.value.field == "forget_classes"
    assert registry.get("boundary-shrink").erases == "classes"
    short = registry.run("boundary-shrink", problem.model, problem.request(), {"max_steps": 1, "lr": 1e-6})
    assert short.target_reached is False and "budget of 1 exhausted" in short.message


def _kept_tune_accuracy(problem, model) -> float:
    kept = without_classes(problem.request().tune, problem.forget_classes)
    return accuracy(problem.task, model, kept)


def test_the_utility_repair_brings_kept_classes_back_to_the_masked_original_on_tune():
    problem = class_problem()
    kept = without_classes(problem.request().tune, problem.forget_classes)
    reference = accuracy_without_classes(problem.task, problem.model, kept, problem.forget_classes)
    params = {"bound": 0.0, "lr": 5e-2}  # large steps: forgetting costs the kept classes several points
    plain = registry.run("boundary-shrink", problem.model, problem.request(), {**params, "repair_tolerance": None})
    assert _kept_tune_accuracy(problem, plain.model) < reference - 0.05  # the damage the repair is for
    assert "repair" not in plain.details

    repaired = registry.run("boundary-shrink", problem.model, problem.request(), {**params, "repair_tolerance": 0.05})
    repair = repaired.details["repair"]
    assert repair["steps"] > 0 and repair["utility_repaired"] is True
    assert repair["tune_reference"] == pytest.approx(reference)
    assert repair["tune_acc_after"] == pytest.approx(_kept_tune_accuracy(problem, repaired.model))
    assert repair["tune_acc_after"] >= reference - 0.05 > repair["tune_acc_before"]
    assert repaired.details["steps"] == plain.details["steps"]  # the forgetting phase is the same run
    assert repaired.target_reached is True and accuracy(problem.task, repaired.model, problem.forget) <= 0.02
    assert "repair step(s)" in repaired.message
    assert registry.run("boundary-shrink", problem.model, problem.request(), params).details["repair"]["tolerance"] == 0.0


def test_a_repair_that_runs_out_of_steps_says_so_and_one_not_needed_changes_nothing():
    problem = class_problem()
    params = {"bound": 0.0, "lr": 5e-2}
    short = registry.run("boundary-shrink", problem.model, problem.request(),
                         {**params, "repair_tolerance": 0.0, "repair_max_steps": 1, "repair_check_every": 1})
    assert short.details["repair"]["steps"] == 1 and short.details["repair"]["utility_repaired"] is False
    assert "utility NOT repaired" in short.message

    plain = registry.run("boundary-shrink", problem.model, problem.request(), {**params, "repair_tolerance": None})
    loose = registry.run("boundary-shrink", problem.model, problem.request(), {**params, "repair_tolerance": 1.0})
    assert loose.details["repair"]["steps"] == 0 and loose.details["repair"]["utility_repaired"] is True
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, loose.model.state_dict()[key])


@pytest.mark.parametrize("field, value", [("repair_tolerance", 1.5), ("repair_tolerance", -0.1),
                                          ("repair_max_steps", -1), ("repair_check_every", 0)])
def test_repair_settings_out_of_bounds_are_refused_by_name(field, value):
    problem = class_problem()
    with pytest.raises(InvalidParameterError) as raised:
        registry.run("boundary-shrink", problem.model, problem.request(), {field: value})
    assert raised.value.field == field


def test_a_repair_that_brings_the_erased_class_back_reports_the_target_missed(monkeypatch):
    """The verdict is on the weights returned: forgetting is checked again after the repair."""
    import unlearn.methods.boundary_shrink as method

    repaired = {"done": False}
    real_repair, real_check = method.repair_kept_classes, method.ForgetTarget.check

    def repair(*args, **kwargs):
        result = real_repair(*args, **kwargs)
        repaired["done"] = True
        return result

    def check(self, model, forget, *args, **kwargs):  # after the repair: as if the class came back
        verdict = real_check(self, model, forget, *args, **kwargs)
        return dataclasses.replace(verdict, reached=False, forget_acc=0.4) if repaired["done"] else verdict

    monkeypatch.setattr(method, "repair_kept_classes", repair)
    monkeypatch.setattr(method.ForgetTarget, "check", check)
    problem = class_problem()
    result = registry.run("boundary-shrink", problem.model, problem.request(),
                          {"bound": 0.0, "lr": 5e-2, "repair_tolerance": 0.05})
    assert result.details["repair"]["steps"] > 0
    assert result.target_reached is False and "brought the erased classes back" in result.message
