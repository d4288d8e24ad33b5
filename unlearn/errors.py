"""Typed errors of the unlearning library.

Every error names what was wrong (a field, a data set) so that the service can translate it into a
precise gRPC status with field-level details, in one place. No error leaves the caller's model changed:
methods validate everything before they touch a copy of the weights.
"""

from __future__ import annotations


class UnlearnError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidParameterError(UnlearnError, ValueError):
    """A hyper-parameter is unknown, of the wrong type, or out of range.

    ``field`` is the parameter's name as the caller spelled it, so a client can point at it.
    """

    def __init__(self, field: str, reason: str):
        super().__init__(f"parameter {field!r}: {reason}")
        self.field = field
        self.reason = reason


class InvalidDataError(UnlearnError, ValueError):
    """Input data cannot be used: empty, non-finite, wrong shape, or an impossible split.

    ``field`` names the data set (``forget``, ``retain``, ``holdout``...).
    """

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class UnknownMethodError(UnlearnError, KeyError):
    """No method is registered under this name."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(f"unknown method {name!r}; registered: {', '.join(sorted(known))}")
        self.name = name
        self.known = sorted(known)

    def __str__(self) -> str:  # KeyError would quote the whole message otherwise
        return self.args[0]


class CacheMismatchError(UnlearnError):
    """A cached artefact (importance, trained model) does not belong to the model or data at hand."""


class UnsupportedTaskError(InvalidParameterError):
    """The method does not support the model's task (or this model): a request naming it is invalid.

    An :class:`InvalidParameterError` on the field ``method``, so callers that map parameter errors to
    INVALID_ARGUMENT with field violations need no new case; ``method`` and ``task`` say which pair failed.
    """

    def __init__(self, method: str, task: str, reason: str):
        super().__init__("method", reason)
        self.method = method
        self.task = task


class Cancelled(UnlearnError):
    """A long computation gave way when its caller asked it to stop (e.g. a background precomputation)."""
