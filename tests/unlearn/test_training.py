"""The training loop: reproducible per seed with dropout, BatchNorm-safe last batches, learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from tests.unlearn.helpers import FEATURES, NUM_CLASSES, blobs, class_problem
from unlearn import registry
from unlearn.errors import InvalidParameterError
from unlearn.models import tabular_mlp
from unlearn.tasks import ClassificationTask
from unlearn.training import (
    TrainRecipe,
    epoch_batch_count,
    lr_multiplier,
    make_optimizer,
    train,
    train_from_scratch,
)

TASK = ClassificationTask(NUM_CLASSES)


def _factory(seed: int):
    return tabular_mlp(seed, FEATURES, NUM_CLASSES, hidden=16, dropout=0.5)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_recipe_and_seed_give_bit_identical_weights_on_a_model_with_dropout():
    data = blobs(70, seed=3)
    recipe = TrainRecipe(epochs=3, batch_size=16, lr=1e-2, seed=4)
    first = _weights(train_from_scratch(TASK, _factory, data, recipe, torch.device("cpu")))
    torch.manual_seed(12345)  # a different global state must not matter
    torch.rand(7)
    second = _weights(train_from_scratch(TASK, _factory, data, recipe, torch.device("cpu")))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_training_leaves_the_callers_random_state_alone():
    data = blobs(40, seed=3)
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    train_from_scratch(TASK, _factory, data, TrainRecipe(epochs=1, batch_size=16, seed=1), torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("method", ["retrain", "finetune"])
def test_batchnorm_survives_a_retain_set_one_more_than_a_multiple_of_the_batch_size(method):
    recipe = TrainRecipe(epochs=2, batch_size=16, lr=1e-2, seed=0)
    train_set = blobs(3 * 16 + 1 + 10, seed=1)
    model = train_from_scratch(TASK, _factory, train_set, recipe, torch.device("cpu"))
    forget = train_set.subset(range(10))
    retain = train_set.subset(range(10, len(train_set)))
    assert len(retain) == 3 * recipe.batch_size + 1
    request = registry.UnlearnRequest(task=TASK, forget=forget, retain=retain, model_factory=_factory,
                                      recipe=recipe, seed=0)
    result = registry.run(method, model, request)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_a_lone_last_example_joins_the_previous_batch():
    assert epoch_batch_count(49, 16) == 3  # 16, 16, 17
    assert epoch_batch_count(50, 16) == 4  # 16, 16, 16, 2
    assert epoch_batch_count(1, 16) == 1
    assert epoch_batch_count(48, 16) == 3


def test_schedule_multipliers_match_the_transformers_definitions():
    assert lr_multiplier("constant", 5, 10) == 1.0
    assert lr_multiplier("linear", 0, 10) == 1.0
    assert lr_multiplier("linear", 5, 10) == 0.5
    assert lr_multiplier("linear", 2, 10, warmup_steps=4) == 0.5  # warm-up 2/4
    assert lr_multiplier("linear", 7, 10, warmup_steps=4) == pytest.approx(0.5)  # (10 - 7) / (10 - 4)
    assert lr_multiplier("cosine", 0, 10) == 1.0
    assert lr_multiplier("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_multiplier("cosine", 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier("constant", 0, 10, warmup_steps=2) == 0.0


def test_linear_schedule_equals_a_lambda_lr_loop_decaying_to_zero():
    """``lr_schedule='linear'`` is the decay of unlearn.lm.model.train_lm: factor 1 - step / total."""
    data = blobs(40, seed=3)
    recipe = TrainRecipe(epochs=3, batch_size=16, lr=1e-2, optimizer="adamw", seed=2, lr_schedule="linear")
    ours = train_from_scratch(TASK, _factory, data, recipe, torch.device("cpu"))

    reference = _factory(recipe.seed)
    optimizer = make_optimizer(recipe, list(reference.parameters()))
    total = recipe.epochs * epoch_batch_count(len(data), recipe.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    shuffle = torch.Generator().manual_seed(recipe.seed)
    seen_lrs = []
    with torch.random.fork_rng(devices=[]):
        from unlearn.training import training_seed

        torch.manual_seed(training_seed(recipe))
        reference.train()
        for _ in range(recipe.epochs):
            for batch in data.batches(recipe.batch_size, shuffle_generator=shuffle):  # 40 = 16 + 16 + 8
                seen_lrs.append(optimizer.param_groups[0]["lr"])
                loss = TASK.batch_loss(reference, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    assert seen_lrs[0] == recipe.lr and seen_lrs[-1] == pytest.approx(recipe.lr / total)
    for name, value in ours.state_dict().items():
        assert torch.allclose(value, reference.state_dict()[name], atol=1e-6), name


def test_cosine_schedule_ends_near_zero_and_changes_training():
    data = blobs(40, seed=3)
    base = TrainRecipe(epochs=2, batch_size=16, lr=1e-2, seed=2)
    constant = _weights(train_from_scratch(TASK, _factory, data, base, torch.device("cpu")))
    from dataclasses import replace

    cosine = _weights(train_from_scratch(TASK, _factory, data, replace(base, lr_schedule="cosine"),
                                         torch.device("cpu")))
    assert not all(torch.equal(constant[k], cosine[k]) for k in constant)
    assert lr_multiplier("cosine", 5, 6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))


@pytest.mark.parametrize("field,value", [("lr_schedule", "step"), ("warmup_steps", -1), ("warmup_steps", 1.5),
                                         ("optimizer", "lion")])
def test_bad_recipe_fields_are_refused_by_name(field, value):
    with pytest.raises(InvalidParameterError) as error:
        TrainRecipe(**{field: value})
    assert error.value.field == field


def test_default_recipe_is_the_loop_as_before():
    """Constant lr without warm-up on a set without a lone last example: the plain ordered-batches loop."""
    problem = class_problem(0)
    recipe = TrainRecipe(epochs=2, batch_size=32, lr=1e-2, seed=0)
    ours = train(TASK, _factory(0), problem.train, recipe)
    reference = _factory(0)
    optimizer = make_optimizer(recipe, list(reference.parameters()))
    shuffle = torch.Generator().manual_seed(0)
    from unlearn.training import training_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(training_seed(recipe))
        reference.train()
        for _ in range(2):
            for batch in problem.train.batches(32, shuffle_generator=shuffle):
                loss = TASK.batch_loss(reference, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name
