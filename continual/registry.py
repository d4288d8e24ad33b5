"""Continual-learning strategies by stable name: one entry per update job.

The family signature is ``run(model, request, config) -> UpdateResult``, the same shape as
:mod:`unlearn.registry`. The service (issue 13) calls ONE function per job::

    result = continual.registry.run(name, current_model, request, params)

which looks the strategy up, validates ``params`` against its frozen config dataclass (unknown or ill-typed
keys raise :class:`~unlearn.errors.InvalidParameterError` naming the field, through the coercion shared
with :mod:`unlearn.registry` in :mod:`unlearn.config`), refuses a task kind the strategy does not support
(:class:`~continual.errors.UnsupportedTaskError`), validates the request's data (:mod:`continual.validation`:
empty, non-finite, out-of-range, mis-shaped or ERASED data are refused before anything is trained) and runs
the strategy on a copy of ``model``.

What a strategy can reach is exactly what :class:`UpdateRequest` holds: the current model (the ``model``
argument), the update, the current retain data, a purge-aware replay buffer and a state bound to the current
weights. There is no field for an older checkpoint, so a teacher, an anchor or a Fisher can only come from
the version the update starts from.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from continual.buffer import ReplayBuffer
from continual.errors import UnknownStrategyError, UnsupportedTaskError
from continual.state import StrategyState
from unlearn.config import build_config
from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError, InvalidParameterError
from unlearn.tasks import TaskAdapter
from unlearn.training import TrainRecipe

ProgressCallback = Callable[[float, str], None]
_NAME = re.compile(r"^[a-z0-9][a-z0-9+\-]*$")

# Task kinds a strategy declares it supports (``tasks=`` of :func:`register`).
CLASSIFICATION = "classification"  # unlearn.tasks.ClassificationTask: MLP, CNN, the digits ViT
CAUSAL_LM = "causal_lm"  # unlearn.lm.task.CausalLMTask
TASK_KINDS = (CLASSIFICATION, CAUSAL_LM)
_KIND_OF_ADAPTER = {"classification": CLASSIFICATION, "causal-lm": CAUSAL_LM}
DEFAULT_UPDATE_EPOCHS = 10


def task_kind(task: TaskAdapter) -> str:
    """The capability name of a task adapter (``classification`` or ``causal_lm``)."""
    kind = _KIND_OF_ADAPTER.get(getattr(task, "name", ""))
    if kind is None:
        raise InvalidDataError("task", f"unknown task adapter {getattr(task, 'name', task)!r}; "
                               f"continual strategies know {', '.join(TASK_KINDS)}")
    return kind


class StepMonitor(Protocol):
    """Called by every strategy's loop every ``every_steps`` optimiser steps, with the model being trained.

    The benchmark uses it to measure old-task accuracy DURING an update (the stability gap); a service can
    use it for progress evidence. It must leave the model's weights and mode as it found them
    (:func:`unlearn.tasks.accuracy` does), and it sees nothing a strategy could act upon.
    """

    every_steps: int

    def __call__(self, model: nn.Module, step: int) -> None: ...


@dataclass
class UpdateRequest:
    """One update (or the learning half of a rectification) of one model lineage, as a strategy sees it.

    The model to update is not a field: it is ``run``'s ``model`` argument, and it must be the lineage's
    CURRENT version (after every erasure so far). Teachers (LwF), anchors (EWC, WiSE-FT), GeRe's thresholds
    and refreshed replay logits are all taken from it; nothing here can point at an older checkpoint.

    Data (example sets in the task adapter's format, :mod:`unlearn.data`):

    - ``update``: the records to learn. ``update_record_ids`` and ``update_subject_hashes`` are row-aligned
      with it (the service's keyed subject hashes, never subject ids); the replay buffer keys its rows by
      them, and they are checked against the erasures below.
    - ``retain``: the lineage's current training data without the update (after every purge). ``joint``
      retrains on ``retain`` + ``update``; ``ewc`` computes its Fisher on it when no carried state belongs to
      the current weights. Other strategies never read it.
    - ``tune``: examples of the skills the model must keep, on which strategies may select or stop (WiSE-FT
      picks its coefficient on it). Classifiers: never-trained records of the classes the model knows (the
      ``tune`` split of DESIGN.md); causal LMs: a sample of retained questions (recall of trained facts is
      the skill). The service's gate evaluates on other data (the ``audit`` split).
    - ``buffer``: the lineage's purge-aware :class:`~continual.buffer.ReplayBuffer` (replay strategies);
      the strategy never changes the caller's object and returns the buffer to persist in the result.
    - ``state``: what a strategy carried over from the previous update (EWC's online Fisher), bound to the
      weights it belongs to. A state whose weights digest is not the current model's (an erasure or another
      job came in between) is ignored and recomputed, never used.

    Erasures on the lineage (checked before any training; :class:`~continual.errors.ErasedDataError` names
    the field and row): ``erased_subject_hashes`` and ``erased_record_ids`` must not appear in the update's
    keys or the buffer's, ``erased_classes`` not among the labels of the update, the retain data, the tune
    data or the buffer. A rectification passes the OLD record ids in ``erased_record_ids`` and the corrected
    records, under new record ids, in ``update``.

    Training: ``recipe`` is the model's original training recipe (``joint`` repeats it from
    ``model_factory(recipe.seed)``; the other strategies take its optimiser, learning rate and batch size);
    ``update_epochs`` is how many passes over the update an incremental strategy makes unless its own
    ``epochs`` parameter says otherwise. ``new_classes``: classes this update introduces (class-incremental);
    distillation leaves them out, since the current version never learned them. Their labels must still be
    outputs of the model's head: the classification adapter cannot grow a head. ``seed`` makes the run
    reproducible (shuffling, sampling, dropout).

    ``progress`` receives (fraction, message); ``monitor`` is called during training (:class:`StepMonitor`).
    """

    task: TaskAdapter
    update: ExampleSet
    update_record_ids: tuple[str, ...]
    update_subject_hashes: tuple[str, ...]
    recipe: TrainRecipe
    update_epochs: int = DEFAULT_UPDATE_EPOCHS
    retain: ExampleSet | None = None
    tune: ExampleSet | None = None
    buffer: ReplayBuffer | None = None
    state: StrategyState | None = None
    model_factory: Callable[[int], nn.Module] | None = None
    new_classes: tuple[int, ...] = ()
    erased_subject_hashes: frozenset[str] = frozenset()
    erased_record_ids: frozenset[str] = frozenset()
    erased_classes: frozenset[int] = frozenset()
    seed: int = 0
    progress: ProgressCallback | None = None
    monitor: StepMonitor | None = None

    def report(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(min(max(fraction, 0.0), 1.0), message)

    def after_step(self, model: nn.Module, step: int) -> None:
        """Every strategy's loop calls this after each optimiser step (``step`` counts from 1)."""
        if self.monitor is not None and step % self.monitor.every_steps == 0:
            self.monitor(model, step)

    def require_retain(self, strategy: str) -> ExampleSet:
        if self.retain is None or len(self.retain) == 0:
            raise InvalidDataError("retain", f"strategy {strategy!r} needs the lineage's current retain data")
        return self.retain

    def require_tune(self, strategy: str) -> ExampleSet:
        if self.tune is None or len(self.tune) == 0:
            raise InvalidDataError("tune", f"strategy {strategy!r} selects on a tune split of the skills to keep")
        return self.tune

    def require_buffer(self, strategy: str) -> ReplayBuffer:
        if self.buffer is None:
            raise InvalidDataError("buffer", f"strategy {strategy!r} needs the lineage's replay buffer "
                                   "(ReplayBuffer(capacity) for an empty one)")
        return self.buffer

    def require_factory(self, strategy: str) -> Callable[[int], nn.Module]:
        if self.model_factory is None:
            raise InvalidDataError("model_factory", f"strategy {strategy!r} trains from scratch and needs the "
                                   "model factory")
        return self.model_factory


@dataclass
class UpdateResult:
    """A strategy's output: a NEW model (the caller's is never changed) and what to persist with it.

    ``buffer``: the replay buffer after this update (the update's rows offered to its reservoir); the caller
    persists it for the lineage, None when the strategy keeps none. ``state``: what the next update may carry
    (EWC's online Fisher), bound to ``model``'s weights. ``details``: evidence for the job record (seed,
    epochs, steps, the frozen half of HFT, WiSE-FT's coefficient search...). ``target_reached``: the
    strategy's own check when it has one (WiSE-FT: a coefficient above 0 passed the utility floor), None
    otherwise; the service's gate decides independently. ``exact``: a retrain from scratch (``joint``).
    """

    model: nn.Module
    details: dict[str, Any] = field(default_factory=dict)
    target_reached: bool | None = None
    message: str = ""
    exact: bool = False
    buffer: ReplayBuffer | None = None
    state: StrategyState | None = None


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy. ``tasks``: the task kinds it supports; ``stores``: what it keeps between
    updates (``nothing``, ``buffer`` or ``state``), i.e. what an erasure must purge or invalidate."""

    name: str
    config_cls: type
    run: Callable[[nn.Module, UpdateRequest, Any], UpdateResult]
    summary: str
    tasks: tuple[str, ...]
    exact: bool
    stores: str

    def supports(self, kind: str) -> bool:
        return kind in self.tasks


_REGISTRY: dict[str, StrategySpec] = {}
STORES = ("nothing", "buffer", "state")


def register(name: str, config_cls: type, *, tasks: tuple[str, ...], exact: bool = False, stores: str = "nothing"):
    """Decorator registering ``run`` under ``name``; duplicate or malformed names are rejected."""
    if not _NAME.match(name):
        raise ValueError(f"strategy name {name!r} must be lowercase letters, digits, '-' or '+'")
    if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
        raise TypeError(f"config of {name!r} must be a frozen dataclass")
    if not tasks or any(kind not in TASK_KINDS for kind in tasks):
        raise ValueError(f"tasks of {name!r} must be a non-empty subset of {TASK_KINDS}, got {tasks!r}")
    if stores not in STORES:
        raise ValueError(f"stores of {name!r} must be one of {STORES}, got {stores!r}")

    def decorate(run):
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} is already registered")
        summary = (run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else name
        _REGISTRY[name] = StrategySpec(name, config_cls, run, summary, tuple(tasks), exact, stores)
        return run

    return decorate


def get(name: str) -> StrategySpec:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownStrategyError(name, list(_REGISTRY)) from None


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def names_for(kind: str) -> list[str]:
    """The strategies that support a task kind (what a client may choose for a model)."""
    return [name for name in names() if _REGISTRY[name].supports(kind)]


def _load_builtin() -> None:
    import continual.strategies  # noqa: F401  (registers the built-in strategies on import)


def parse_config(name: str, params: Mapping[str, Any] | None = None, task: str | TaskAdapter | None = None) -> Any:
    """Build ``name``'s config from client parameters; with ``task`` (a kind or an adapter), also refuse a
    task kind the strategy does not support. This is what the service calls at submission time."""
    spec = get(name)
    if task is not None:
        require_task(spec, task if isinstance(task, str) else task_kind(task))
    return build_config(spec.config_cls, params, f"strategy {name!r}")


def require_task(spec: StrategySpec, kind: str) -> None:
    if kind not in TASK_KINDS:
        raise InvalidParameterError("task", f"unknown task kind {kind!r}; known: {', '.join(TASK_KINDS)}")
    if not spec.supports(kind):
        raise UnsupportedTaskError(spec.name, kind, spec.tasks)


def run(name: str, model: nn.Module, request: UpdateRequest, params: Mapping[str, Any] | None = None) -> UpdateResult:
    """Look ``name`` up, validate ``params`` and the request, and run the strategy on a copy of ``model``."""
    from continual.validation import validate_request  # validation imports this module's types

    spec = get(name)
    config = parse_config(name, params, request.task)
    validate_request(spec.name, model, request)
    return spec.run(model, request, config)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
