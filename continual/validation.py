"""Everything an update request must satisfy before any weight is touched.

:func:`validate_request` runs inside :func:`continual.registry.run` before the strategy. Each refusal names
the field and, for data, the first offending row, so the service can return a precise field violation:

- an empty update (``update``), keys that are missing, blank, duplicated or not row-aligned
  (``update_record_ids``, ``update_subject_hashes``);
- erased data (:class:`~continual.errors.ErasedDataError`): an update record or subject that was erased on
  the lineage, a label of an erased class in the update, the retain or tune data or the buffer, or a buffered
  row of an erased record or subject (the buffer should have been purged);
- classification: non-float or non-finite inputs (``<set>.inputs``), labels that are not int64 or lie
  outside the model's head (``<set>.labels``; the classification adapter cannot add outputs to a head, so a
  new class needs a head that already has an output for it), inputs whose shape the model rejects;
- causal LM: token ids outside the model's vocabulary (``<set>.input_ids``) and the adapter's own checks
  (context length, answer masks);
- ``new_classes`` outside the head, ``update_epochs`` below 1, sets whose fields disagree with the update's.
"""

from __future__ import annotations

import torch
from torch import nn

from continual.errors import ErasedDataError
from continual.registry import CAUSAL_LM, CLASSIFICATION, UpdateRequest, task_kind
from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.tasks import TaskAdapter


def validate_request(strategy: str, model: nn.Module, request: UpdateRequest) -> None:
    """Raise the first problem of ``request`` for ``strategy`` (module docstring); return None when it is usable."""
    task, update = request.task, request.update
    kind = task_kind(task)
    if len(update) == 0:
        raise InvalidDataError("update", "is empty: an update needs at least one record to learn")
    if request.update_epochs < 1:
        raise InvalidDataError("update_epochs", f"must be >= 1, got {request.update_epochs}")
    _check_keys("update_record_ids", request.update_record_ids, len(update), unique=True)
    _check_keys("update_subject_hashes", request.update_subject_hashes, len(update), unique=False)
    _refuse_erased_keys("update_record_ids", request.update_record_ids, request.erased_record_ids, "record")
    _refuse_erased_keys("update_subject_hashes", request.update_subject_hashes, request.erased_subject_hashes,
                        "subject")
    _check_new_classes(task, kind, request.new_classes)
    check_examples(task, kind, model, update, "update", request.erased_classes)
    for name in ("retain", "tune"):
        examples = getattr(request, name)
        if examples is not None and len(examples) > 0:
            _same_fields(name, examples, update)
            check_examples(task, kind, model, examples, name, request.erased_classes)
    buffer = request.buffer
    if buffer is not None and len(buffer) > 0:
        _refuse_erased_keys("buffer.record_ids", buffer.record_ids, request.erased_record_ids, "record")
        _refuse_erased_keys("buffer.subject_hashes", buffer.subject_hashes, request.erased_subject_hashes, "subject")
        _same_fields("buffer", buffer.examples(), update)
        check_examples(task, kind, model, buffer.examples(), "buffer", request.erased_classes)


def check_examples(task: TaskAdapter, kind: str, model: nn.Module, examples: ExampleSet, field: str,
                   erased_classes: frozenset[int] = frozenset()) -> None:
    """Row-level checks naming the first offending row, then the adapter's own :meth:`validate`."""
    if kind == CLASSIFICATION:
        _check_classification(task, examples, field, erased_classes)
    elif kind == CAUSAL_LM:
        _check_causal_lm(model, examples, field)
    task.validate(model, examples, field)


def _check_classification(task: TaskAdapter, examples: ExampleSet, field: str, erased_classes: frozenset[int]) -> None:
    for name in ("inputs", "labels"):
        if name not in examples.tensors:
            raise InvalidDataError(f"{field}.{name}", f"missing tensor {name!r}")
    inputs, labels = examples["inputs"], examples["labels"]
    if not inputs.is_floating_point():
        raise InvalidDataError(f"{field}.inputs", f"must be floating point, got {inputs.dtype}")
    bad = (~torch.isfinite(inputs)).reshape(len(inputs), -1).any(dim=1)
    if bool(bad.any()):
        raise InvalidDataError(f"{field}.inputs", f"row {_first(bad)}: NaN or inf "
                               f"({int(bad.sum())} rows in all); nothing was trained")
    if labels.dim() != 1 or labels.dtype != torch.long:
        raise InvalidDataError(f"{field}.labels", f"must be a 1-D int64 tensor, got {labels.dtype} of shape "
                               f"{tuple(labels.shape)}")
    outside = (labels < 0) | (labels >= task.num_classes)
    if bool(outside.any()):
        row = _first(outside)
        raise InvalidDataError(f"{field}.labels", f"row {row}: label {int(labels[row])} is not one of the model's "
                               f"{task.num_classes} classes [0, {task.num_classes}); the classification adapter "
                               "cannot grow a head, so a new class needs a model whose head already has its output")
    if erased_classes:
        erased = torch.isin(labels, torch.tensor(sorted(erased_classes), dtype=torch.long))
        if bool(erased.any()):
            row = _first(erased)
            raise ErasedDataError(f"{field}.labels", row, f"class {int(labels[row])} was erased from this lineage "
                                  "and may not be learned again")


def _check_causal_lm(model: nn.Module, examples: ExampleSet, field: str) -> None:
    if "input_ids" not in examples.tensors:
        raise InvalidDataError(f"{field}.input_ids", "missing tensor 'input_ids'")
    ids = examples["input_ids"]
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise InvalidDataError(f"{field}.input_ids", f"must be a 2-D int64 tensor, got {ids.dtype} of shape "
                               f"{tuple(ids.shape)}")
    vocab = int(model.get_input_embeddings().weight.shape[0])
    outside = ((ids < 0) | (ids >= vocab)).any(dim=1)
    if bool(outside.any()):
        row = _first(outside)
        bad = ids[row][(ids[row] < 0) | (ids[row] >= vocab)][0]
        raise InvalidDataError(f"{field}.input_ids", f"row {row}: token id {int(bad)} is outside the model's "
                               f"vocabulary [0, {vocab})")


def _check_keys(field: str, keys, count: int, unique: bool) -> None:
    if keys is None or len(keys) != count:
        raise InvalidDataError(field, f"needs one key per update row: {count} rows, "
                               f"{0 if keys is None else len(keys)} keys")
    for index, key in enumerate(keys):
        if not isinstance(key, str) or not key.strip():
            raise InvalidDataError(field, f"row {index}: keys must be non-empty strings, got {key!r}")
    if unique and len(set(keys)) != count:
        seen: set[str] = set()
        for index, key in enumerate(keys):
            if key in seen:
                raise InvalidDataError(field, f"row {index}: record id {key!r} appears twice")
            seen.add(key)


def _refuse_erased_keys(field: str, keys, erased: frozenset[str], what: str) -> None:
    if not erased:
        return
    remedy = " (purge the buffer after every erasure)" if field.startswith("buffer") else ""
    for index, key in enumerate(keys):
        if key in erased:
            raise ErasedDataError(field, index, f"this {what} was erased from the lineage and may not be learned "
                                  f"again{remedy}")


def _check_new_classes(task: TaskAdapter, kind: str, new_classes: tuple[int, ...]) -> None:
    if not new_classes:
        return
    if kind != CLASSIFICATION:
        raise InvalidDataError("new_classes", "only classification updates add classes")
    for index, label in enumerate(new_classes):
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < task.num_classes:
            raise InvalidDataError("new_classes", f"entry {index}: {label!r} is not one of the model's "
                                   f"{task.num_classes} outputs; the classification adapter cannot grow a head")


def _same_fields(field: str, examples: ExampleSet, update: ExampleSet) -> None:
    if set(examples.tensors) != set(update.tensors):
        raise InvalidDataError(field, f"has fields {sorted(examples.tensors)}, the update {sorted(update.tensors)}: "
                               "they must match")


def _first(mask: torch.Tensor) -> int:
    return int(mask.nonzero()[0])
