"""ssd-auto: the mildest alpha that forgets under the utility check, and honest failure."""

import torch

from tests.unlearn.helpers import class_problem
from unlearn import registry
from unlearn.tasks import accuracy


def retained_holdout(problem):
    keep = ~torch.isin(problem.holdout["labels"], torch.tensor(problem.forget_classes))
    return problem.holdout.subset(torch.nonzero(keep).flatten())


def test_reaches_target_with_the_mildest_accepted_alpha():
    problem = class_problem()
    result = registry.run("ssd-auto", problem.model, problem.request())
    assert result.target_reached is True
    assert accuracy(problem.task, result.model, problem.forget) <= 0.02
    reference = accuracy(problem.task, problem.model, retained_holdout(problem))
    assert accuracy(problem.task, result.model, retained_holdout(problem)) >= reference - 0.02
    search = result.details["search"]
    accepted = [t["alpha"] for t in search if t["forgets"] and t["useful"]]
    assert result.details["alpha"] == max(accepted)
    assert all(not t["forgets"] for t in search if t["alpha"] > result.details["alpha"])


def test_reports_failure_instead_of_returning_a_collapsed_model():
    problem = class_problem()
    # Only very mild dampening is allowed, which cannot erase a class: the method must say so.
    result = registry.run("ssd-auto", problem.model, problem.request(),
                          {"alpha_min": 1e4, "alpha_max": 1e5, "max_trials": 4})
    assert result.target_reached is False
    assert "not reached" in result.message or "unchanged" in result.message
    reference = accuracy(problem.task, problem.model, retained_holdout(problem))
    assert accuracy(problem.task, result.model, retained_holdout(problem)) >= reference - 0.02


def test_zero_tolerance_never_trades_utility():
    problem = class_problem()
    result = registry.run("ssd-auto", problem.model, problem.request(), {"max_utility_drop": 0.0})
    reference = accuracy(problem.task, problem.model, retained_holdout(problem))
    assert accuracy(problem.task, result.model, retained_holdout(problem)) >= reference
