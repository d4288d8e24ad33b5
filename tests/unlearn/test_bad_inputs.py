"""Bad input raises a typed error naming what was wrong, and leaves the model untouched."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.unlearn.helpers import class_problem
from unlearn import registry
from unlearn.data import ExampleSet, classification_examples
from unlearn.errors import CacheMismatchError, InvalidDataError, InvalidParameterError, UnknownMethodError
from unlearn.importance import ImportanceCache, TrainImportance, estimate_importance
from unlearn.models import tiny_mlp


@pytest.fixture
def problem():
    return class_problem()


@pytest.fixture
def untouched(problem):
    before = copy.deepcopy(problem.model.state_dict())
    yield
    for key, value in problem.model.state_dict().items():
        assert torch.equal(value, before[key])


def test_empty_forget_set(problem, untouched):
    empty = problem.forget.subset([])
    with pytest.raises(InvalidDataError) as error:
        registry.run("ssd", problem.model, problem.request(forget=empty))
    assert error.value.field == "forget"


def test_forget_set_is_whole_training_set(problem, untouched):
    with pytest.raises(InvalidDataError, match="whole training set"):
        registry.run("ssd", problem.model, problem.request(forget=problem.train, retain=None))
    with pytest.raises(InvalidDataError, match="whole training set"):
        registry.run("finetune", problem.model, problem.request(forget=problem.train,
                                                                 retain=problem.train.subset([])))


def test_nan_in_inputs(problem, untouched):
    inputs = problem.forget["inputs"].clone()
    inputs[0, 0] = math.nan
    with pytest.raises(InvalidDataError, match="NaN") as error:
        registry.run("ssd", problem.model, problem.request(forget=classification_examples(inputs, problem.forget["labels"])))
    assert error.value.field == "forget"


def test_finite_inputs_whose_sum_overflows_are_accepted_and_opposite_infinities_are_not(problem):
    huge = problem.forget["inputs"].clone()
    huge[:4, 0] = 3.0e38  # every element finite, their float32 sum is not
    assert not torch.isfinite(huge.sum())
    problem.task.validate(problem.model, classification_examples(huge, problem.forget["labels"]), "forget")
    opposite = problem.forget["inputs"].clone()
    opposite[0, 0], opposite[1, 0] = math.inf, -math.inf  # their sum is NaN: refused all the same
    with pytest.raises(InvalidDataError, match="NaN or inf"):
        problem.task.validate(problem.model, classification_examples(opposite, problem.forget["labels"]), "forget")


def test_inf_in_retain(problem, untouched):
    inputs = problem.retain["inputs"].clone()
    inputs[3, 2] = math.inf
    bad = classification_examples(inputs, problem.retain["labels"])
    with pytest.raises(InvalidDataError) as error:
        registry.run("finetune", problem.model, problem.request(retain=bad))
    assert error.value.field == "retain"


def test_shape_mismatch(problem, untouched):
    wrong = classification_examples(torch.zeros(5, 7), torch.zeros(5, dtype=torch.long))
    with pytest.raises(InvalidDataError, match="do not fit the model"):
        registry.run("ssd", problem.model, problem.request(forget=wrong))


def test_label_out_of_range(problem, untouched):
    bad = classification_examples(problem.forget["inputs"], torch.full((len(problem.forget),), 99))
    with pytest.raises(InvalidDataError, match="labels"):
        registry.run("ssd", problem.model, problem.request(forget=bad))


def test_unknown_method(problem, untouched):
    with pytest.raises(UnknownMethodError, match="no-such-method"):
        registry.run("no-such-method", problem.model, problem.request())


@pytest.mark.parametrize(
    "params, field",
    [
        ({"alphaa": 3.0}, "alphaa"),
        ({"alpha": "ten"}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_parameters_name_the_field(problem, untouched, params, field):
    with pytest.raises(InvalidParameterError) as error:
        registry.run("ssd", problem.model, problem.request(), params)
    assert error.value.field == field


def test_methods_that_need_retain_data_say_so(problem, untouched):
    with pytest.raises(InvalidDataError) as error:
        registry.run("retrain", problem.model, problem.request(retain=None))
    assert error.value.field == "retain"


def test_ssd_without_training_importance(problem, untouched):
    with pytest.raises(InvalidDataError) as error:
        registry.run("ssd", problem.model, problem.request(train_importance=None))
    assert error.value.field == "train"


def test_cache_file_of_another_model_is_refused(problem, tmp_path):
    cache = ImportanceCache(tmp_path)
    digest = problem.train.digest()
    importance = estimate_importance(problem.task, problem.model, problem.train, 64)
    path = cache.store(importance, problem.model, digest, 64, "fisher")
    assert cache.load(problem.model, digest, 64, "fisher") is not None
    # A file under this model's key whose content was computed for a different model.
    other = tiny_mlp(seed=5, in_features=16, num_classes=10)
    foreign = ImportanceCache(tmp_path / "other").store(
        estimate_importance(problem.task, other, problem.train, 64), other, digest, 64, "fisher")
    foreign.replace(path)
    with pytest.raises(CacheMismatchError):
        cache.load(problem.model, digest, 64, "fisher")
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CacheMismatchError):
        cache.load(problem.model, digest, 64, "fisher")


def test_example_sets_reject_ragged_tensors():
    with pytest.raises(InvalidDataError):
        ExampleSet({"inputs": torch.zeros(3, 2), "labels": torch.zeros(4, dtype=torch.long)})


def test_a_model_is_probed_once_per_class_count_and_shape_across_task_objects(problem):
    from unlearn.tasks import ClassificationTask

    model = copy.deepcopy(problem.model)  # a model object no other test probed
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    ClassificationTask(10).validate(model, problem.forget, "forget")
    ClassificationTask(10).validate(model, problem.retain, "retain")  # another task object: no second probe
    assert len(calls) == 1
    with pytest.raises(InvalidDataError, match=r"expected \[batch, 3\]"):  # another class count is probed anew
        ClassificationTask(3).validate(model, problem.forget, "forget")
    assert len(calls) == 2


class _TupleOutput(torch.nn.Module):
    """forward returns (logits, features), as many real models do."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, inputs):
        logits = self.inner(inputs)
        return logits, inputs


def test_a_model_whose_forward_returns_a_tuple_is_refused_with_the_reason(problem, untouched):
    model = _TupleOutput(copy.deepcopy(problem.model))
    with pytest.raises(InvalidDataError, match=r"returned a tuple, not one tensor.*logits \[batch, 10\] alone") as error:
        registry.run("ssd", model, problem.request())
    assert error.value.field == "forget"


def test_a_float64_model_is_refused_naming_its_dtype(problem, untouched):
    model = copy.deepcopy(problem.model).double()
    with pytest.raises(InvalidDataError, match=r"parameters are torch.float64 .* log it as float32") as error:
        registry.run("ssd", model, problem.request())
    assert error.value.field == "forget"
