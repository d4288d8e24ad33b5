"""The contract every registered strategy honours (STYLE.md habit 7), from one table of cases.

Classification strategies run on the class-incremental blobs (a tiny MLP that knows classes 0-4 learns
class 5); strategies for causal LMs only (GeRe) run on the tiny GPT, and every causal-LM strategy is also
run once there. For each: the caller's model and buffer are unchanged, a new model comes back, the same seed
gives the same weights, the update is learned, and ``exact`` / ``buffer`` / ``state`` match the spec.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from continual import registry
from tests.continual.helpers import class_problem, lm_update_request
from unlearn.errors import InvalidDataError
from unlearn.tasks import accuracy

# name -> parameters that make the TINY problem meaningful (defaults otherwise).
CASES: dict[str, dict] = {}
HFT_SEED = 1  # the blobs MLP has two matrices; seed 1 freezes layers.0 and leaves the head trainable
NEW_CLASS_MIN = 0.9
WISE_FT_NEW_CLASS_MIN = 0.5  # interpolating towards the current version trades new-class accuracy for old, by design


def classification_strategies() -> list[str]:
    return registry.names_for(registry.CLASSIFICATION)


def lm_only_strategies() -> list[str]:
    return [name for name in registry.names_for(registry.CAUSAL_LM) if name not in classification_strategies()]


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", classification_strategies())
def test_strategy_contract_classification(name):
    problem = class_problem()
    spec = registry.get(name)
    seed = HFT_SEED if "hft" in name else 0
    request = problem.request(seed=seed)
    before = copy.deepcopy(problem.model.state_dict())
    buffer_rows = list(request.buffer.record_ids)

    first = registry.run(name, problem.model, request, CASES.get(name))
    second = registry.run(name, problem.model, problem.request(seed=seed), CASES.get(name))

    for key, value in problem.model.state_dict().items():  # never mutates the caller's model
        assert torch.equal(value, before[key]), f"{name} changed the caller's {key}"
    assert request.buffer.record_ids == buffer_rows, f"{name} changed the caller's buffer"
    assert first.model is not problem.model
    assert _same_weights(first.model, second.model), f"{name}: same seed gave different weights"
    learned = WISE_FT_NEW_CLASS_MIN if name.startswith("wise-ft+") else NEW_CLASS_MIN
    assert accuracy(problem.task, first.model, problem.new_test) >= learned, f"{name} did not learn class 5"
    assert first.exact == spec.exact
    assert (first.buffer is not None) == (spec.stores == "buffer")
    assert (first.state is not None) == (spec.stores == "state")
    assert all(p.requires_grad for p in first.model.parameters())


@pytest.mark.parametrize("name", [n for n in registry.names_for(registry.CAUSAL_LM) if n != "joint"])
def test_strategy_contract_causal_lm(name, lm):
    request = lm_update_request(lm)
    before = copy.deepcopy(lm.model.state_dict())
    result = registry.run(name, lm.model, request)
    for key, value in lm.model.state_dict().items():
        assert torch.equal(value, before[key]), f"{name} changed the caller's {key}"
    assert result.model is not lm.model
    assert (result.buffer is not None) == (registry.get(name).stores == "buffer")
    if name in lm_only_strategies():  # determinism of the strategies the classification test cannot run
        again = registry.run(name, lm.model, lm_update_request(lm))
        assert _same_weights(result.model, again.model)


@pytest.mark.parametrize("name", registry.names())
def test_config_round_trips_and_is_documented(name):
    spec = registry.get(name)
    default = spec.config_cls()
    assert registry.parse_config(name, registry.config_to_dict(default)) == default
    assert registry.parse_config(name, {}) == default
    for field in dataclasses.fields(spec.config_cls):
        assert field.name in (spec.config_cls.__doc__ or ""), f"{name}: field {field.name} is undocumented"


@pytest.mark.parametrize("name", registry.names())
def test_docstring_states_mutation_and_cites(name):
    module = __import__(registry.get(name).run.__module__, fromlist=["_"])
    assert "Mutates in place" in (module.__doc__ or ""), f"{name}: docstring must say whether it mutates"


@pytest.mark.parametrize("name", classification_strategies())
def test_a_frozen_parameter_is_left_as_registered(name):
    """As in every unlearning method (unlearn.registry.copy_model): a parameter registered frozen is not trained
    by an update and stays frozen in the new version; the exact joint retrain follows ``factory(seed)``'s flags."""
    problem = class_problem()
    model = copy.deepcopy(problem.model)
    frozen_name, frozen = next(iter(model.named_parameters()))
    frozen.requires_grad_(False)
    if "hft" in name:  # the blobs MLP has two matrices: one left trainable is no half to freeze
        with pytest.raises(InvalidDataError, match="two trainable parameter matrices"):
            registry.run(name, model, problem.request(seed=HFT_SEED), CASES.get(name))
        return
    result = registry.run(name, model, problem.request(), CASES.get(name))
    flags = {key: parameter.requires_grad for key, parameter in result.model.named_parameters()}
    if not result.exact:
        assert flags == {key: key != frozen_name for key in flags}, name
        assert torch.equal(result.model.state_dict()[frozen_name], model.state_dict()[frozen_name]), name
    assert not _same_weights(result.model, model), f"{name} changed nothing"
