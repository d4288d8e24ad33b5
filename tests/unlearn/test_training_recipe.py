"""A recipe arrives as JSON or a protobuf Struct (every number a float) and is converted by TrainRecipe's field
types: integral floats become ints, anything else is refused naming the field, never replaced by a default."""

from __future__ import annotations

import pytest

from unlearn.errors import InvalidParameterError
from unlearn.training import TrainRecipe, recipe_from_values


def test_integral_floats_become_ints_and_floats_stay_floats():
    recipe = recipe_from_values({"epochs": 300.0, "seed": 0.0, "batch_size": 16.0, "lr": 0.01, "weight_decay": 0,
                                 "optimizer": "sgd"})
    assert recipe == TrainRecipe(epochs=300, seed=0, batch_size=16, lr=0.01, weight_decay=0.0, optimizer="sgd")
    assert type(recipe.epochs) is int and type(recipe.seed) is int and type(recipe.batch_size) is int
    assert type(recipe.weight_decay) is float
    assert recipe_from_values({}) == TrainRecipe()


@pytest.mark.parametrize("values, field", [
    ({"epochs": 300.5}, "epochs"),
    ({"seed": "0"}, "seed"),
    ({"epochs": True}, "epochs"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": float("inf")}, "lr"),
    ({"lr": -1.0}, "lr"),
    ({"batch_size": 0.0}, "batch_size"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"gradient_restriction": 2.0}, "gradient_restriction"),
    ({"epoch": 30}, "epoch"),
])
def test_bad_values_name_their_field(values, field):
    with pytest.raises(InvalidParameterError) as raised:
        recipe_from_values(values)
    assert raised.value.field == field
