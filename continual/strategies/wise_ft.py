"""``wise-ft+<base>``: WiSE-FT weight interpolation around any incremental strategy (Wortsman et al., CVPR
2022, arXiv 2109.01903; Lin et al., arXiv 2309.06256, found pre/post interpolation the best trade-off
between a new skill and forgetting).

Run the base strategy (``finetune``, ``replay``, ``lwf``, ``ewc``, ``hft`` or ``gere``), then return

    theta(a) = (1 - a) * theta* + a * theta_updated

with theta* the model the update starts from (the current, post-erasure version: the interpolation anchor)
and a chosen on the request's ``tune`` split as the LARGEST coefficient on the grid 1, 1 - 1/n, ..., 0
(n = ``grid_steps``) whose tune accuracy passes the utility floor

    accuracy(theta(a), tune) >= accuracy(theta*, tune) - max_utility_drop.

a = 0 is the current version itself, which always passes: when nothing above 0 passes, the update is not
learned at all and ``target_reached`` is False. Floating-point parameters and buffers (e.g. batch-norm
running statistics) are interpolated; integer buffers (batch counters) come from the updated model. The
tune split is the one data set a strategy may select on: the benchmark evaluates on other data and says so.

The base strategy's buffer is passed on as it returned it (its stored logits are the updated model's);
a carried state (EWC's Fisher) is re-bound to the interpolated weights, so the next update can use it.

Mutates in place: no (the base strategy works on a copy; the interpolation builds another).

Differences from the paper: the paper picks a on held-out accuracy of the new task (or fixes 0.5); here
it is the largest a that keeps the old skills above a floor, which is what a service's update gate
checks. Each wrapper's config is written out below (the base's fields, then WiSE-FT's).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from continual.registry import CAUSAL_LM, CLASSIFICATION, UpdateRequest, UpdateResult, get, register
from continual.state import StrategyState
from continual.strategies.ewc import EWCConfig
from continual.strategies.finetune import FinetuneConfig
from continual.strategies.gere import GeReConfig
from continual.strategies.hft import HFTConfig
from continual.strategies.lwf import LwFConfig
from continual.strategies.replay import ReplayConfig
from unlearn.config import require
from unlearn.tasks import accuracy


@dataclass(frozen=True)
class WiseFTSettings:
    """WiSE-FT's own hyper-parameters (arXiv 2109.01903); every ``wise-ft+<base>`` config has them too.

    max_utility_drop: the utility floor: a coefficient passes when the tune accuracy of theta(a) is at least
        the current version's minus this (0.02 = 2 points). Lethe default 0.02.
    grid_steps: n, the coefficient grid 1, 1 - 1/n, ..., 0 (the paper evaluates a grid of alphas).
        Lethe default 10.
    """

    max_utility_drop: float = 0.02
    grid_steps: int = 10

    def __post_init__(self) -> None:
        require(0 <= self.max_utility_drop <= 1, "max_utility_drop", f"must be in [0, 1], got {self.max_utility_drop}")
        require(1 <= self.grid_steps <= 1000, "grid_steps", f"must be in [1, 1000], got {self.grid_steps}")


def _split(config: Any, base_cls: type) -> tuple[Any, WiseFTSettings]:
    """(base config, WiSE-FT settings) from a wrapper config: each built, so each validates its own fields."""
    base = base_cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(base_cls)})
    settings = WiseFTSettings(**{f.name: getattr(config, f.name) for f in dataclasses.fields(WiseFTSettings)})
    return base, settings


@dataclass(frozen=True)
class WiseFTFinetuneConfig:
    """``wise-ft+finetune``: FinetuneConfig's fields (epochs, lr_scale), then WiSE-FT's (max_utility_drop,
    grid_steps); see :class:`FinetuneConfig` and :class:`WiseFTSettings` for their meaning and defaults."""

    epochs: int = 0
    lr_scale: float = 1.0
    max_utility_drop: float = 0.02
    grid_steps: int = 10

    def __post_init__(self) -> None:
        _split(self, FinetuneConfig)

    def split(self) -> tuple[FinetuneConfig, WiseFTSettings]:
        return _split(self, FinetuneConfig)


@dataclass(frozen=True)
class WiseFTReplayConfig:
    """``wise-ft+replay``: ReplayConfig's fields (alpha, beta, buffer_batch_size, stored_logits, epochs,
    lr_scale), then WiSE-FT's (max_utility_drop, grid_steps); see :class:`ReplayConfig` and
    :class:`WiseFTSettings`."""

    alpha: float = 0.3
    beta: float = 0.5
    buffer_batch_size: int = 0
    stored_logits: Literal["insertion", "current"] = "insertion"
    epochs: int = 0
    lr_scale: float = 1.0
    max_utility_drop: float = 0.02
    grid_steps: int = 10

    def __post_init__(self) -> None:
        _split(self, ReplayConfig)

    def split(self) -> tuple[ReplayConfig, WiseFTSettings]:
        return _split(self, ReplayConfig)


@dataclass(frozen=True)
class WiseFTLwFConfig:
    """``wise-ft+lwf``: LwFConfig's fields (alpha, temperature, epochs, lr_scale), then WiSE-FT's
    (max_utility_drop, grid_steps); see :class:`LwFConfig` and :class:`WiseFTSettings`."""

    alpha: float = 0.5
    temperature: float = 2.0
    epochs: int = 0
    lr_scale: float = 1.0
    max_utility_drop: float = 0.02
    grid_steps: int = 10

    def __post_init__(self) -> None:
        _split(self, LwFConfig)

    def split(self) -> tuple[LwFConfig, WiseFTSettings]:
        return _split(self, LwFConfig)


@dataclass(frozen=True)
class WiseFTEWCConfig:
    """``wise-ft+ewc``: EWCConfig's fields (lam, gamma, fisher_batch_size, epochs, lr_scale), then WiSE-FT's
    (max_utility_drop, grid_steps); see :class:`EWCConfig` and :class:`WiseFTSettings`."""

    lam: float = 10.0
    gamma: float = 1.0
    fisher_batch_size: int = 1
    epochs: int = 0
    lr_scale: float = 1.0
    max_utility_drop: float = 0.02
    grid_steps: int = 10

    def __post_init__(self) -> None:
        _split(self, EWCConfig)

    def split(self) -> tuple[EWCConfig, WiseFTSettings]:
        return _split(self, EWCConfig)


@dataclass(frozen=True)
class WiseFTHFTConfig:
    """``wise-ft+hft``: HFTConfig's fields (epochs, lr_scale), then WiSE-FT's (max_utility_drop, grid_steps);
    see :class:`HFTConfig` and :class:`WiseFTSettings`."""

    epochs: int = 0
    lr_scale: float = 1.0
    max_utility_drop: float = 0.02
    grid_steps: int = 10

    def __post_init__(self) -> None:
        _split(self, HFTConfig)

    def split(self) -> tuple[HFTConfig, WiseFTSettings]:
        return _split(self, HFTConfig)


@dataclass(frozen=True)
class WiseFTGeReConfig:
    """``wise-ft+gere``: GeReConfig's fields (weight, weight_mode, generic_texts, generic_batch_size, epochs,
    lr_scale), then WiSE-FT's (max_utility_drop, grid_steps); see :class:`GeReConfig` and
    :class:`WiseFTSettings`."""

    weight: float = 100.0
    weight_mode: Literal["fixed", "dynamic"] = "fixed"
    generic_texts: int = 64
    generic_batch_size: int = 0
    epochs: int = 0
    lr_scale: float = 1.0
    max_utility_drop: float = 0.02
    grid_steps: int = 10

    def __post_init__(self) -> None:
        _split(self, GeReConfig)

    def split(self) -> tuple[GeReConfig, WiseFTSettings]:
        return _split(self, GeReConfig)


@torch.no_grad()
def interpolate(anchor: nn.Module, updated: nn.Module, coefficient: float) -> nn.Module:
    """A new model with (1 - a) * anchor + a * updated for every floating-point tensor of the state dict."""
    result = copy.deepcopy(updated)
    anchor_state, updated_state = anchor.state_dict(), updated.state_dict()
    mixed = {name: torch.lerp(anchor_state[name], value, coefficient) if value.is_floating_point() else value.clone()
             for name, value in updated_state.items()}
    result.load_state_dict(mixed)
    return result.eval()


def coefficient_grid(steps: int) -> list[float]:
    """1, 1 - 1/n, ..., 0: largest first."""
    return [round(1.0 - i / steps, 12) for i in range(steps + 1)]


def wise_ft(base_name: str, model: nn.Module, request: UpdateRequest, config: Any) -> UpdateResult:
    """Run ``base_name``, then keep the largest interpolation coefficient that passes the utility floor."""
    tune = request.require_tune(f"wise-ft+{base_name}")  # before any training
    base_config, settings = config.split()
    updated = get(base_name).run(model, request, base_config)
    task = request.task
    floor = accuracy(task, model, tune) - settings.max_utility_drop
    trials, chosen, chosen_model = [], 0.0, model
    for coefficient in coefficient_grid(settings.grid_steps):
        if coefficient == 1.0:
            candidate = updated.model
        elif coefficient == 0.0:
            candidate = copy.deepcopy(model).eval()
        else:
            candidate = interpolate(model, updated.model, coefficient)
        tune_accuracy = accuracy(task, candidate, tune)
        trials.append({"coefficient": coefficient, "tune_accuracy": tune_accuracy})
        if tune_accuracy >= floor - 1e-12:
            chosen, chosen_model = coefficient, candidate
            break
    state = updated.state
    if state is not None:
        state = StrategyState.bound_to(state.strategy, chosen_model, state.tensors)
    details = {**updated.details, "strategy": f"wise-ft+{base_name}",
               "wise_ft": {"coefficient": chosen, "floor": floor, "max_utility_drop": settings.max_utility_drop,
                           "selected_on": "tune", "trials": trials}}
    message = "" if chosen > 0 else "no interpolation coefficient above 0 kept the tune accuracy above the floor"
    return UpdateResult(chosen_model, details=details, target_reached=chosen > 0, message=message,
                        buffer=updated.buffer, state=state)


BOTH = (CLASSIFICATION, CAUSAL_LM)


@register("wise-ft+finetune", WiseFTFinetuneConfig, tasks=BOTH)
def wise_ft_finetune(model: nn.Module, request: UpdateRequest, config: WiseFTFinetuneConfig) -> UpdateResult:
    """Fine-tuning, then WiSE-FT interpolation towards the current version."""
    return wise_ft("finetune", model, request, config)


@register("wise-ft+replay", WiseFTReplayConfig, tasks=BOTH, stores="buffer")
def wise_ft_replay(model: nn.Module, request: UpdateRequest, config: WiseFTReplayConfig) -> UpdateResult:
    """ER / DER++, then WiSE-FT interpolation towards the current version."""
    return wise_ft("replay", model, request, config)


@register("wise-ft+lwf", WiseFTLwFConfig, tasks=BOTH)
def wise_ft_lwf(model: nn.Module, request: UpdateRequest, config: WiseFTLwFConfig) -> UpdateResult:
    """LwF, then WiSE-FT interpolation towards the current version."""
    return wise_ft("lwf", model, request, config)


@register("wise-ft+ewc", WiseFTEWCConfig, tasks=BOTH, stores="state")
def wise_ft_ewc(model: nn.Module, request: UpdateRequest, config: WiseFTEWCConfig) -> UpdateResult:
    """Online EWC, then WiSE-FT interpolation towards the current version."""
    return wise_ft("ewc", model, request, config)


@register("wise-ft+hft", WiseFTHFTConfig, tasks=BOTH)
def wise_ft_hft(model: nn.Module, request: UpdateRequest, config: WiseFTHFTConfig) -> UpdateResult:
    """Half fine-tuning, then WiSE-FT interpolation towards the current version."""
    return wise_ft("hft", model, request, config)


@register("wise-ft+gere", WiseFTGeReConfig, tasks=(CAUSAL_LM,))
def wise_ft_gere(model: nn.Module, request: UpdateRequest, config: WiseFTGeReConfig) -> UpdateResult:
    """GeRe, then WiSE-FT interpolation towards the current version."""
    return wise_ft("gere", model, request, config)
