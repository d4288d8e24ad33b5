"""The calibration's stop-rule check (:func:`unlearn.bench.lm_gate_calibration.stop_rule`): what the LM methods'
stop rule says of a given model, on the tiny GPT of :mod:`tests.unlearn.lm_helpers`."""

from __future__ import annotations

from tests.unlearn.lm_helpers import lm_problem
from unlearn.bench.lm_gate_calibration import stop_rule
from unlearn.methods.unseen_kd import UnseenKDConfig


def test_the_stop_rule_does_not_hold_on_people_the_model_memorised():
    problem = lm_problem()
    rule = stop_rule(problem.task, problem.model, problem.forget, problem.holdout)
    assert rule["reached"] is False
    assert rule["auc"] > rule["auc_limit"] == 0.5 + UnseenKDConfig().stop_auc_margin
    assert rule["forget_whole"] > rule["tune_whole"]


def test_the_stop_rule_holds_when_the_forget_answers_are_the_tune_answers():
    problem = lm_problem()  # the same never-trained answers on both sides: AUC 0.5, KS p-value 1
    rule = stop_rule(problem.task, problem.model, problem.holdout, problem.holdout)
    assert rule["reached"] is True and rule["over"] is False
    assert rule["auc"] == 0.5 and rule["ks_p"] == 1.0
    assert rule["forget_whole"] == rule["tune_whole"]
