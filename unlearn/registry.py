"""Methods by stable name, each with a frozen config dataclass and one entry function.

The family signature is ``run(model, request, config) -> UnlearnResult``. The service never reaches into
a method: it looks the method up here, validates the client's parameters with :func:`parse_config`
(unknown or ill-typed keys raise :class:`InvalidParameterError` naming the field) and calls ``run``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from unlearn.config import coerce as _coerce  # shared with continual.registry
from unlearn.config import require  # noqa: F401  (re-exported: methods import it from here)
from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError, InvalidParameterError, UnknownMethodError
from unlearn.importance import TrainImportance
from unlearn.tasks import TaskAdapter
from unlearn.training import TrainRecipe

ProgressCallback = Callable[[float, str], None]
_NAME = re.compile(r"^[a-z0-9][a-z0-9+\-]*$")


@dataclass
class UnlearnRequest:
    """Everything a method may use. Methods read what they need and validate it first.

    ``forget`` is Df; ``retain`` is Dr (or a sample of it, which the caller reports); ``tune`` never-trained
    records a method may stop or search on (the ``tune`` split of :mod:`unlearn.splits`; the ``audit`` split is
    kept from methods, for the verification gate alone); ``train_importance`` gives I_D over the full
    training set D = Dr u Df, cached per model version; ``model_factory`` and ``recipe`` describe the
    original training, for the retrain and fine-tune baselines. ``forget_classes`` is set for whole-class
    erasure (the retrained model then never predicts those classes).
    """

    task: TaskAdapter
    forget: ExampleSet
    retain: ExampleSet | None = None
    tune: ExampleSet | None = None
    train_importance: TrainImportance | None = None
    model_factory: Callable[[int], nn.Module] | None = None
    recipe: TrainRecipe | None = None
    forget_classes: tuple[int, ...] | None = None
    seed: int = 0
    progress: ProgressCallback | None = None

    def report(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(min(max(fraction, 0.0), 1.0), message)

    def require_retain(self, method: str) -> ExampleSet:
        if self.retain is None or len(self.retain) == 0:
            raise InvalidDataError("retain", f"method {method!r} needs retain data")
        return self.retain

    def require_tune(self, method: str) -> ExampleSet:
        if self.tune is None or len(self.tune) == 0:
            raise InvalidDataError("tune", f"method {method!r} needs never-trained 'tune' records")
        return self.tune

    def require_train_importance(self, method: str) -> TrainImportance:
        if self.train_importance is None:
            raise InvalidDataError("train", f"method {method!r} needs the full training set's importance")
        return self.train_importance

    def require_recipe(self, method: str) -> TrainRecipe:
        if self.recipe is None:
            raise InvalidDataError("recipe", f"method {method!r} needs the original training recipe")
        return self.recipe

    def require_training(self, method: str) -> tuple[Callable[[int], nn.Module], TrainRecipe]:
        recipe = self.require_recipe(method)
        if self.model_factory is None:
            raise InvalidDataError("recipe", f"method {method!r} needs the original model factory")
        return self.model_factory, recipe


@dataclass
class UnlearnResult:
    """A method's output: a NEW model (the caller's is never changed) and honest details.

    ``target_reached`` is the method's own check when it has one (``ssd-auto``), None otherwise; the
    service's verification gate decides independently. ``exact`` marks a true retrain.
    """

    model: nn.Module
    details: dict[str, Any] = field(default_factory=dict)
    target_reached: bool | None = None
    message: str = ""
    exact: bool = False


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    run: Callable[[nn.Module, UnlearnRequest, Any], UnlearnResult]
    summary: str
    needs_retain: bool
    exact: bool
    erases: str = "any"  # "any": records or classes; "classes": whole-class erasure only (e.g. GS-LoRA)


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, config_cls: type, *, needs_retain: bool, exact: bool = False, erases: str = "any"):
    """Decorator registering ``run`` under ``name``; duplicate or malformed names are rejected.

    ``erases="classes"`` marks a method that only erases whole classes, so a caller can refuse a record
    erasure up front instead of failing inside the method.
    """
    if erases not in ("any", "classes"):
        raise ValueError(f"erases must be 'any' or 'classes', got {erases!r}")
    if not _NAME.match(name):
        raise ValueError(f"method name {name!r} must be lowercase letters, digits, '-' or '+'")
    if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
        raise TypeError(f"config of {name!r} must be a frozen dataclass")

    def decorate(run):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        summary = (run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else name
        _REGISTRY[name] = MethodSpec(name, config_cls, run, summary, needs_retain, exact, erases)
        return run

    return decorate


def get(name: str) -> MethodSpec:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(name, list(_REGISTRY)) from None


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    import unlearn.methods  # noqa: F401  (registers the built-in methods on import)


def parse_config(name: str, params: Mapping[str, Any] | None = None) -> Any:
    """Build ``name``'s config from client parameters, rejecting unknown keys and wrong types.

    Ints are accepted for float fields; bools are never accepted as numbers; floats must be finite.
    Range checks live in each config's ``__post_init__`` and raise :class:`InvalidParameterError` too.
    """
    spec = get(name)
    params = dict(params or {})
    hints = typing.get_type_hints(spec.config_cls)
    known = {f.name for f in dataclasses.fields(spec.config_cls) if f.init}
    unknown = sorted(set(params) - known)
    if unknown:
        raise InvalidParameterError(unknown[0], f"unknown parameter for method {name!r}; "
                                    f"known: {', '.join(sorted(known))}")
    values = {key: _coerce(key, value, hints[key]) for key, value in params.items()}
    return spec.config_cls(**values)


def validate_request(spec: MethodSpec, model: nn.Module, request: UnlearnRequest) -> None:
    """Checks shared by every method, before any weight is touched."""
    task = request.task
    task.validate(model, request.forget, "forget")
    if request.retain is not None:
        if len(request.retain) == 0:
            raise InvalidDataError("forget", "the forget set covers the whole training set; nothing would remain")
        task.validate(model, request.retain, "retain")
    if spec.needs_retain:
        request.require_retain(spec.name)
    if request.tune is not None and len(request.tune) > 0:
        task.validate(model, request.tune, "tune")
    if request.train_importance is not None and len(request.forget) >= len(request.train_importance):
        raise InvalidDataError("forget", "the forget set covers the whole training set; nothing would remain")


def run(name: str, model: nn.Module, request: UnlearnRequest,
        params: Mapping[str, Any] | None = None) -> UnlearnResult:
    """Look ``name`` up, validate ``params`` and the request, and run the method on a copy of ``model``."""
    spec = get(name)
    config = parse_config(name, params)
    validate_request(spec, model, request)
    return spec.run(model, request, config)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def copy_model(model: nn.Module) -> nn.Module:
    """The copy every method works on: the caller's model is never changed."""
    import copy

    clone = copy.deepcopy(model)
    for parameter in clone.parameters():
        parameter.requires_grad_(True)
    return clone


def model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device
