"""Boundary Shrink (unlearn.methods.boundary_shrink): neighbour labels are kept classes found by one FGSM step
on the original model, the erased class's records end confidently in those classes, and it erases classes
only."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.unlearn.helpers import class_problem
from unlearn import registry
from unlearn.errors import InvalidDataError
from unlearn.methods.boundary_shrink import neighbour_labels
from unlearn.tasks import accuracy


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
