"""One device choice, made once and passed down (no hidden ``.cuda()`` calls anywhere else)."""

from __future__ import annotations

import torch

from unlearn.errors import InvalidParameterError


def resolve_device(preference: str = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a device.

    ``auto`` picks CUDA when it is available and the CPU otherwise. Asking for CUDA on a machine without
    it is an error rather than a silent fall-back, so a GPU deployment that lost its GPU is noticed.
    """
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cpu":
        return torch.device("cpu")
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidParameterError("device", f"{preference!r} requested but CUDA is not available")
        return torch.device(preference)
    raise InvalidParameterError("device", f"expected 'auto', 'cpu' or 'cuda[:N]', got {preference!r}")
