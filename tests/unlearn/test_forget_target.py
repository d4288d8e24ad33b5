"""The forgetting target's AUC band, and the sampling allowance of ssd-auto's check on the unchanged model."""

import math

import numpy as np
import pytest
import torch

from tests.unlearn.helpers import class_problem
from unlearn import registry
from unlearn.forget_target import DEFAULT_STOP_AUC_MARGIN, UNTOUCHED_AUC_Z, ForgetTarget
from unlearn.heldout import HeldOutScores, score
from unlearn.membership import membership_test, null_auc_sd


def _tune_losses_around(forget_losses: np.ndarray, quantiles: list[float], size: int = 100) -> np.ndarray:
    """``size`` tune losses in which the i-th smallest forget loss sits at ``quantiles[i]``."""
    ordered = np.sort(forget_losses)
    low, high = ordered[0] - 1.0, ordered[-1] + 1.0
    knots_q = [0.0, *quantiles, 1.0]
    knots_v = [low, *ordered, high]
    return np.interp((np.arange(size) + 0.5) / size, knots_q, knots_v) + 1e-9  # no ties with the forget losses


def _small_record_erasure(problem):
    records = torch.arange(1, len(problem.retain), 97)[:3]  # three training records of kept classes
    forget = problem.retain.subset(records)
    keep = torch.ones(len(problem.retain), dtype=torch.bool)
    keep[records] = False
    retain = problem.retain.subset(torch.nonzero(keep).flatten())
    return forget, retain


def test_the_band_widens_by_z_null_sd_only_when_asked():
    forget = np.array([0.10, 0.20, 0.30])
    tune = _tune_losses_around(forget, [0.25, 0.35, 0.45])  # AUC 0.65, far from significant with 3 records
    membership = membership_test(forget, tune)
    assert membership.auc == pytest.approx(0.65, abs=0.011) and membership.ks_p_value >= 0.05
    sd = null_auc_sd(3, len(tune))
    assert 0.5 + DEFAULT_STOP_AUC_MARGIN < membership.auc <= 0.5 + DEFAULT_STOP_AUC_MARGIN + UNTOUCHED_AUC_Z * sd
    target = ForgetTarget(None, None, (0,), 0.02)  # decide() needs neither task nor tune
    assert target.decide(membership, 1.0).reached is False  # a running method's stop rule: unchanged
    assert target.decide(membership, 1.0, auc_z=UNTOUCHED_AUC_Z).reached is True
    far = membership_test(forget, _tune_losses_around(forget, [0.02, 0.04, 0.06]))  # AUC ~0.96: known
    assert target.decide(far, 1.0, auc_z=UNTOUCHED_AUC_Z).reached is False
    assert target.decide(far, 1.0, auc_z=UNTOUCHED_AUC_Z).over is False


def test_ssd_auto_leaves_a_few_unremarkable_records_alone_and_searches_without_the_allowance():
    problem = class_problem()
    forget, retain = _small_record_erasure(problem)
    forget_losses = score(problem.task, problem.model, forget).losses
    tune_losses = _tune_losses_around(forget_losses, [0.25, 0.35, 0.45], len(problem.holdout))
    scores = HeldOutScores(np.array([str(i) for i in range(len(tune_losses))]), tune_losses,
                           np.ones(len(tune_losses), dtype=bool))
    request = problem.request(forget=forget, retain=retain, forget_classes=None, tune_scores=scores)

    result = registry.run("ssd-auto", problem.model, request)
    assert result.model is problem.model and result.target_reached is True  # the caller's own, unchanged
    (first,) = result.details["search"]
    assert math.isinf(first["alpha"]) and first["forgets"]

    strict = registry.run("ssd-auto", problem.model, request, {"untouched_auc_z": 0.0})
    assert strict.details["search"][0]["forgets"] is False  # the same model, the trials' narrower band
    assert strict.details["trials"] > 1 and strict.model is not problem.model


def test_records_whose_training_labels_are_still_predicted_have_not_reached_the_target():
    """The loss test alone passes memorised mislabelled records (low losses, like correctly classified unseen
    records); the accuracy condition holds the target back while their training labels are still predicted
    significantly better than tune's, beyond the gate's margin, and says so in the details and the message; nor
    has the run gone beyond the never-seen level then, whatever the loss test says."""
    from unlearn.forget_target import run_outcome

    rng = np.random.default_rng(0)
    tune_losses = rng.exponential(0.5, 60)
    membership = membership_test(rng.permutation(np.concatenate([tune_losses] * 2))[:72], tune_losses)
    assert membership.ks_p_value >= 0.05  # the losses look never-seen
    tune = list(range(60))  # only its length is read by decide()
    target = ForgetTarget(None, tune, None, 0.02)  # the default stop_accuracy_p: the KS stop's 0.05
    memorised = target.decide(membership, 68 / 72, tune_acc=0.82)  # the stress test's numbers: Fisher p 0.027
    assert not memorised.reached and not memorised.over and not target.done(memorised)
    assert memorised.still_predicted
    assert memorised.details()["stop_accuracy_tune"]["fisher_p"] == pytest.approx(0.027, abs=0.01)
    reached, message = run_outcome(memorised, 200, 200)
    assert reached is False and "still predicted better than tune's (0.944 against 0.820)" in message

    assert target.decide(membership, 0.86, tune_acc=0.82).reached  # within the 0.05 margin
    assert target.decide(membership, 68 / 72).reached  # no tune accuracy: the loss test alone
    assert ForgetTarget(None, tune, None, 0.02, stop_accuracy_p=None).decide(membership, 68 / 72, tune_acc=0.82).reached

    # A few records flipped first and lifted the forget losses above tune's: the loss test alone reads "over".
    lifted = membership_test(np.concatenate([rng.exponential(0.5, 50), np.full(22, 9.0)]), tune_losses)
    assert lifted.ks_p_value < 0.05 and lifted.auc < 0.45
    assert target.decide(lifted, 0.80, tune_acc=0.82).over  # the training labels forgotten too: beyond
    held = target.decide(lifted, 68 / 72, tune_acc=0.82)  # most still predicted: neither beyond nor done
    assert not held.over and not held.reached and held.still_predicted
