"""No backend but eager builds a tokens x tokens mask for a prompt with image blocks: sdpa attends by query slices
(block_attention.py), the varlen paths by packed runs, flex with a BlockMask made block by block (flex.py). Checked at
many views by watching every tensor any operator makes during the forward (a TorchDispatchMode): none may have two
dimensions of the prompt's length, however it is built (transformers' mask builder, flex's `create_block_mask`, a
broadcast). Only the fused kernels' CPU stand-ins, which hold no such tensor on the GPU, run unwatched, and each path
is checked to have called its kernel; each path still equals eager."""

from __future__ import annotations

import pytest
import torch
from conftest import Call, geometry_block, recording, spy_calls, tiny_model
from test_attention_backends import flash_attention_stand_in, reference_varlen_attention, varlen_queries_per_layer
from test_model import GRID_H, GRID_W
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from g2vlm_hf.modeling import flex, text_decoder, torch_varlen
from g2vlm_hf.modeling.block_attention import QUERY_CHUNK
from g2vlm_hf.modeling.torch_varlen import VarlenKernel

MANY_VIEWS = 160  # 8 tokens per view: ~1,300 tokens, more than twice QUERY_CHUNK


def many_view_inputs(batch: int = 2) -> dict:
    ids = [1, 5, *geometry_block(MANY_VIEWS, GRID_H, GRID_W)]
    generator = torch.Generator().manual_seed(0)
    scenes = torch.randn(batch, MANY_VIEWS, 3, GRID_H * 14, GRID_W * 14, generator=generator)
    rows = [ids, [0, 0, *ids[2:]]][:batch]  # row 1 left-padded
    return dict(
        input_ids=torch.tensor(rows),
        attention_mask=torch.tensor([[1 if token else 0 for token in row] for row in rows]),
        geometry_pixel_values=scenes,
    )


class TokensSquaredSpy(TorchDispatchMode):
    """Records every tensor made by an operator while active that has two dimensions of at least `tokens`: a
    tokens x tokens mask or score matrix, whoever makes it. Hidden states and query slices have at most one."""

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and sum(size >= self.tokens for size in tensor.shape) >= 2:
                self.seen.append((str(func), tuple(tensor.shape)))
        return output


def fake_torch_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                      enable_gqa=False):  # fmt: skip
    """torch 2.13's `varlen_attn` signature, computed on the CPU with the reference kernel."""
    assert enable_gqa or query.shape[1] == key.shape[1]
    return reference_varlen_attention(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, softmax_scale=scale, causal=window_size == (-1, 0)
    )


def use_path(monkeypatch, model, path: str) -> list[Call]:
    """Put `model` on `path`; returns the calls of the path's fused kernel (the CPU stand-in of the varlen kernel, or
    the compiled flex call), which run unwatched by the spy: on the GPU they hold no tokens x tokens tensor, and the
    stand-ins compute plain attention per segment."""
    kernel_calls: list[Call] = []
    if path == "flash_attention_2":
        kernel = recording(reference_varlen_attention, kernel_calls, _disable_current_modes)
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", flash_attention_stand_in(kernel))
        model.config.text_config._attn_implementation_internal = "flash_attention_2"
    elif path == "sdpa_on_varlen":  # the default on CUDA half precision, with a CPU stand-in for torch's kernel
        kernel = recording(fake_torch_varlen, kernel_calls, _disable_current_modes)
        monkeypatch.setattr(torch_varlen, "TORCH_VARLEN_KERNEL", VarlenKernel.of(kernel))
        monkeypatch.setattr(text_decoder, "can_use_varlen_kernel", lambda states: True)
    elif path == "flex_attention":  # compiled (test_flex.py checks it is); dynamo would skip its frame under the spy
        # the decoder alone: transformers' compiled flex of the encoders (per view) compiles nothing under the spy
        model.config.text_config._attn_implementation_internal = "flex_attention"
        monkeypatch.setattr(flex, "FLEX_COMPILE", recording(flex.FLEX_COMPILE, kernel_calls, _disable_current_modes))
    elif path != "sdpa":
        model.set_attn_implementation(path)
    return kernel_calls


@pytest.mark.parametrize("path", ["sdpa", "torch_varlen", "flash_attention_2", "sdpa_on_varlen", "flex_attention"])
def test_no_dense_mask_at_many_views_and_equal_to_eager(path, monkeypatch):
    inputs = many_view_inputs()
    tokens = inputs["input_ids"].shape[1]
    assert tokens > 2 * QUERY_CHUNK
    reference = tiny_model(seed=3)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        expected = reference.reconstruct(**inputs)
    model = tiny_model(seed=3)
    kernel_calls = use_path(monkeypatch, model, path)
    query_slices = spy_calls(monkeypatch, text_decoder, "attend_query_chunks")
    spy = TokensSquaredSpy(tokens)
    with torch.no_grad(), spy:
        actual = model.reconstruct(**inputs)
    assert spy.seen == [], f"tokens x tokens tensors made: {sorted(set(spy.seen))}"
    layers = model.config.text_config.num_hidden_layers
    if path in ("flash_attention_2", "sdpa_on_varlen"):  # every valid token through the varlen kernel, every layer
        assert varlen_queries_per_layer(kernel_calls) == [int(inputs["attention_mask"].sum())] * layers
    else:
        assert len(kernel_calls) == (layers if path == "flex_attention" else 0)
    assert len(query_slices) == (layers if path in ("sdpa", "torch_varlen") else 0)
    torch.testing.assert_close(actual.world_points, expected.world_points, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual.camera_poses, expected.camera_poses, rtol=1e-4, atol=1e-4)


def test_the_spy_sees_the_dense_mask_of_eager():
    """The check above is not vacuous: the reference path's tokens x tokens mask (and its scores) are seen."""
    inputs = many_view_inputs(batch=1)
    tokens = inputs["input_ids"].shape[1]
    model = tiny_model(seed=3)
    model.set_attn_implementation("eager")
    spy = TokensSquaredSpy(tokens)
    with torch.no_grad(), spy:
        model.reconstruct(**inputs)
    assert (1, 1, tokens, tokens) in {shape for _, shape in spy.seen}  # the mask
