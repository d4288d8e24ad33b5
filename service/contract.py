"""The model contract (docs/models.md), proved at registration before Lethe says yes.

Registration (:mod:`service.registration`) calls these checks in order, cheapest first, and writes nothing
unless all of them pass:

1. :func:`training_violations`: ``model_factory`` is ``module:function`` and comes with a ``train_recipe``
   (and the other way round); the recipe's values are converted by :class:`unlearn.training.TrainRecipe`'s
   field types. The recipe travels as a ``google.protobuf.Struct``, where every number is a float:
   ``epochs: 300.0`` becomes ``300``, ``300.5`` is refused, and so are unknown keys and wrong types, each
   naming ``train_recipe.<field>``. The converted recipe is what is stored, so ``retrain`` repeats exactly
   the user's training, never a default.
2. :func:`format_refusal`: how the version was logged, read from its MLmodel file before loading it. A
   classifier must be the ``pytorch`` flavor saved with ``serialization_format="pickle"`` (MLflow 3 saves
   ``pt2`` by default: a ``torch.export`` program, which loads for inference but cannot be trained, so no
   unlearning method can run on it); a causal LM the ``transformers`` flavor.
3. :func:`load_refusal`: loading it. A failure here is the client's (a module missing from ``code_paths``,
   another PyTorch), so it is FAILED_PRECONDITION with the loader's message, not INTERNAL.
4. :func:`forward_violations`: a forward pass on a few ``holdout`` rows (``dataset.features``); for a classifier
   that passes it, :func:`onnx_violations`: the same logits twice in ``eval()`` mode, and the ONNX export the gate
   makes of every new version, with a free batch size, matching PyTorch under onnxruntime (``version``).
5. :func:`factory_violations`: the factory is imported and called once, as ``factory(seed)`` with the
   recipe's seed; the model it builds must have the registered model's parameter and buffer names and
   shapes (its ``state_dict``), or ``retrain`` would train something else. Only a Python function or class
   outside the standard library is ever called (:func:`import_factory`): a client names code the server runs.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from service.domain import FailedPrecondition, FieldViolation, TaskType, id_problem, preview
from unlearn.data import classification_examples
from unlearn.errors import InvalidDataError, InvalidParameterError
from unlearn.registry import trainable_flags
from unlearn.tasks import ClassificationTask
from unlearn.training import TrainRecipe, recipe_from_values

FORWARD_ROWS = 4  # holdout rows fed to the model at registration
MAX_MISMATCHES = 5  # parameter mismatches named in one refusal (the count says how many there are)
DOCS = "docs/models.md"
log = logging.getLogger(__name__)


class FactoryRefused(ValueError):
    """A ``model_factory`` Lethe will not call, whatever it would return."""


def import_factory(target: str) -> Callable[[int], nn.Module]:
    """``module:function`` -> the function (ImportError / AttributeError when it is not there).

    The client names code the server will run, so only a factory can be named: a Python function or class
    of a module outside the standard library. ``os:_exit``, ``shutil:rmtree`` or ``numpy:zeros`` are refused
    (:class:`FactoryRefused`) before they are imported or called.
    """
    module, _, function = target.partition(":")
    if module.partition(".")[0] in sys.stdlib_module_names:
        raise FactoryRefused("a factory from the standard library is not accepted: name your own module")
    factory = getattr(importlib.import_module(module), function)
    if not (inspect.isfunction(factory) or inspect.isclass(factory)):
        raise FactoryRefused(f"a factory must be a Python function or class, not a {type(factory).__name__}")
    return factory


def training_violations(model_factory: str | None, train_recipe: Mapping[str, Any], max_id_length: int = 256
                        ) -> tuple[TrainRecipe | None, list[FieldViolation]]:
    """The converted recipe (None when no training is registered) and the violations of the pair."""
    violations = []
    if model_factory and id_problem(model_factory, max_id_length):
        violations.append(FieldViolation("model_factory", id_problem(model_factory, max_id_length)))
    elif model_factory and (":" not in model_factory or not all(model_factory.partition(":")[::2])):
        violations.append(FieldViolation("model_factory", "expected 'module:function', called as factory(seed: int) "
                                                          f"-> torch.nn.Module ({DOCS})"))
    if bool(model_factory) != bool(train_recipe):
        missing, given = ("train_recipe", "model_factory") if model_factory else ("model_factory", "train_recipe")
        violations.append(FieldViolation(missing, f"{given} was given without {missing}: retrain needs both (the "
                                                  "recipe is not defaulted: give every value your training used)"))
    if not train_recipe:
        return None, violations
    try:
        recipe = recipe_from_values(train_recipe)
    except InvalidParameterError as error:
        return None, violations + [FieldViolation(f"train_recipe.{error.field}", error.reason)]
    return recipe, violations


def stored_training(model_factory: str | None, recipe: TrainRecipe | None) -> dict[str, Any]:
    """What the store and the version's tags keep: every recipe field, with its converted type."""
    return {"model_factory": model_factory, "train_recipe": asdict(recipe) if recipe is not None else {}}


def format_refusal(info: Mapping[str, Any], task_type: TaskType, version_field: str) -> FailedPrecondition | None:
    """A refusal when the version was logged in a flavor or format Lethe cannot unlearn (``info`` from
    :meth:`service.mlflow_registry.MlflowRegistry.flavor_info`), else None."""
    flavors = sorted(info["flavors"])
    if task_type is TaskType.CAUSAL_LM:
        if "transformers" in info["flavors"]:
            return None
        reason = (f"a causal LM must be logged with mlflow.transformers.log_model (with its tokenizer); this version "
                  f"has flavor(s) {flavors}")
    elif "pytorch" not in info["flavors"]:
        reason = (f"a classifier must be logged with mlflow.pytorch.log_model(..., serialization_format='pickle'); "
                  f"this version has flavor(s) {flavors}")
    elif info["serialization_format"] != "pickle":
        reason = (f"serialization_format is {info['serialization_format']!r}: log the model with "
                  "mlflow.pytorch.log_model(model, name=..., serialization_format='pickle', pip_requirements=[...]); "
                  "MLflow 3's default 'pt2' saves a torch.export program, which cannot be trained, so no unlearning "
                  "method can run on it")
    else:
        return None
    return FailedPrecondition(f"the model version cannot be unlearned: {reason} ({DOCS})",
                              (FieldViolation(version_field, reason),))


def load_refusal(error: Exception, version_field: str) -> FailedPrecondition:
    """Loading the client's model failed (a missing module, another PyTorch): the client must fix the model.

    The answer names a missing module (what the client must ship) but otherwise only the error's type: loader
    messages quote the server's paths. The full error is in the server log.
    """
    log.info("registration: the model version could not be loaded", exc_info=error)
    if isinstance(error, ImportError) and error.name:
        reason = (f"MLflow could not load this version: module {preview(error.name)} is not importable where Lethe "
                  f"runs; log the model's own modules with code_paths=[...] or install them there ({DOCS})")
    else:
        reason = (f"MLflow could not load this version ({type(error).__name__}; the server log has the details): "
                  f"log it with the PyTorch version Lethe runs, with its code in code_paths ({DOCS})")
    return FailedPrecondition(f"the model version cannot be loaded: {reason}", (FieldViolation(version_field, reason),))


def holdout_rows(frame: pd.DataFrame):
    """The first ``FORWARD_ROWS`` holdout rows of a classifier's dataset, as examples."""
    holdout = frame[frame["split"] == "holdout"].head(FORWARD_ROWS)
    return classification_examples(
        torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in holdout["features"]])),
        torch.from_numpy(holdout["label"].to_numpy(dtype=np.int64, copy=True)))


def forward_violations(model: nn.Module, frame: pd.DataFrame, num_classes: int) -> list[FieldViolation]:
    """A forward pass on the first holdout rows: the model takes ``features`` and gives ``num_classes`` logits."""
    examples = holdout_rows(frame)
    try:
        ClassificationTask(num_classes).validate(model, examples, "dataset.features")
    except InvalidDataError as error:
        return [FieldViolation(error.field, error.reason)]
    except Exception as error:  # the client's forward(): any exception means it does not take these rows
        return [FieldViolation("dataset.features", f"the model's forward pass failed on {len(examples)} holdout "
                                                   f"row(s) of float32 features: {type(error).__name__}: {error}")]
    return []


def onnx_violations(model: nn.Module, frame: pd.DataFrame, tolerance: float) -> list[FieldViolation]:
    """What the gate does with every new version, once on the first holdout rows: the model must give the same
    logits twice in ``eval()`` mode, export to ONNX (:func:`service.verification.export_onnx`, with a free batch
    size) and match PyTorch within the policy's ``onnx_tolerance`` under onnxruntime. A model that fails any of
    these would pass registration and then fail every erasure at its last step, the request left pending."""
    import tempfile
    from pathlib import Path

    import onnxruntime

    from service.verification import OnnxExportError, export_onnx

    inputs = holdout_rows(frame)["inputs"]
    was_training = model.training
    try:
        with torch.no_grad():
            first, second = model.eval()(inputs), model(inputs)
        if not torch.allclose(first, second, rtol=0.0, atol=1e-6):
            return [FieldViolation("version", "the model is not deterministic in eval() mode: two forward passes on "
                                              f"the same holdout rows differ by up to {(first - second).abs().max():.3g} "
                                              "(a dropout with training=True, or another random draw, in forward()); "
                                              "the gate compares the served ONNX model with PyTorch and would reject "
                                              "every new version")]
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "model.onnx"
            export_onnx(model, inputs, path)
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            exported = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    except OnnxExportError as error:
        return [FieldViolation("version", str(error))]
    except Exception as error:  # the client's architecture: say what the exporter or onnxruntime raised
        return [FieldViolation("version", f"the model cannot be exported to ONNX and run with onnxruntime, as the "
                                          f"gate does for every new version: {type(error).__name__}: {error}")]
    finally:
        model.train(was_training)
    difference = float(np.abs(exported - first.numpy()).max())
    if difference > tolerance:
        return [FieldViolation("version", f"the model's ONNX export differs from PyTorch by {difference:.3g} on holdout "
                                          f"rows, above the policy's onnx_tolerance {tolerance:g}: the gate would "
                                          "reject every new version")]
    return []


def factory_violations(model_factory: str, seed: int, model: nn.Module) -> list[FieldViolation]:
    """Call the factory once as ``factory(seed)``; its model must match ``model``'s state_dict names and shapes.

    Run after the registered model was loaded: MLflow puts the version's ``code_paths`` on ``sys.path`` then,
    so a factory logged with the model imports exactly as it will when ``retrain`` runs.
    """
    try:
        factory = import_factory(model_factory)
    except FactoryRefused as error:
        return [FieldViolation("model_factory", f"{preview(model_factory)}: {error}")]
    except ImportError as error:
        return [FieldViolation("model_factory", f"cannot import {preview(model_factory)} where Lethe runs ({error}); "
                                                "install the module there or log it with the model's code_paths")]
    except AttributeError:
        return [FieldViolation("model_factory", f"{preview(model_factory)}: the module has no such function")]
    try:
        fresh = factory(seed)
    except Exception as error:  # the client's code: report what it raised
        return [FieldViolation("model_factory", f"{model_factory}({seed}) raised {type(error).__name__}: {error}; "
                                                "it is called as factory(seed: int) -> torch.nn.Module")]
    if not isinstance(fresh, nn.Module):
        return [FieldViolation("model_factory", f"{model_factory}({seed}) returned {type(fresh).__name__}, expected "
                                                "a torch.nn.Module")]
    mismatches = state_mismatches(model.state_dict(), fresh.state_dict())
    if mismatches:
        return [FieldViolation("model_factory", f"{model_factory}({seed}) builds a model that does not match the "
                                                f"registered one ({_listed(mismatches)})")]
    mismatches = frozen_mismatches(model, fresh)
    if mismatches:
        return [FieldViolation("model_factory", f"{model_factory}({seed}) freezes other parameters than the registered "
                                                f"model ({_listed(mismatches)}). The exact retrain trains what the "
                                                "factory leaves trainable, every other method what the registered "
                                                "model does: freeze the same parameters, with the same values, in "
                                                "both (docs/models.md)")]
    return []


def _listed(mismatches: list[str]) -> str:
    shown = "; ".join(mismatches[:MAX_MISMATCHES])
    more = f"; {len(mismatches) - MAX_MISMATCHES} more" if len(mismatches) > MAX_MISMATCHES else ""
    return f"{len(mismatches)} difference(s): {shown}{more}"


def frozen_mismatches(model: nn.Module, fresh: nn.Module) -> list[str]:
    """Parameters frozen (``requires_grad`` false) in one model and trainable in the other, and frozen parameters
    whose values differ: training never moves a frozen parameter, so the original kept the factory's values.

    Why it matters: no method changes a parameter the model was registered with frozen
    (:func:`unlearn.registry.copy_model`). One frozen AFTER training on the data would carry the records'
    influence where no method looks, and a factory that leaves it trainable (or builds other values) retrains
    another model. A registered model with every flag off counts as trainable throughout, as it does there.
    """
    registered, flags = dict(model.named_parameters()), trainable_flags(model)
    built = dict(fresh.named_parameters())
    mismatches = []
    for name, trainable in flags.items():
        if name not in built:  # tied differently; the state_dict check already compared names and shapes
            continue
        if trainable != built[name].requires_grad:
            state = "trainable" if trainable else "frozen"
            mismatches.append(f"{name} is {state} in the registered model and "
                              f"{'frozen' if trainable else 'trainable'} in the factory's")
        elif not trainable and not torch.equal(registered[name].detach().cpu(), built[name].detach().cpu()):
            mismatches.append(f"{name} is frozen in both, with other values in the factory's")
    return mismatches


def state_mismatches(registered: Mapping[str, torch.Tensor], fresh: Mapping[str, torch.Tensor]) -> list[str]:
    """Differences in parameter and buffer names and shapes, in the registered model's order."""
    mismatches = []
    for name, tensor in registered.items():
        if name not in fresh:
            mismatches.append(f"{name} {list(tensor.shape)} is missing from the factory's model")
        elif tuple(fresh[name].shape) != tuple(tensor.shape):
            mismatches.append(f"{name}: registered {list(tensor.shape)}, factory {list(fresh[name].shape)}")
    mismatches += [f"{name} {list(tensor.shape)} is not in the registered model"
                   for name, tensor in fresh.items() if name not in registered]
    return mismatches
