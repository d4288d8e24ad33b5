"""Model objects of recently used versions, kept in memory by the process that used them (:class:`LoadedModels`)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from torch import nn

from unlearn.importance import weights_digest

log = logging.getLogger(__name__)


class LoadedModels:
    """The model objects of the versions this process used or registered last (at most ``capacity``).

    In the steady state a job registers version v+1 and the next job on the lineage starts from it: without
    this it loads v+1 back from MLflow (a deserialisation, and then a cold first forward pass inside the
    method's timed work), although the object is still in memory. A job puts its result version here once
    MLflow holds it, and the base version it loaded; the next job takes it from here.

    Safety: methods never change the caller's model (:mod:`unlearn.registry`), but a model object handed
    out twice must not carry a change a bug made to it. Each entry keeps the weights digest it was put with
    and :meth:`get` recomputes it (0.2 ms for the digits CNN); an object whose weights no longer match is
    dropped, logged as an error and loaded again from MLflow. One job uses an entry at a time (a lineage's
    jobs run one at a time); the background precomputation (:mod:`service.prefetch`) loads its own copy.
    ``capacity`` 0 turns the cache off.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], tuple[nn.Module, Any, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_name: str, version: str) -> tuple[nn.Module, Any] | None:
        """(model, tokenizer or None) of the version, or None when it is not held (or was changed)."""
        with self._lock:
            entry = self._entries.get((model_name, version))
            if entry is not None:
                self._entries.move_to_end((model_name, version))
        if entry is None:
            return None
        model, tokenizer, digest = entry
        if weights_digest(model) != digest:
            log.error("the in-memory copy of %s version %s was changed in place since it was kept; dropped and "
                      "loaded again from MLflow", model_name, version)
            self.forget(model_name, version)
            return None
        return model, tokenizer

    def put(self, model_name: str, version: str, model: nn.Module, tokenizer: Any = None,
            digest: str | None = None) -> None:
        """Keep ``model`` as ``version`` (``digest``: its weights digest, when the caller already has it)."""
        if self.capacity <= 0:
            return
        digest = digest or weights_digest(model)
        with self._lock:
            self._entries[(model_name, version)] = (model, tokenizer, digest)
            self._entries.move_to_end((model_name, version))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def digest(self, model_name: str, version: str) -> str | None:
        """The weights digest the version was kept with (checked by the last :meth:`get`), or None."""
        with self._lock:
            entry = self._entries.get((model_name, version))
        return None if entry is None else entry[2]

    def forget(self, model_name: str, version: str | None = None) -> None:
        """Drop one version, or every version of ``model_name``."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == model_name and version in (None, k[1])]:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
