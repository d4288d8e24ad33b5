"""The rejection message's hint when the exact retrain failed on utility alone (service.pipeline)."""

from __future__ import annotations

from service.pipeline import exact_utility_hint
from unlearn.chain import Attempt
from unlearn.gate import GateCheck, GateResult


def attempt(method: str, after: float, before: float = 0.60, others: tuple[str, ...] = (),
            onnx_after: float | None = None) -> Attempt:
    checks = [GateCheck("utility", after, before - 0.02, after >= before - 0.02, "rule")]
    if onnx_after is not None:
        checks.append(GateCheck("onnx_utility", onnx_after, before - 0.02, onnx_after >= before - 0.02, "rule"))
    checks += [GateCheck(name, 0.0, 0.05, False, "rule") for name in others]
    return Attempt(method=method, params={}, seconds=1.0,
                   gate=GateResult(tuple(checks), {"utility_acc_before": before, "utility_acc_after": after}))


def test_an_exact_retrain_short_on_utility_alone_gets_the_policy_that_would_accept_it():
    hint = exact_utility_hint([attempt("ssd-auto", 0.50, others=("membership_ks",)), attempt("retrain", 0.5623)])
    assert "exact retrain (retrain" in hint and "drop of 0.0377" in hint
    assert "max_utility_drop=0.0377" in hint and "at most 0.1" in hint and "close this request" in hint


def test_the_suggested_limit_is_rounded_up_so_that_it_accepts_the_model():
    hint = exact_utility_hint([attempt("retrain", 0.5712345)])  # drop 0.0287655 -> 0.0288, not 0.0287
    assert "max_utility_drop=0.0288" in hint


def test_the_served_models_utility_counts_when_the_onnx_check_fell_shorter():
    hint = exact_utility_hint([attempt("retrain", 0.59, onnx_after=0.55)])
    assert "max_utility_drop=0.0500" in hint and "0.5500 against 0.6000" in hint


def test_a_drop_beyond_the_policy_bound_says_no_policy_accepts_it():
    hint = exact_utility_hint([attempt("retrain", 0.30)])
    assert "beyond the largest max_utility_drop" in hint and "max_utility_drop=" not in hint


def test_no_hint_for_approximate_methods_or_when_the_exact_model_failed_another_check():
    assert exact_utility_hint([attempt("ssd-auto", 0.50), attempt("gu+graddiff", 0.50)]) == ""
    assert exact_utility_hint([attempt("retrain", 0.50, others=("forget_accuracy",))]) == ""
    assert exact_utility_hint([Attempt(method="retrain", params={}, seconds=1.0, error="out of memory")]) == ""
