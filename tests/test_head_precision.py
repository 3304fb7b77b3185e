"""The precision of the geometry heads: their decoders' matrix products follow the decoder's half precision (as the
official code runs them on a GPU, under bf16 autocast) unless `head_decoder_precision="float32"`; the output heads,
the exponential depth, the SVD and every output stay in float32. Parity with the official bf16 run on its fixture is
in test_official_parity.py (both settings meet its 3e-2 bound)."""

from __future__ import annotations

import pytest
import torch
from conftest import geometry_block, tiny_config
from test_model import GRID_H, GRID_W, VIEWS, views

from g2vlm_hf import G2VLMConfig, G2VLMForConditionalGeneration


def reconstruct_recording_dtypes(precision: str, trunk_dtype: torch.dtype):
    """Reconstruct with the trunk in `trunk_dtype` (the heads' weights in float32, as loading keeps them); returns the
    output and the dtype each head linear layer computed in."""
    torch.manual_seed(0)
    model = G2VLMForConditionalGeneration(tiny_config(head_decoder_precision=precision)).eval()
    model.model.to(trunk_dtype)
    computed = {}

    def record(name: str):
        def hook(module, args, output) -> None:
            computed[name] = output.dtype

        return hook

    for name, module in model.geometry_heads.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(record(name))
    ids = torch.tensor([[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]])
    with torch.no_grad():
        output = model.reconstruct(input_ids=ids, geometry_pixel_values=views())
    assert all(parameter.dtype == torch.float32 for parameter in model.geometry_heads.parameters())
    return output, computed


def decoder_dtypes(computed: dict) -> set[torch.dtype]:
    return {dtype for name, dtype in computed.items() if name.split(".")[0].endswith("_decoder")}


def output_head_dtypes(computed: dict) -> set[torch.dtype]:
    return {dtype for name, dtype in computed.items() if name.split(".")[0].endswith("_head")}


def test_a_bf16_trunk_runs_the_head_decoders_in_bf16_and_the_heads_in_float32():
    output, computed = reconstruct_recording_dtypes("auto", torch.bfloat16)
    assert decoder_dtypes(computed) == {torch.bfloat16}
    assert output_head_dtypes(computed) == {torch.float32}
    assert all(value.dtype == torch.float32 for value in output.values() if value is not None)
    rotations = output.camera_poses[..., :3, :3].double()
    identity = torch.eye(3, dtype=torch.float64).expand_as(rotations)
    torch.testing.assert_close(rotations @ rotations.transpose(-1, -2), identity, atol=1e-5, rtol=0)


def test_float32_precision_keeps_the_head_decoders_in_float32():
    full, computed = reconstruct_recording_dtypes("float32", torch.bfloat16)
    assert decoder_dtypes(computed) == output_head_dtypes(computed) == {torch.float32}
    half, _ = reconstruct_recording_dtypes("auto", torch.bfloat16)
    # the same trunk output, decoded at two precisions: close, not equal
    error = (half.world_points - full.world_points).norm() / full.world_points.norm()
    assert 0 < error < 3e-2


def test_a_float32_model_decodes_in_float32():
    _, computed = reconstruct_recording_dtypes("auto", torch.float32)
    assert decoder_dtypes(computed) == {torch.float32}


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="head_decoder_precision='bf16' is not supported"):
        G2VLMConfig(head_decoder_precision="bf16")


def test_the_setting_loads_with_from_pretrained_and_applies_when_changed(tmp_path):
    G2VLMForConditionalGeneration(tiny_config()).save_pretrained(tmp_path)
    model = G2VLMForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.bfloat16, head_decoder_precision="float32"
    )
    assert model.config.head_decoder_precision == "float32"
    assert model.geometry_heads.point_decoder.blocks[0].attn.qkv.weight.dtype == torch.float32
    seen = []
    model.geometry_heads.point_decoder.blocks[0].attn.qkv.register_forward_hook(
        lambda module, args, output: seen.append(output.dtype)
    )
    ids = torch.tensor([[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]])
    with torch.no_grad():
        model.reconstruct(input_ids=ids, geometry_pixel_values=views())
        model.config.head_decoder_precision = "auto"
        model.reconstruct(input_ids=ids, geometry_pixel_values=views())
    assert seen == [torch.float32, torch.bfloat16]
