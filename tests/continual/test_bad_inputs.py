"""Bad input is refused before anything is trained, with an error naming the field (and row)."""

from __future__ import annotations

import copy

import pytest
import torch

from continual import registry
from continual.errors import ErasedDataError, UnsupportedTaskError
from tests.continual.helpers import class_problem, lm_update_request
from unlearn.data import ExampleSet, classification_examples
from unlearn.errors import InvalidDataError, InvalidParameterError


class _Recorder:
    """A monitor and progress callback that records whether any training step happened."""

    every_steps = 1

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1


def _refused(problem, error_type, field, index=None, strategy="replay", **overrides):
    recorder = _Recorder()
    before = copy.deepcopy(problem.model.state_dict())
    request = problem.request(monitor=recorder, progress=recorder, **overrides)
    with pytest.raises(error_type) as error:
        registry.run(strategy, problem.model, request)
    assert error.value.field == field, str(error.value)
    if index is not None:
        assert f"row {index}" in str(error.value), str(error.value)
    assert recorder.calls == 0  # nothing was trained
    for key, value in problem.model.state_dict().items():
        assert torch.equal(value, before[key])
    return error.value


def _with(problem, **tensors):
    fields = dict(problem.update.tensors)
    fields.update(tensors)
    return ExampleSet(fields)


def test_empty_update():
    problem = class_problem()
    empty = classification_examples(torch.zeros(0, 16), torch.zeros(0, dtype=torch.long))
    _refused(problem, InvalidDataError, "update", update=empty, update_record_ids=(), update_subject_hashes=())


def test_label_outside_the_models_head():
    problem = class_problem()
    labels = problem.update["labels"].clone()
    labels[7] = 12
    error = _refused(problem, InvalidDataError, "update.labels", 7, update=_with(problem, labels=labels))
    assert "cannot grow a head" in str(error)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs(value):
    problem = class_problem()
    inputs = problem.update["inputs"].clone()
    inputs[4, 2] = value
    _refused(problem, InvalidDataError, "update.inputs", 4, update=_with(problem, inputs=inputs))


def test_inputs_the_model_cannot_take():
    problem = class_problem()
    _refused(problem, InvalidDataError, "update", update=_with(problem, inputs=problem.update["inputs"][:, :15]))


def test_keys_that_do_not_match_the_rows():
    problem = class_problem()
    _refused(problem, InvalidDataError, "update_record_ids", update_record_ids=("only-one",))
    ids = tuple(f"update-{i}" for i in range(len(problem.update)))
    _refused(problem, InvalidDataError, "update_record_ids", 3, update_record_ids=ids[:3] + ids[2:3] + ids[4:])


def test_erased_subject_record_and_class_are_refused_with_their_row():
    problem = class_problem()
    error = _refused(problem, ErasedDataError, "update_subject_hashes", 5,
                     erased_subject_hashes=frozenset({"update-subject-5"}))
    assert error.index == 5
    _refused(problem, ErasedDataError, "update_record_ids", 9, erased_record_ids=frozenset({"update-9"}))
    _refused(problem, ErasedDataError, "update.labels", 0, erased_classes=frozenset({5}))
    _refused(problem, ErasedDataError, "retain.labels", 0, strategy="joint", buffer=None, erased_classes=frozenset({0}))


def test_new_classes_must_be_outputs_of_the_head():
    problem = class_problem()
    _refused(problem, InvalidDataError, "new_classes", new_classes=(10,))


def test_unknown_and_ill_typed_parameters_name_the_field():
    problem = class_problem()
    with pytest.raises(InvalidParameterError) as error:
        registry.run("lwf", problem.model, problem.request(), {"temprature": 2.0})
    assert error.value.field == "temprature"
    with pytest.raises(InvalidParameterError) as error:
        registry.run("replay", problem.model, problem.request(), {"alpha": "high"})
    assert error.value.field == "alpha"
    with pytest.raises(InvalidParameterError) as error:
        registry.run("ewc", problem.model, problem.request(), {"gamma": 2.0})
    assert error.value.field == "gamma"


def test_a_strategy_refuses_a_task_it_does_not_support_at_config_time():
    with pytest.raises(UnsupportedTaskError) as error:
        registry.parse_config("gere", {}, "classification")
    assert error.value.field == "strategy" and "causal_lm" in str(error.value)
    problem = class_problem()
    _refused(problem, UnsupportedTaskError, "strategy", strategy="wise-ft+gere")


def test_strategy_specific_requirements_are_checked_before_training():
    problem = class_problem()
    _refused(problem, InvalidDataError, "buffer", buffer=None)
    _refused(problem, InvalidDataError, "tune", strategy="wise-ft+lwf", tune=None)
    _refused(problem, InvalidDataError, "retain", strategy="ewc", retain=None)
    _refused(problem, InvalidDataError, "model_factory", strategy="joint", model_factory=None)


def test_token_ids_outside_the_vocabulary(lm):
    request = lm_update_request(lm)
    ids = request.update["input_ids"].clone()
    ids[3, 1] = 10_000
    bad = ExampleSet({**request.update.tensors, "input_ids": ids})
    with pytest.raises(InvalidDataError) as error:
        registry.run("finetune", lm.model, lm_update_request(lm, update=bad))
    assert error.value.field == "update.input_ids" and "row 3" in str(error.value)
