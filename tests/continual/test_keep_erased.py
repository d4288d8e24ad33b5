"""Erased stays erased inside the continual benchmark (continual.bench.harness.keep_erased and
continual.bench.erasure.recheck): an erasure that regressed after an update is erased again, one that held is
left alone, and a failed re-erasure is recorded, never hidden."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from continual.bench.erasure import recheck
from continual.bench.harness import Erasure, Keyed, keep_erased
from tests.continual.helpers import blobs, class_problem


def _keyed(examples) -> Keyed:
    ids = tuple(f"r{i}" for i in range(len(examples)))
    return Keyed(examples, ids, ids)


def _erasure(name: str, holds: bool, reerase_result: str | None, calls: list[str]) -> Erasure:
    """An erasure whose re-check passes when ``holds`` (or once re-erased), and whose re-erasure returns a new
    model (``"model"``) or fails (``None``)."""
    state = {"reerased": False}

    def check(model: nn.Module) -> dict:
        calls.append(f"check {name}")
        return {"passed": holds or state["reerased"]}

    def again(model: nn.Module, retain: Keyed):
        calls.append(f"reerase {name} on {len(retain)} retained")
        if reerase_result is None:
            return None, {"method": None, "attempts": [{"method": "gu+graddiff", "gate_passed": False}]}
        state["reerased"] = True
        return nn.Linear(2, 2), {"method": "gu+graddiff", "attempts": [{"method": "gu+graddiff", "gate_passed": True}]}

    return Erasure(name, lambda model: (model, {}), recheck=check, reerase=again)


def test_an_erasure_that_held_is_left_alone():
    calls: list[str] = []
    model = nn.Linear(2, 2)
    kept, records, seconds = keep_erased([_erasure("a", True, "model", calls)], model, _keyed(blobs(7, 0)))
    assert kept is model and seconds == 0.0
    assert calls == ["check a"]
    assert records == [{"request": "a", "recheck": {"passed": True}, "reerased": False}]


def test_a_regressed_erasure_is_erased_again_and_checked_once_more():
    calls: list[str] = []
    model = nn.Linear(2, 2)
    kept, records, seconds = keep_erased([_erasure("a", False, "model", calls)], model, _keyed(blobs(7, 0)))
    assert kept is not model
    assert calls == ["check a", "reerase a on 7 retained", "check a"]
    assert records[0]["reerased"] is True and records[0]["reerase"]["passed"] is True
    assert records[0]["recheck_after"] == {"passed": True} and seconds > 0.0
    assert records[0]["reerase"]["seconds"] == seconds


def test_a_failed_reerasure_keeps_the_model_and_says_so():
    calls: list[str] = []
    model = nn.Linear(2, 2)
    held = _erasure("held", True, "model", calls)
    failed = _erasure("failed", False, None, calls)
    unchecked = Erasure("unchecked", lambda m: (m, {}))  # no recheck: skipped, as an erasure the lineage can't test
    kept, records, _ = keep_erased([held, failed, unchecked], model, _keyed(blobs(5, 0)))
    assert kept is model
    assert [r["request"] for r in records] == ["held", "failed"]
    assert records[1]["reerased"] is False and records[1]["reerase"]["passed"] is False
    assert records[1]["reerase"]["attempts"] == [{"method": "gu+graddiff", "gate_passed": False}]
    assert "recheck_after" not in records[1]


def test_recheck_of_a_class_erasure_is_its_accuracy_against_the_gate_limit():
    problem = class_problem()
    forget = blobs(40, 7, classes=(2,))
    remembered = recheck(problem.task, problem.model, forget, problem.tune, classes=(2,))
    assert remembered["passed"] is False and remembered["accuracy"] > 0.5 and remembered["limit"] == 0.05

    class NeverTwo(nn.Module):  # the trained model with class 2's logit pushed down: the class is forgotten
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(x).clone()
            out[:, 2] = -1e9
            return out

    forgotten = recheck(problem.task, NeverTwo(problem.model), forget, problem.tune, classes=(2,))
    assert forgotten == {"passed": True, "accuracy": 0.0, "limit": 0.05}


def test_recheck_of_records_is_the_gates_two_sided_membership_test():
    problem = class_problem()
    trained_on = problem.retain.subset(list(range(60)))
    member = recheck(problem.task, problem.model, trained_on, problem.tune)
    never_seen = recheck(problem.task, problem.model, blobs(60, 99, classes=(0, 1, 2, 3, 4)), problem.tune)
    assert never_seen["passed"] is True
    assert member["auc"] > never_seen["auc"]
    assert {"passed", "auc", "ks_p_value", "auc_slack"} <= set(member)
    assert torch.isfinite(torch.tensor(member["auc_slack"]))


def test_after_every_update_erases_again_even_when_the_check_passes():
    calls: list[str] = []
    model = nn.Linear(2, 2)
    kept, records, seconds = keep_erased([_erasure("a", True, "model", calls)], model, _keyed(blobs(3, 0)),
                                         always=True)
    assert calls == ["check a", "reerase a on 3 retained", "check a"]
    assert kept is not model and records[0]["reerased"] is True and seconds > 0.0


def test_run_scenario_refuses_an_unknown_reerase_policy_before_any_work():
    import pytest

    from continual.bench.scenarios import run_scenario

    with pytest.raises(ValueError, match="reerase: 'sometimes' is not one of on-regression, after-every-update"):
        run_scenario("digits-incremental", "replay", 0, {}, torch.device("cpu"), Path("/nonexistent"),
                     reerase="sometimes")


def test_the_erasure_chain_keeps_each_default_steps_parameters():
    from continual.bench.erasure import _steps

    # the causal-LM default chain runs simnpo+rt twice (after unseen-kd), the second time with its own parameters
    assert _steps("causal_lm", None, None)[:3] == [("unseen-kd", {}), ("simnpo+rt", {}),
                                                   ("simnpo+rt", {"fade_quantile": 0.8})]
    overridden = _steps("causal_lm", None, {"simnpo+rt": {"lr": 0.002}})
    assert overridden[:3] == [("unseen-kd", {}), ("simnpo+rt", {"lr": 0.002}),
                              ("simnpo+rt", {"fade_quantile": 0.8, "lr": 0.002})]
    assert _steps("causal_lm", ["gu+graddiff"], {"gu+graddiff": {"alpha": 3.0}}) == [("gu+graddiff", {"alpha": 3.0})]
