"""Differences between the transformers releases g2vlm-hf runs on, kept in one place.

The Hub copy of the modeling code runs on whatever transformers its user has, so the modeling files ask this module
instead of testing versions themselves. Supported: transformers 5.21 through 5.25 (the bounds in pyproject.toml).

- 5.24 renamed the key/value cache from `past_key_values` to `cache`, in model inputs, in model outputs and in the
  generation and masking utilities (the old name is deprecated until 5.40).
- 5.25 made `kernels` a dependency and `from_pretrained` kernelize every model unless told not to
  (`use_kernels=None` means True): see `HubKernelsOnRequest`.
- 5.25 loads a processor's components through `_resolve_subprocessors` instead of `_get_arguments_from_pretrained`:
  see `g2vlm_hf/processing/processing_compat.py`.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from torch.compiler import is_compiling
from transformers.modeling_outputs import BaseModelOutputWithPast

LEGACY_CACHE_NAME = "past_key_values"
CACHE_NAME: str = "cache" if "cache" in {field.name for field in fields(BaseModelOutputWithPast)} else LEGACY_CACHE_NAME
"""What the installed transformers calls the key/value cache in model inputs and outputs."""


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{name: cache}` under the installed transformers' name, for calls into transformers (masks, generation)."""
    return {CACHE_NAME: cache}


def output_cache(output: Any) -> Any:
    """The cache held by a transformers `ModelOutput` (or a dict of model inputs), under either name."""
    return output.get(CACHE_NAME)


def accepts_cache_alias(method: Callable) -> Callable:
    """Let `method`, which names its cache parameter `past_key_values`, also take it as `cache` (the name
    transformers 5.24 passes from `generate()` and documents), on every supported release."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if CACHE_NAME != LEGACY_CACHE_NAME and kwargs.get(LEGACY_CACHE_NAME) is not None and not is_compiling():
            # as transformers' own models do from 5.24 on (its `deprecate_kwarg`)
            warnings.warn(
                "`past_key_values` is deprecated and will be removed in version 5.40.0. Use `cache` instead.",
                FutureWarning,
                stacklevel=2,
            )
        if "cache" in kwargs:
            cache = kwargs.pop("cache")
            if kwargs.get(LEGACY_CACHE_NAME) is not None and cache is not None:
                raise ValueError("Pass the key/value cache once, as `cache` or as `past_key_values`, not both.")
            if cache is not None or LEGACY_CACHE_NAME not in kwargs:
                kwargs[LEGACY_CACHE_NAME] = cache
        return method(self, *args, **kwargs)

    # `generate()` checks its keyword arguments against the signature: show both names.
    signature = inspect.signature(method)
    parameters = list(signature.parameters.values())
    cache_parameter = inspect.Parameter("cache", inspect.Parameter.KEYWORD_ONLY, default=None)
    position = next(
        (i for i, parameter in enumerate(parameters) if parameter.kind is inspect.Parameter.VAR_KEYWORD),
        len(parameters),
    )
    wrapper.__signature__ = signature.replace(
        parameters=[*parameters[:position], cache_parameter, *parameters[position:]]
    )
    return wrapper


class HubKernelsOnRequest:
    """Mixin (before `PreTrainedModel`): `from_pretrained` uses Hub kernels only when asked, on every release.

    transformers 5.25 kernelizes on load by default. On the `meta` device that raises (`kernels` knows no such
    device), and on CUDA it replaces layer forwards by kernels downloaded from the Hub, so a load needs the network
    (offline it fails: "not available in the local cache" / "could not verify publisher trust status") and computes
    something else than the weights were validated with. G2VLM therefore loads with its own (PyTorch) layers unless
    `use_kernels=True` or a `kernel_config` is passed, as on 5.21 to 5.24; `model.use_kernels = True` after loading
    works as in transformers.

    The layers of G2VLM that transformers' kernel mapping knows, and what an opt-in gives (all tested equal to ours
    with stand-ins of the Hub layers' contracts in tests/test_kernels.py):

    - `Qwen2VLRMSNorm` ("RMSNorm": every norm of the two-expert decoder, QK-norm included): Liger's RMSNorm, which
      reads the module's `weight` and `variance_epsilon` and computes the statistics in float32 and casts before the
      weight ("llama" casting), as ours does. Allowed on request.
    - `SiLUActivation` ("SiLU": the decoder MLPs of both experts), `GELUActivation` ("GeLU": the DINOv2 geometry
      encoder) and `QuickGELUActivation` ("QuickGELU": the Qwen2-VL vision encoder): element-wise, the same
      function. Allowed on request.

    Off by default for all of them: the official-parity tests and the float32 geometry path are validated with the
    PyTorch layers, and loading must not reach the network.
    """

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        if kwargs.get("use_kernels") is None and kwargs.get("kernel_config") is None:
            kwargs["use_kernels"] = False  # what 5.21-5.24 default to; 5.25 would kernelize
        return super().from_pretrained(*args, **kwargs)


__all__ = [
    "CACHE_NAME",
    "LEGACY_CACHE_NAME",
    "HubKernelsOnRequest",
    "accepts_cache_alias",
    "cache_kwargs",
    "output_cache",
]
