"""What a mutation pass over the geometry heads (camera_head.py, geometry_heads.py, head_layers.py,
head_activations.py) found unpinned: the activations that the default configuration does not use, the wiring and
width of the confidence decoder and head, heads built without global points, a float16 trunk, and the epsilon of the
head LayerNorms (a change of it stays within the parity bounds). The official fixture pins the rest: it has global
points and no confidence head, and runs its trunk in float32 or bfloat16."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from test_head_precision import decoder_dtypes, output_head_dtypes, reconstruct_recording_dtypes

from g2vlm_hf.modeling.geometry_heads import G2VLMGeometryHeads
from g2vlm_hf.modeling.head_activations import get_head_activation

SCENES, VIEWS, GRID_H, GRID_W = 2, 2, 2, 3


def heads(seed: int = 0, **overrides) -> G2VLMGeometryHeads:
    torch.manual_seed(seed)
    return G2VLMGeometryHeads(tiny_config(**overrides)).eval()


def geometry_tokens(hidden: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SCENES, VIEWS, GRID_H, GRID_W, hidden, generator=generator)


# --- the activations, written from their definitions -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, definition",
    [
        ("exp", lambda x: x.exp()),
        ("expp1", lambda x: 1 + x.exp()),  # VGGT's confidence: > 1
        ("linear", lambda x: x),
        ("sigmoid", lambda x: 1 / (1 + (-x).exp())),
    ],
)
def test_each_activation_is_its_definition(name, definition):
    values = torch.linspace(-6, 6, 25, dtype=torch.float64)
    torch.testing.assert_close(get_head_activation(name)(values), definition(values))


def test_an_unknown_activation_names_every_choice():
    with pytest.raises(ValueError, match=r"'softplus'.*\['exp', 'expp1', 'linear', 'sigmoid'\]"):
        get_head_activation("softplus")


# --- the confidence head, heads without global points, a float16 trunk ------------------------------------------------


def test_confidence_comes_from_the_confidence_decoder_and_head_alone():
    """Changing the global-points decoder leaves the confidence as it is; changing the confidence decoder changes the
    confidence and nothing else."""
    model = heads(use_confidence_head=True, confidence_activation="linear")
    tokens = geometry_tokens(model.config.text_config.hidden_size)
    with torch.no_grad():
        before = model(tokens)
        for parameter in model.global_points_decoder.parameters():
            parameter.add_(0.5)
        other_global = model(tokens)
        for parameter in model.confidence_decoder.parameters():
            parameter.add_(0.5)
        other_confidence = model(tokens)
    assert before.confidence.shape == (SCENES, VIEWS, GRID_H * 14, GRID_W * 14)
    assert not torch.allclose(other_global.global_points, before.global_points)
    torch.testing.assert_close(other_global.confidence, before.confidence, rtol=0, atol=0)
    assert not torch.allclose(other_confidence.confidence, before.confidence)
    for name in ("camera_poses", "local_points", "world_points", "global_points"):
        torch.testing.assert_close(getattr(other_confidence, name), getattr(other_global, name), rtol=0, atol=0)


def test_the_confidence_head_maps_each_token_to_one_value_per_pixel():
    """As the official conf_head (Pi3's LinearPts3d with output_dim 1): patch**2 outputs per token, so that a checkpoint
    trained with a confidence head loads into it."""
    model = heads(use_confidence_head=True)
    patch = model.config.geometry_patch_size
    assert model.confidence_head.proj.out_features == patch**2
    assert model.point_head.proj.out_features == model.global_point_head.proj.out_features == 3 * patch**2


def test_every_head_layer_norm_uses_the_configured_epsilon():
    """`head_layer_norm_eps` (1e-6 in the official heads, not LayerNorm's default 1e-5) in every block, the cross
    blocks' context and MLP norms included: a change of epsilon moves the outputs by less than the parity bounds."""
    model = heads(head_layer_norm_eps=1e-3)
    norms = [module for module in model.modules() if isinstance(module, torch.nn.LayerNorm)]
    cross_block = model.global_points_decoder.blocks[0]
    assert {cross_block.norm_y, cross_block.norm3} <= set(norms)
    assert len(norms) == 3 * 2 + 4  # point, camera and confidence blocks: 2 norms each; the cross block: 4
    assert {norm.eps for norm in norms} == {1e-3}


def test_heads_without_global_points_or_confidence_still_reconstruct():
    model = heads(use_global_points=False, use_confidence_head=False)
    assert model.global_points_decoder is model.global_point_head is None
    assert model.confidence_decoder is model.confidence_head is None
    with torch.no_grad():
        output = model(geometry_tokens(model.config.text_config.hidden_size))
    assert output.global_points is None and output.confidence is None
    assert output.world_points.shape == (SCENES, VIEWS, GRID_H * 14, GRID_W * 14, 3)
    assert bool((output.depth > 0).all())
    # without global points the world points are still each view's local points placed by its camera pose
    rotation, translation = output.camera_poses[..., :3, :3], output.camera_poses[..., :3, 3]
    placed = torch.einsum("bnij,bnhwj->bnhwi", rotation, output.local_points) + translation[..., None, None, :]
    torch.testing.assert_close(output.world_points, placed, rtol=1e-5, atol=1e-5)


def test_a_float16_trunk_runs_the_head_decoders_in_float16_and_the_heads_in_float32():
    """float16, like bfloat16, is a half precision the decoders follow (under autocast); outputs stay float32."""
    output, computed = reconstruct_recording_dtypes("auto", torch.float16)
    assert decoder_dtypes(computed) == {torch.float16}
    assert output_head_dtypes(computed) == {torch.float32}
    assert all(value.dtype == torch.float32 for value in output.values() if value is not None)
