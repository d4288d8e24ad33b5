"""Client parameters -> frozen config dataclasses: the coercion both registries share.

:mod:`unlearn.registry` (unlearning methods) and :mod:`continual.registry` (continual-learning strategies)
validate a client's parameters the same way, so that an unknown or ill-typed key is the same
:class:`~unlearn.errors.InvalidParameterError` naming the field, whichever library the job runs:

- :func:`build_config`: rejects unknown keys, coerces every value to its field's annotation, then lets the
  dataclass's ``__post_init__`` check ranges (with :func:`require`);
- :func:`coerce`: one value against one annotation. Ints are accepted for float fields; bools are never
  accepted as numbers; floats must be finite; ``Literal`` fields accept only their choices; optional
  fields accept ``None``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from unlearn.errors import InvalidParameterError


def build_config(config_cls: type, params: Mapping[str, Any] | None, owner: str) -> Any:
    """``config_cls(**params)`` after rejecting unknown keys and coercing values; ``owner`` names the
    method or strategy in error messages (e.g. ``"strategy 'lwf'"``)."""
    params = dict(params or {})
    hints = typing.get_type_hints(config_cls)
    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(params) - known)
    if unknown:
        raise InvalidParameterError(unknown[0], f"unknown parameter for {owner}; known: {', '.join(sorted(known))}")
    return config_cls(**{key: coerce(key, value, hints[key]) for key, value in params.items()})


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` as the type ``annotation`` asks for, or :class:`InvalidParameterError` naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(key, value, option)
            except InvalidParameterError as error:
                errors.append(error.reason)
        raise InvalidParameterError(key, "; ".join(errors))
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise InvalidParameterError(key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise InvalidParameterError(key, f"must be a boolean, got {type(value).__name__}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise InvalidParameterError(key, f"must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidParameterError(key, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InvalidParameterError(key, f"must be finite, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise InvalidParameterError(key, f"must be a string, got {type(value).__name__}")
        return value
    raise InvalidParameterError(key, f"parameters of type {annotation!r} cannot be set by clients")


def require(condition: bool, field_name: str, reason: str) -> None:
    """Range check for config ``__post_init__`` methods."""
    if not condition:
        raise InvalidParameterError(field_name, reason)
