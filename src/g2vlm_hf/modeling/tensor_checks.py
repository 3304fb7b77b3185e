"""The check that an argument is a `torch.Tensor`, with the same error (and NumPy hint) wherever it is made."""

from __future__ import annotations

import torch


def require_tensor(name: str, value: object, optional: bool = False) -> None:
    """Raise a TypeError naming `name` unless `value` is a tensor (or None, when `optional`)."""
    if (value is None and optional) or isinstance(value, torch.Tensor):
        return
    hint = " (from NumPy: torch.from_numpy(array))" if type(value).__module__ == "numpy" else ""
    raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}{hint}.")
