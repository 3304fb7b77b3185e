"""The output activations of the geometry heads, chosen by name (`G2VLMConfig.depth_activation`,
`G2VLMConfig.confidence_activation`) and resolved here, in one place."""

from __future__ import annotations

from collections.abc import Callable

import torch


def _identity(values: torch.Tensor) -> torch.Tensor:
    return values


def _exp_plus_one(values: torch.Tensor) -> torch.Tensor:
    return 1.0 + torch.exp(values)


HEAD_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exp": torch.exp,  # G²VLM / Pi3 depth: the head predicts log depth, so depth > 0
    "expp1": _exp_plus_one,  # VGGT's confidence: > 1
    "linear": _identity,  # G²VLM's confidence: unnormalised scores
    "sigmoid": torch.sigmoid,
}


def get_head_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called `name`; a ValueError naming the choices for an unknown one."""
    if name not in HEAD_ACTIVATIONS:
        raise ValueError(f"Unknown geometry-head activation {name!r}; choose one of {sorted(HEAD_ACTIVATIONS)}.")
    return HEAD_ACTIVATIONS[name]


__all__ = ["HEAD_ACTIVATIONS", "get_head_activation"]
