"""What a strategy carries from one update to the next, bound to the weights it belongs to.

Online EWC (Schwarz et al. 2018) keeps the running Fisher F_t = gamma * F_{t-1} + F_new between tasks. In
Lethe that Fisher is derived from training data, so it may not outlive an erasure: a
:class:`StrategyState` records the SHA-256 digest of the weights it was computed for (the update's result),
and the next update uses it only if the model it starts from has exactly those weights. An erasure, a
rollback or any other job in between changes the digest, so the state is ignored and recomputed from the
current retain data at the current version (CONTINUAL.md: "recompute on the retain data at the current
version"). No version counter has to be kept right by hand.

Persisted as one safetensors file whose metadata holds the strategy name and the digest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from continual.errors import BufferIntegrityError
from unlearn.importance import weights_digest


@dataclass(frozen=True)
class StrategyState:
    """Named tensors of one strategy (``strategy``), valid only for the weights with digest ``weights_digest``."""

    strategy: str
    weights_digest: str
    tensors: dict[str, Tensor]

    @classmethod
    def bound_to(cls, strategy: str, model: nn.Module, tensors: dict[str, Tensor]) -> StrategyState:
        return cls(strategy, weights_digest(model), {k: v.detach().cpu() for k, v in tensors.items()})

    def belongs_to(self, strategy: str, model: nn.Module) -> bool:
        """True when this state was produced by ``strategy`` for exactly ``model``'s current weights."""
        return self.strategy == strategy and self.weights_digest == weights_digest(model)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(partial),
                  {"strategy": self.strategy, "weights_digest": self.weights_digest})
        partial.replace(path)  # atomic: a reader sees the whole file or none
        return path

    @classmethod
    def load(cls, path: str | Path) -> StrategyState:
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except Exception as error:  # a torn or foreign file must never be trusted
            raise BufferIntegrityError(f"strategy state {path} is unreadable: {error}") from error
        if "strategy" not in metadata or "weights_digest" not in metadata:
            raise BufferIntegrityError(f"strategy state {path} has no strategy or weights digest")
        return cls(metadata["strategy"], metadata["weights_digest"], tensors)
