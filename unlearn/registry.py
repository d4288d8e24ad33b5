"""Methods by stable name, each with a frozen config dataclass and one entry function.

The family signature is ``run(model, request, config) -> UnlearnResult``. The service never reaches into
a method: it looks the method up here, validates the client's parameters with :func:`parse_config`
(unknown or ill-typed keys raise :class:`InvalidParameterError` naming the field) and calls ``run``.
"""

from __future__ import annotations

import dataclasses
import functools
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
from unlearn.errors import InvalidDataError, InvalidParameterError, UnknownMethodError, UnsupportedTaskError
from unlearn.heldout import HeldOutScores
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
    training set D = Dr u Df, cached per model version; ``tune_scores``, when the caller precomputed them for
    this model version (:mod:`unlearn.heldout`), are the unchanged model's per-record losses and correctness on
    ``tune``, in ``tune``'s order (a method may use them instead of a pass over ``tune`` on the unchanged
    weights; None means compute); ``model_factory`` and ``recipe`` describe the
    original training, for the retrain and fine-tune baselines. ``forget_classes`` is set for whole-class
    erasure (the retrained model then never predicts those classes).
    """

    task: TaskAdapter
    forget: ExampleSet
    retain: ExampleSet | None = None
    tune: ExampleSet | None = None
    train_importance: TrainImportance | None = None
    tune_scores: HeldOutScores | None = None
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

    def precomputed_tune_scores(self) -> HeldOutScores | None:
        """``tune_scores`` when given, refused (naming the field) when their count is not ``tune``'s."""
        scores = self.tune_scores
        if scores is not None and len(scores.losses) != (0 if self.tune is None else len(self.tune)):
            raise InvalidDataError("tune_scores", f"{len(scores.losses)} precomputed score(s) for "
                                   f"{0 if self.tune is None else len(self.tune)} tune record(s)")
        return scores

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

    One exception: a method that decides to leave the weights unchanged may return the caller's own model
    object rather than a copy (``ssd-auto`` when the forget set is already at the never-seen level; copying a
    model costs more than that whole decision). Callers treat ``model`` as read-only: they evaluate, export
    and register it, and train only copies.

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
    tasks: tuple[str, ...] = ("classification", "causal_lm")  # task adapter names (TaskAdapter.name) it runs on
    model_check: Callable[[nn.Module], str | None] | None = None  # None = any model of those tasks
    needs_training: bool = False  # needs the original model factory and recipe (retrain, shrink-perturb)


TASK_NAMES = ("classification", "causal_lm")
"""Task names a method may declare: the service's task types, which name the task adapters
(:attr:`unlearn.tasks.TaskAdapter.name`; the causal-LM adapter spells its name ``causal-lm``, so names are
compared with ``-`` and ``_`` alike, :func:`task_key`)."""


def task_key(task_name: str) -> str:
    """The canonical form of a task name: ``causal-lm`` (the adapter) and ``causal_lm`` (the service) agree."""
    return task_name.replace("-", "_")

_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, config_cls: type, *, needs_retain: bool, exact: bool = False, erases: str = "any",
             tasks: tuple[str, ...] = TASK_NAMES, model_check: Callable[[nn.Module], str | None] | None = None,
             needs_training: bool = False):
    """Decorator registering ``run`` under ``name``; duplicate or malformed names are rejected.

    ``erases="classes"`` marks a method that only erases whole classes, so a caller can refuse a record
    erasure up front instead of failing inside the method. ``tasks`` names the task adapters the method
    supports (default: every adapter, for methods written against :class:`~unlearn.tasks.TaskAdapter` alone);
    ``needs_training`` marks a method that cannot run without the original model factory and training recipe
    (a default chain leaves it out when none is registered);
    ``model_check(model)`` returns why a model of a supported task still cannot be served (e.g. GS-LoRA
    needs a vision transformer), or None. :func:`supports` answers both for callers.
    """
    if erases not in ("any", "classes"):
        raise ValueError(f"erases must be 'any' or 'classes', got {erases!r}")
    if not tasks or any(task not in TASK_NAMES for task in tasks):
        raise ValueError(f"tasks of {name!r} must be a non-empty subset of {TASK_NAMES}, got {tasks!r}")
    if not _NAME.match(name):
        raise ValueError(f"method name {name!r} must be lowercase letters, digits, '-' or '+'")
    if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
        raise TypeError(f"config of {name!r} must be a frozen dataclass")

    def decorate(run):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        summary = (run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else name
        _REGISTRY[name] = MethodSpec(name, config_cls, run, summary, needs_retain, exact, erases, tuple(tasks),
                                     model_check, needs_training)
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


def supports(name: str, task_name: str, model: nn.Module | None = None) -> bool:
    """Can method ``name`` run on a model of task ``task_name`` (and on ``model``, when given)?

    For the service at registration (a model's policy chain) and at submission (a requested method).
    :func:`unsupported_reason` says why not.
    """
    return unsupported_reason(name, task_name, model) is None


def unsupported_reason(name: str, task_name: str, model: nn.Module | None = None) -> str | None:
    """None when ``name`` supports ``task_name`` (and ``model``), else a sentence saying why not."""
    spec = get(name)
    if task_key(task_name) not in spec.tasks:
        return (f"method {name!r} supports task(s) {', '.join(spec.tasks)}, not {task_name!r}")
    if model is not None and spec.model_check is not None:
        reason = spec.model_check(model)
        if reason:
            return f"method {name!r} cannot run on this model: {reason}"
    return None


def names_for(task_name: str) -> list[str]:
    """Every registered method that supports ``task_name``, sorted."""
    return [name for name in names() if task_key(task_name) in _REGISTRY[name].tasks]


def _load_builtin() -> None:
    import unlearn.methods  # noqa: F401  (registers the built-in methods on import)


@functools.cache
def _type_hints(config_cls: type) -> dict[str, Any]:
    """The config's field types (resolving them evaluates every annotation: a few tenths of a millisecond)."""
    return typing.get_type_hints(config_cls)


def parse_config(name: str, params: Mapping[str, Any] | None = None) -> Any:
    """Build ``name``'s config from client parameters, rejecting unknown keys and wrong types.

    Ints are accepted for float fields; bools are never accepted as numbers; floats must be finite.
    Range checks live in each config's ``__post_init__`` and raise :class:`InvalidParameterError` too.
    """
    spec = get(name)
    params = dict(params or {})
    hints = _type_hints(spec.config_cls)
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
    reason = unsupported_reason(spec.name, task.name, model)
    if reason is not None:
        raise UnsupportedTaskError(spec.name, task.name, reason)
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
    """The copy every method and update works on: the caller's model is never changed.

    The copy keeps each parameter's ``requires_grad`` flag as the model was registered. A frozen parameter (a
    pretrained backbone, fixed random features) was not trained on the data, so it carries none of the records'
    influence, and the exact retrain does not train it either (:func:`unlearn.training.train_model` trains the
    flagged parameters of ``factory(seed)``): no method changes it, and the returned model keeps it frozen for
    the next request. A model with no trainable parameter at all (saved for inference with every flag off) is
    taken as trainable throughout.
    """
    import copy

    clone = copy.deepcopy(model)
    flags = trainable_flags(clone)
    for name, parameter in clone.named_parameters():
        parameter.requires_grad_(flags[name])
    return clone


def trainable_flags(model: nn.Module) -> dict[str, bool]:
    """Each parameter's ``requires_grad`` as Lethe treats it (:func:`copy_model`): as registered, or True for
    every one when every flag is off."""
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    return flags if any(flags.values()) else dict.fromkeys(flags, True)


def model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device
