"""`attn_implementation="torch_varlen"`: G²VLM's packed runs on PyTorch's own FlashAttention varlen kernel,
`torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA, bfloat16/float16), with no extra package and nothing
downloaded.

- Registered in transformers' `AttentionInterface` (and its mask interface, with sdpa's masks) under "torch_varlen",
  so `from_pretrained(..., attn_implementation="torch_varlen")` and `set_attn_implementation` accept it. Calls without
  packed runs (decode steps, the encoders) go to sdpa.
- Chosen automatically by the default attention (sdpa) for a prompt with image blocks on CUDA in half precision.
- `flash_attention_2`/`_3` requested while the flash-attn package is missing resolve to it (one log line) instead of
  transformers' fallback to a Hub kernel (`kernels-community/flash-attn2`, a download at load time, transformers 5.25).
  (This is a transformers-version shim of its own module, beside `compat.py`.)

The kernel's signature changed between torch releases; `VarlenKernel` reads it once and `varlen_attention` is the one
place that adapts the call: 2.10 takes `is_causal` and no `scale`; 2.11+ take `window_size=(-1, 0)` for a causal
mask (aligned bottom-right) and `scale`; from 2.12 `enable_gqa`, before that the key/value heads are repeated.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import is_flash_attn_2_available, logging

logger = logging.get_logger(__name__)

TORCH_VARLEN = "torch_varlen"
HALF_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class VarlenKernel:
    """A varlen attention function and what its signature takes (read once, not per call)."""

    function: Callable
    takes_window_size: bool
    takes_scale: bool
    takes_enable_gqa: bool

    @classmethod
    def of(cls, function: Callable) -> VarlenKernel:
        parameters = inspect.signature(function).parameters
        return cls(function, "window_size" in parameters, "scale" in parameters, "enable_gqa" in parameters)


def _installed_kernel() -> VarlenKernel | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return VarlenKernel.of(varlen_attn)


TORCH_VARLEN_KERNEL: VarlenKernel | None = _installed_kernel()


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    causal: bool,
    scale: float | None,
    kernel: VarlenKernel | None = None,
) -> torch.Tensor:
    """Packed attention `(tokens, heads, dim)` over `(key tokens, kv_heads, dim)`, one sequence per `cu_seqlens`
    segment, causal masks aligned bottom-right; through `kernel` (default: torch's `varlen_attn`)."""
    kernel = kernel if kernel is not None else TORCH_VARLEN_KERNEL
    options = {}
    if kernel.takes_window_size:
        options["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        options["is_causal"] = causal
    default_scale = query.shape[-1] ** -0.5
    if kernel.takes_scale:
        options["scale"] = scale
    elif scale is not None and scale != default_scale:
        query = query * (scale / default_scale)  # the kernel applies the default scale
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if kernel.takes_enable_gqa:
            options["enable_gqa"] = True
        else:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return kernel.function(
        query.contiguous(), key.contiguous(), value.contiguous(), cu_seqlens_q, cu_seqlens_k, max_q, max_k, **options
    )


def can_use_varlen_kernel(states: torch.Tensor) -> bool:
    """Whether torch's varlen kernel can attend tensors like `states` (installed, CUDA, half precision)."""
    return TORCH_VARLEN_KERNEL is not None and states.device.type == "cuda" and states.dtype in HALF_PRECISION


def torch_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: packed sequences (`cu_seq_lens_q/k`, batch of one) go to the varlen
    kernel and return `(1, tokens, heads, dim)`; any other call (a decode step, an encoder) goes to sdpa."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if dropout:
        raise ValueError("torch's varlen attention kernel has no dropout: set attention_dropout=0 or use 'sdpa'.")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    output = varlen_attention(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_seq_lens_q, cu_seq_lens_k,
        max_length_q, max_length_k, causal=causal, scale=scaling,
    )  # fmt: skip
    return output[None], None


AttentionInterface.register(TORCH_VARLEN, torch_varlen_attention_forward)
AttentionMaskInterface.register(TORCH_VARLEN, sdpa_mask)


def flash_package_available(implementation: str) -> bool:
    """Whether the flash-attn package behind `flash_attention_<n>` is importable (without importing the kernels)."""
    from transformers.utils import is_flash_attn_3_available

    return is_flash_attn_3_available() if implementation == "flash_attention_3" else is_flash_attn_2_available()


def local_attention_implementation(requested: str | None) -> str | None:
    """`requested`, or "torch_varlen" for a `flash_attention_2`/`_3` whose package is missing, so that transformers
    never swaps in a Hub kernel. Without the package and torch's kernel (torch < 2.10) it raises a one-line ImportError
    naming the alternatives."""
    if not isinstance(requested, str) or not re.fullmatch(r"flash_attention_[23]", requested):
        return requested
    if flash_package_available(requested):
        return requested
    if TORCH_VARLEN_KERNEL is None:
        raise ImportError(
            f"attn_implementation='{requested}' needs the flash-attn package, which is not installed, and torch "
            f"{torch.__version__} has no varlen attention kernel (torch >= 2.10): install flash-attn, or use "
            "attn_implementation='sdpa' (the default; CPU and GPU), 'flex_attention' or 'eager' (the reference)."
        )
    logger.warning_once(
        f"flash-attn is not installed: attn_implementation='{requested}' runs on torch's own varlen flash kernel "
        "('torch_varlen'; CUDA half precision, elsewhere sdpa without dense masks), nothing is downloaded."
    )
    return TORCH_VARLEN


class LocalFlashAttentionMixin:
    """Resolves `flash_attention_2`/`_3` without the flash-attn package to "torch_varlen" on this model and its
    sub-configs before transformers' checks run (which, from 5.25, would fall back to a Hub kernel download)."""

    def _check_and_adjust_attn_implementation(
        self, attn_implementation: str | None, is_init_check: bool = False, allow_all_kernels: bool = False
    ) -> str:
        resolved = local_attention_implementation(attn_implementation)
        if resolved != attn_implementation:
            # sub-models (encoders) check their own sub-config's value when they are built or switched
            for sub_key in self.config.sub_configs:
                sub_config = getattr(self.config, sub_key, None)
                if sub_config is not None and sub_config._attn_implementation_internal == attn_implementation:
                    sub_config._attn_implementation = resolved
        return PreTrainedModel._check_and_adjust_attn_implementation(
            self, resolved, is_init_check=is_init_check, allow_all_kernels=allow_all_kernels
        )

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        # transformers < 5.25 checks a sub-model's part of a per-part `set_attn_implementation({...})` here alone
        return super().get_correct_attn_implementation(
            local_attention_implementation(requested_attention), is_init_check=is_init_check
        )


__all__ = [
    "TORCH_VARLEN",
    "LocalFlashAttentionMixin",
    "VarlenKernel",
    "can_use_varlen_kernel",
    "local_attention_implementation",
    "torch_varlen_attention_forward",
    "varlen_attention",
]
