"""No backend but eager builds a tokens x tokens mask for a prompt with image blocks: sdpa attends by query slices
(block_attention.py), the varlen paths by packed runs. Checked at many views by spying on every mask that reaches an
attention kernel or comes out of transformers' mask builder; each path still equals eager."""

from __future__ import annotations

import pytest
import torch
from conftest import geometry_block, tiny_model
from test_attention_backends import flash_attention_stand_in, reference_varlen_attention
from test_model import GRID_H, GRID_W
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from g2vlm_hf.modeling import text_decoder, torch_varlen
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


class MaskSpy:
    """Records the elements per batch row of every mask given to sdpa and built by create_causal_mask."""

    def __init__(self, monkeypatch):
        self.sizes: list[int] = []
        sdpa = torch.nn.functional.scaled_dot_product_attention
        build = text_decoder.create_causal_mask

        def spy_sdpa(query, key, value, attn_mask=None, *args, **kwargs):
            if attn_mask is not None:
                self.sizes.append(attn_mask.shape[-2] * attn_mask.shape[-1])
            return sdpa(query, key, value, attn_mask, *args, **kwargs)

        def spy_build(*args, **kwargs):
            mask = build(*args, **kwargs)
            if isinstance(mask, torch.Tensor):
                self.sizes.append(mask.shape[-2] * mask.shape[-1])
            return mask

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
        monkeypatch.setattr(text_decoder, "create_causal_mask", spy_build)


def fake_torch_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                      enable_gqa=False):  # fmt: skip
    """torch 2.13's `varlen_attn` signature, computed on the CPU with the reference kernel."""
    assert enable_gqa or query.shape[1] == key.shape[1]
    return reference_varlen_attention(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, softmax_scale=scale, causal=window_size == (-1, 0)
    )


def use_path(monkeypatch, model, path: str):
    if path == "flash_attention_2":
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", flash_attention_stand_in())
        model.config.text_config._attn_implementation_internal = "flash_attention_2"
    elif path == "sdpa_on_varlen":  # the default on CUDA half precision, with a CPU stand-in for torch's kernel
        monkeypatch.setattr(torch_varlen, "TORCH_VARLEN_KERNEL", VarlenKernel.of(fake_torch_varlen))
        monkeypatch.setattr(text_decoder, "can_use_varlen_kernel", lambda states: True)
    elif path != "sdpa":
        model.set_attn_implementation(path)
    return model


@pytest.mark.parametrize("path", ["sdpa", "torch_varlen", "flash_attention_2", "sdpa_on_varlen", "flex_attention"])
def test_no_dense_mask_at_many_views_and_equal_to_eager(path, monkeypatch):
    inputs = many_view_inputs()
    tokens = inputs["input_ids"].shape[1]
    assert tokens > 2 * QUERY_CHUNK
    reference = tiny_model(seed=3)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        expected = reference.reconstruct(**inputs)
    model = use_path(monkeypatch, tiny_model(seed=3), path)
    spy = MaskSpy(monkeypatch)
    with torch.no_grad():
        actual = model.reconstruct(**inputs)
    # the geometry encoder (per view) and the heads attend without masks; the decoder's masks are query slices
    assert max(spy.sizes, default=0) <= QUERY_CHUNK * tokens < tokens * tokens
    torch.testing.assert_close(actual.world_points, expected.world_points, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual.camera_poses, expected.camera_poses, rtol=1e-4, atol=1e-4)


def test_the_spy_sees_the_dense_mask_of_eager(monkeypatch):
    """The check above is not vacuous: the reference path's tokens x tokens mask is seen."""
    inputs = many_view_inputs(batch=1)
    tokens = inputs["input_ids"].shape[1]
    model = tiny_model(seed=3)
    model.set_attn_implementation("eager")
    spy = MaskSpy(monkeypatch)
    with torch.no_grad():
        model.reconstruct(**inputs)
    assert max(spy.sizes) == tokens * tokens
