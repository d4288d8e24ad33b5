"""Precomputed tune scores (unlearn.heldout) and ssd-auto's untouched check that reads them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unlearn.helpers import class_problem
from unlearn import registry
from unlearn.errors import CacheMismatchError, InvalidDataError
from unlearn.heldout import HeldOutCache, HeldOutScores, score
from unlearn.membership import membership_losses
from unlearn.registry import copy_model
from unlearn.tasks import accuracy


def record_problem():
    """Record erasure on the blobs MLP whose forget set the model scores exactly like unseen records, so the
    untouched model passes deterministically: the forget set is the tune records themselves (identical loss
    distributions: KS p 1, AUC 0.5), standing for records a generalising model never memorised."""
    problem = class_problem()
    problem.forget = problem.holdout
    problem.forget_classes = None
    return problem


def keys(count: int) -> np.ndarray:
    return np.array([f"k{i:04d}" for i in range(count)])


def test_scores_are_the_per_request_numbers():
    problem = record_problem()
    scores = score(problem.task, problem.model, problem.holdout, keys(len(problem.holdout)), batch_size=7)
    assert np.allclose(scores.losses, membership_losses(problem.task, problem.model, problem.holdout), atol=1e-6)
    assert scores.accuracy == accuracy(problem.task, problem.model, problem.holdout)


def test_select_keeps_the_asked_order_and_refuses_what_it_does_not_hold():
    scores = HeldOutScores(keys(4), np.array([0.1, 0.2, 0.3, 0.4]), np.array([True, False, True, True]))
    picked = scores.select(np.array(["k0003", "k0001"]))
    assert picked.losses.tolist() == [0.4, 0.2] and picked.correct.tolist() == [True, False]
    assert scores.select(np.array(["k0003", "missing"])) is None


def test_cache_round_trip_is_keyed_by_weights_and_refuses_a_foreign_file(tmp_path):
    problem = record_problem()
    cache = HeldOutCache(tmp_path)
    scores = score(problem.task, problem.model, problem.holdout, keys(len(problem.holdout)))
    path = cache.store(scores, problem.model, "data-1")
    loaded = cache.load(problem.model, "data-1")
    assert np.array_equal(loaded.losses, scores.losses) and np.array_equal(loaded.keys, scores.keys)
    assert cache.load(problem.model, "data-2") is None  # other data: nothing stored
    other = copy_model(problem.model)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert cache.load(other, "data-1") is None  # other weights: nothing stored
    # A file under the right name holding another model's scores is never used.
    cache.store(scores, other, "data-1").replace(path)
    with pytest.raises(CacheMismatchError):
        cache.load(problem.model, "data-1")


def test_ssd_auto_untouched_check_reads_the_precomputed_scores_and_skips_importance():
    problem = record_problem()
    scores = score(problem.task, problem.model, problem.holdout, keys(len(problem.holdout)))
    computed = registry.run("ssd-auto", problem.model, problem.request())
    request = problem.request(tune_scores=scores)
    precomputed = registry.run("ssd-auto", problem.model, request)
    assert computed.target_reached is precomputed.target_reached is True
    assert precomputed.details["alpha"] is None and precomputed.details["trials"] == 1
    assert precomputed.details["search"] == computed.details["search"]  # the same verdict, same numbers
    assert precomputed.details["tune_scores"] == "precomputed for the model version"
    assert computed.details["tune_scores"] == "computed for this request"
    assert request.train_importance.last_seconds == 0 and not request.train_importance.computed  # no I_D pass
    assert precomputed.model is problem.model  # unchanged: the caller's own object, no copy
    assert computed.model is problem.model


def test_ssd_auto_does_not_trust_scores_it_was_not_given_for_and_dampens_when_they_say_known():
    """Scores whose tune losses are all high make the forget set look memorised: the untouched check must fail
    and the search run (proof that the scores are read, not recomputed)."""
    problem = record_problem()
    scores = score(problem.task, problem.model, problem.holdout, keys(len(problem.holdout)))
    inflated = HeldOutScores(scores.keys, scores.losses + 5.0, scores.correct)
    result = registry.run("ssd-auto", problem.model, problem.request(tune_scores=inflated))
    untouched = result.details["search"][0]
    assert untouched["alpha"] == float("inf") and not untouched["forgets"]
    assert result.details["trials"] > 1


def test_class_erasure_ignores_tune_scores():
    problem = class_problem()
    bogus = HeldOutScores(keys(len(problem.holdout)), np.zeros(len(problem.holdout)),
                          np.zeros(len(problem.holdout), dtype=bool))
    result = registry.run("ssd-auto", problem.model, problem.request(tune_scores=bogus))
    assert result.details["tune_scores"] == "computed for this request"
    assert result.target_reached is True


def test_scoring_puts_a_model_in_eval_mode_and_restores_it_and_leaves_an_eval_model_alone(monkeypatch):
    problem = class_problem()
    model = copy_model(problem.model)
    model.train()
    reference = score(problem.task, model, problem.holdout)
    assert model.training and all(m.training for m in model.modules())  # restored
    model.eval()
    calls = []
    monkeypatch.setattr(type(model), "train", lambda self, mode=True: calls.append(mode) or self)
    assert np.array_equal(score(problem.task, model, problem.holdout).losses, reference.losses)
    assert membership_losses(problem.task, model, problem.holdout).shape == (len(problem.holdout),)
    assert accuracy(problem.task, model, problem.holdout) == reference.accuracy
    assert calls == []  # nothing in training mode: no walk over the modules to switch them
    monkeypatch.undo()
    model.layers[0].train()  # one submodule left in training mode: switched for the pass, as before
    assert np.array_equal(score(problem.task, model, problem.holdout).losses, reference.losses)
    assert not any(m.training for m in model.modules())  # model.train(False) restores the top's mode


def test_evaluation_passes_take_the_tasks_batch_size_unless_told():
    """``score``, ``accuracy`` and ``membership_losses`` batch by the task's ``eval_batch_size`` (the LM task's
    is smaller than the default: faster on its GPTs, the same numbers) unless the caller names one."""
    problem = record_problem()
    rows: list[int] = []

    class Counting:
        eval_batch_size = 5

        def __getattr__(self, name):
            return getattr(problem.task, name)

        def outputs(self, model, batch):  # score's pass
            rows.append(len(next(iter(batch.values()))))
            return problem.task.outputs(model, batch)

        def correct(self, model, batch):  # accuracy's pass
            rows.append(len(next(iter(batch.values()))))
            return problem.task.correct(model, batch)

    task = Counting()
    size = len(problem.holdout)
    for evaluate in (lambda: score(task, problem.model, problem.holdout),
                     lambda: accuracy(task, problem.model, problem.holdout)):
        rows.clear()
        evaluate()
        assert max(rows) == 5 and sum(rows) == size
    rows.clear()
    score(task, problem.model, problem.holdout, batch_size=size)
    assert rows == [size]
    assert np.allclose(score(task, problem.model, problem.holdout).losses,
                       score(problem.task, problem.model, problem.holdout).losses, atol=1e-6)


def test_scores_of_another_size_than_the_tune_records_are_refused_naming_the_field():
    problem = record_problem()
    scores = score(problem.task, problem.model, problem.holdout, keys(len(problem.holdout)))
    short = HeldOutScores(scores.keys[:-1], scores.losses[:-1], scores.correct[:-1])
    with pytest.raises(InvalidDataError, match="tune_scores"):
        registry.run("ssd-auto", problem.model, problem.request(tune_scores=short))
