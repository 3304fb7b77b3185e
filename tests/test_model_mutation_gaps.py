"""What a sampled mutation pass over modeling_g2vlm.py found unpinned: that reconstruction, which reads nothing back
from a key/value cache, builds none (transformers' `use_cache=False` convention); that the reconstruction-only class
initialises the weights its checkpoint lacks, as the full model does; that `forward` returns the semantic image
features it computed (as `get_image_features` gives them); and that geometry views of the wrong rank or channel count
are refused with the message naming the expected shape rather than failing deep inside the encoder."""

from __future__ import annotations

import pytest
import torch
from conftest import geometry_block, image_block, image_patches, tiny_config, tiny_model
from safetensors.torch import load_file, save_file

from g2vlm_hf import G2VLMForReconstruction
from g2vlm_hf.conversion import reconstruction_config

GRID_H, GRID_W, VIEWS = 2, 2, 2  # geometry views of 28x28 pixels


def scene() -> dict:
    generator = torch.Generator().manual_seed(0)
    return dict(
        input_ids=torch.tensor([[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]]),
        geometry_pixel_values=torch.randn(1, VIEWS, 3, GRID_H * 14, GRID_W * 14, generator=generator),
    )


def reconstruction_model() -> G2VLMForReconstruction:
    torch.manual_seed(0)
    return G2VLMForReconstruction(reconstruction_config(tiny_config())).eval()


@pytest.mark.parametrize("build", [tiny_model, reconstruction_model], ids=["chat-model", "reconstruction-model"])
def test_reconstruction_builds_no_key_value_cache(build):
    """A reconstruction is one pass whose cache nobody reads: the decoder runs with `use_cache=False` and so, as
    transformers' decoders do, returns no cache, although the config's `use_cache` (True) would otherwise make one
    holding the keys and values of every layer for every view."""
    model = build()
    assert model.config.text_config.use_cache
    outputs = []
    model.model.language_model.register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        model.reconstruct(**scene())
    assert len(outputs) == 1
    assert outputs[0].past_key_values is None


def test_the_reconstruction_model_initialises_the_weights_its_checkpoint_lacks(tmp_path):
    """As for the full model (test_model.py): from_pretrained builds G2VLMForReconstruction on the meta device and
    runs the model's initialisation on the weights the checkpoint lacks. Every weight but one is missing here; the
    geometry LayerScale comes out at the config's value (one no tensor held before) and every weight is finite."""
    saved = reconstruction_model()
    saved.config.text_config.geometry_layer_scale_init = 0.375
    saved.save_pretrained(tmp_path)
    kept = "model.geometry_encoder.embeddings.cls_token"
    save_file({kept: load_file(tmp_path / "model.safetensors")[kept]}, tmp_path / "model.safetensors", {"format": "pt"})
    model = G2VLMForReconstruction.from_pretrained(tmp_path)
    scales = {name: p for name, p in model.named_parameters() if name.endswith("layer_scale.gamma")}
    assert len(scales) == 2 * model.config.text_config.num_hidden_layers
    for name, gamma in scales.items():
        assert torch.all(gamma == 0.375), name
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name


def test_forward_returns_the_image_features_it_computed():
    """`image_outputs` of a call with semantic images are those images' features as `get_image_features` gives them
    (one merged block per image, in order); a call without images returns none."""
    model = tiny_model()
    first, second = image_patches(4, 4, seed=1), image_patches(4, 2, seed=2)
    pixels, grids = torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]])
    ids = torch.tensor([[1, 5, *image_block(4, 4), 6, *image_block(4, 2), 7]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grids)
        direct = model.model.get_image_features(pixels, grids)
        text_only = model(input_ids=torch.tensor([[1, 5, 6, 7]]))
    assert [block.shape[0] for block in out.image_outputs.pooler_output] == [4, 2]
    for got, expected in zip(out.image_outputs.pooler_output, direct.pooler_output, strict=True):
        torch.testing.assert_close(got, expected)
    assert text_only.image_outputs is None


@pytest.mark.parametrize(
    "shape", [(VIEWS, 3, 28, 28), (1, VIEWS, 1, 28, 28)], ids=["views-without-a-batch", "one-channel-views"]
)
def test_views_of_the_wrong_rank_or_channels_are_refused_with_the_expected_shape(shape):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"must have shape \(batch_size, num_views, 3, height, width\)"):
        model.reconstruct(input_ids=scene()["input_ids"], geometry_pixel_values=torch.zeros(shape))
