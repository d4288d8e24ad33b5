"""Typed errors of the continual-learning library, on top of :mod:`unlearn.errors`.

The service translates them in its one error table: every error here is an :class:`unlearn.errors.UnlearnError`
and names the field (and, for data, the index) the client must fix.
"""

from __future__ import annotations

from unlearn.errors import InvalidDataError, InvalidParameterError, UnlearnError


class ErasedDataError(InvalidDataError):
    """The update (or a buffer or data set the strategy would train on) holds an erased subject, record or class.

    Raised before any training: re-exposure re-creates membership almost at once, so an update that carries
    erased data is refused, never filtered silently. ``field`` names the offending field (e.g.
    ``update_subject_hashes``, ``update.labels``), ``index`` the first offending row.
    """

    def __init__(self, field: str, index: int, reason: str):
        super().__init__(field, f"row {index}: {reason}")
        self.index = index


class UnsupportedTaskError(InvalidParameterError):
    """The strategy does not support the model's task kind (e.g. ``gere`` on a classifier).

    ``field`` is ``strategy``: the client picked a strategy the model's task cannot run.
    """

    def __init__(self, strategy: str, task_kind: str, supported: tuple[str, ...]):
        super().__init__("strategy", f"strategy {strategy!r} does not support {task_kind!r} models; "
                                     f"it supports: {', '.join(supported)}")
        self.strategy = strategy
        self.task_kind = task_kind
        self.supported = supported


class BufferIntegrityError(UnlearnError):
    """A persisted replay buffer does not match its manifest (torn write, tampering, foreign file)."""


class UnknownStrategyError(UnlearnError, KeyError):
    """No strategy is registered under this name."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(f"unknown strategy {name!r}; registered: {', '.join(sorted(known))}")
        self.name = name
        self.known = sorted(known)

    def __str__(self) -> str:  # KeyError would quote the whole message otherwise
        return self.args[0]
