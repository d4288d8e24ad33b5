"""The registry: names, capabilities, validation of parameters, the shared coercion, wrapper configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

import unlearn.config
import unlearn.registry
from continual import registry
from continual.strategies import wise_ft
from unlearn.errors import InvalidParameterError

REQUIRED = {"finetune", "joint", "replay", "lwf", "ewc", "hft", "gere", "wise-ft+finetune", "wise-ft+lwf",
            "wise-ft+replay", "wise-ft+ewc", "wise-ft+hft", "wise-ft+gere"}


def test_every_strategy_is_registered_with_its_capabilities():
    assert REQUIRED <= set(registry.names())
    assert "gere" not in registry.names_for("classification") and "gere" in registry.names_for("causal_lm")
    assert registry.get("joint").exact and registry.get("replay").stores == "buffer"
    assert registry.get("ewc").stores == "state" and registry.get("lwf").stores == "nothing"


def test_unknown_strategy_and_duplicate_names():
    with pytest.raises(KeyError, match="unknown strategy"):
        registry.get("nope")

    @dataclass(frozen=True)
    class Empty:
        """No fields."""

    with pytest.raises(ValueError, match="already registered"):
        registry.register("finetune", Empty, tasks=("classification",))(lambda *a: None)
    with pytest.raises(ValueError, match="tasks"):
        registry.register("new-one", Empty, tasks=("audio",))


def test_parameters_are_coerced_like_unlearns():
    assert registry.parse_config("lwf", {"alpha": 1}).alpha == 1.0  # ints accepted for floats
    for bad in ({"alpha": True}, {"alpha": float("nan")}, {"weight_mode": "sometimes"}):
        with pytest.raises(InvalidParameterError) as error:
            registry.parse_config("gere" if "weight_mode" in bad else "lwf", bad)
        assert error.value.field == next(iter(bad))


def test_unlearn_registry_keeps_its_names_after_the_move():
    assert unlearn.registry.require is unlearn.config.require
    assert unlearn.registry._coerce is unlearn.config.coerce
    with pytest.raises(InvalidParameterError) as error:
        unlearn.registry.parse_config("ssd", {"alpah": 1.0})
    assert error.value.field == "alpah"


@pytest.mark.parametrize("name", sorted(n for n in REQUIRED if n.startswith("wise-ft+")))
def test_each_wise_ft_config_is_its_base_config_plus_wise_fts_fields(name):
    config_cls = registry.get(name).config_cls
    base_cls = registry.get(name.split("+", 1)[1]).config_cls
    expected = ([(f.name, f.default) for f in dataclasses.fields(base_cls)]
                + [(f.name, f.default) for f in dataclasses.fields(wise_ft.WiseFTSettings)])
    assert [(f.name, f.default) for f in dataclasses.fields(config_cls)] == expected
    assert registry.get(name).tasks == registry.get(name.split("+", 1)[1]).tasks
    with pytest.raises(InvalidParameterError) as error:  # the base's own range checks apply
        registry.parse_config(name, {"lr_scale": -1.0})
    assert error.value.field == "lr_scale"
