"""The update's escalation in rounds (service.updates.escalate): a re-erasure whose repair makes ANOTHER sealed set
fail its re-check gets another round on that set, up to MAX_REERASE_ROUNDS in all; any other failure ends it; a
policy re-erasure that ends failing reverts to the update that passed. Fakes stand in for the chain and the
gate, so each path is forced (the engine tests run the real ones: test_engine_updates, test_update_reerase).
"""

from __future__ import annotations

from dataclasses import dataclass

from service.sealed import RECHECK
from service.updates import MAX_REERASE_ROUNDS, escalate
from unlearn.gate import GateCheck, GateResult


@dataclass(frozen=True)
class Result:
    model: object


def gate(*failing: str) -> GateResult:
    names = ("learned", "utility", f"{RECHECK}[a]", f"{RECHECK}[b]")
    return GateResult(tuple(GateCheck(name, 0.0, 0.0, name not in failing, "rule") for name in names), {})


def recheck(request_id: str) -> str:
    return f"{RECHECK}[{request_id}]"


class Chain:
    """A fake re-erasure: each call returns a new model object and records what it was asked to repair."""

    def __init__(self, passes: bool = True):
        self.calls: list[tuple[object, tuple[str, ...], bool]] = []
        self.passes = passes

    def __call__(self, model, failed: GateResult, everything: bool):
        self.calls.append((model, failed.failures, everything))
        return (object() if self.passes else None), {"sets": list(failed.failures), "attempts": []}


def test_a_repair_that_breaks_another_set_gets_a_second_round_on_that_set():
    chain, verdicts = Chain(), iter([gate(recheck("b")), gate()])  # round 1 breaks b; round 2 repairs it
    start = Result(object())
    result, final, evidence = escalate(start, gate(recheck("a")), False, chain, lambda model: next(verdicts))
    assert final.passed and result.model is not start.model
    assert [failures for _, failures, _ in chain.calls] == [(recheck("a"),), (recheck("b"),)]
    assert chain.calls[1][0] is not start.model  # round 2 starts from round 1's model, not the update's
    assert [everything for _, _, everything in chain.calls] == [False, False]
    assert evidence["trigger"] == "regression" and evidence["rounds"] == 2 and evidence["repaired"] is True
    assert evidence["first_gate"]["failures"] == [recheck("a")]
    (second,) = evidence["further_rounds"]
    assert second["gate_before"]["failures"] == [recheck("b")] and second["repaired"] is True


def test_rounds_end_at_the_limit_and_the_update_is_refused_with_every_round():
    flip = [gate(recheck("b")), gate(recheck("a"))] * MAX_REERASE_ROUNDS  # each repair breaks the other set
    verdicts, chain = iter(flip), Chain()
    result, final, evidence = escalate(Result(object()), gate(recheck("a")), False, chain,
                                       lambda model: next(verdicts))
    assert len(chain.calls) == MAX_REERASE_ROUNDS and evidence["rounds"] == MAX_REERASE_ROUNDS
    assert not final.passed and evidence["repaired"] is False
    assert len(evidence["further_rounds"]) == MAX_REERASE_ROUNDS - 1
    assert "reverted_because" not in evidence  # a regression: nothing passed to revert to


def test_a_failure_no_reerasure_can_repair_ends_the_rounds():
    chain = Chain()
    _, final, evidence = escalate(Result(object()), gate(recheck("a")), False, chain,
                                  lambda model: gate("utility", recheck("b")))
    assert len(chain.calls) == 1 and evidence["rounds"] == 1
    assert final.failures == ("utility", recheck("b")) and evidence["repaired"] is False


def test_a_policy_reerasure_that_ends_failing_reverts_to_the_update_that_passed():
    chain, verdicts = Chain(), iter([gate(recheck("b")), gate("utility")])
    start, passed = Result(object()), gate()
    result, final, evidence = escalate(start, passed, True, chain, lambda model: next(verdicts))
    assert result is start and final is passed
    assert [everything for _, _, everything in chain.calls] == [True, False]  # round 2: only the broken set
    assert evidence["trigger"] == "policy" and evidence["rounds"] == 2
    assert evidence["repaired"] is False and evidence["reverted_because"] == ["utility"]


def test_nothing_to_escalate_and_a_chain_without_a_pass():
    start, passed = Result(object()), gate()
    assert escalate(start, passed, False, Chain(), lambda model: passed) == (start, passed, None)
    failing = Chain(passes=False)
    result, final, evidence = escalate(start, gate(recheck("a")), False, failing, lambda model: passed)
    assert result is start and final.failures == (recheck("a"),)
    assert len(failing.calls) == 1 and evidence["repaired"] is False and evidence["rounds"] == 1
