"""Conversion of the official checkpoint folder: the CLI, the key table and its failure modes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FIXTURE_DIR
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoTokenizer

from g2vlm_hf import G2VLMForConditionalGeneration
from g2vlm_hf.conversion import build_reconstruction_only, convert_official_checkpoint
from g2vlm_hf.conversion.cli import main as convert_cli
from g2vlm_hf.output_manifest import read_manifest
from g2vlm_hf.safe_output import OutputError

OFFICIAL = FIXTURE_DIR / "checkpoint"


@pytest.fixture
def official_copy(tmp_path):
    folder = tmp_path / "official"
    shutil.copytree(OFFICIAL, folder)
    return folder


def test_cli_converts_into_a_loadable_folder(tmp_path):
    output = tmp_path / "out"
    assert convert_cli([str(OFFICIAL), str(output)]) == 0
    model = AutoModelForImageTextToText.from_pretrained(output)
    assert isinstance(model, G2VLMForConditionalGeneration)
    assert model.config.geometry_encoder_attention == "official_packed_windows"
    assert model.config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.convert_tokens_to_ids("<|geo_pad|>") == model.config.geometry_token_id
    generation = json.loads((output / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_converted_weights_are_the_official_ones(converted_tiny):
    official = load_file(OFFICIAL / "model.safetensors")
    converted = load_file(converted_tiny / "model.safetensors")
    assert len(official) == len(converted)
    pairs = {
        "dino_model.encoder.layer.1.attention.attention.query.weight": "model.geometry_encoder.encoder.layer.1.attention.query.weight",
        "language_model.model.layers.0.self_attn.q_proj_moe_geo.bias": "model.language_model.layers.0.self_attn.geo_q_proj.bias",
        "language_model.model.layers.1.mlp_moe_geo.down_proj.weight": "model.language_model.layers.1.geo_mlp.geo_down_proj.weight",
        "language_model.model.layers.1.ls2.gamma": "model.language_model.layers.1.geo_mlp_layer_scale.gamma",
        "camera_head.more_mlps.2.weight": "geometry_heads.camera_head.pose_mlp.2.weight",
        "global_points_decoder.blocks.4.cross_attn.k_proj.bias": "geometry_heads.global_points_decoder.blocks.4.cross_attn.key.bias",
    }
    for old, new in pairs.items():
        assert torch.equal(official[old], converted[new]), old


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "mine.txt").write_text("mine")
    assert convert_cli([str(OFFICIAL), str(output)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert [path.name for path in output.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("flags", [[], ["--reconstruction-only"]], ids=["full", "reconstruction-only"])
def test_cli_converts_into_an_empty_folder(tmp_path, flags):
    """An empty folder is as good as none (README "Safety of outputs"), for both kinds of conversion."""
    output = tmp_path / "made-by-mkdir"
    output.mkdir()
    assert convert_cli([str(OFFICIAL), str(output), *flags]) == 0
    model_type = json.loads((output / "config.json").read_text())["model_type"]
    assert model_type == ("g2vlm_reconstruction" if flags else "g2vlm")
    hidden = sorted(path.name for path in output.iterdir() if path.name.startswith("."))
    assert hidden == [".g2vlm-output"]  # the manifest, and no working folder left behind


def _rewrite_weights(folder, edit):
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda w: w.pop("language_model.model.layers.0.self_attn.k_norm_moe_geo.weight"), "with no official key"),
        (lambda w: w.update({"extra_head.weight": torch.zeros(2)}), "extra_head.weight"),
        (lambda w: w.update({"dino2llm.bias": torch.zeros(3)}), "shape mismatch"),
        # keys and shapes right, but the model does not run to finite outputs (the synthetic-input run)
        (lambda w: w["language_model.lm_head.weight"].fill_(float("nan")), "non-finite logits"),
        (lambda w: w["point_head.proj.bias"].fill_(float("nan")), "non-finite world_points"),
    ],
)
def test_mismatched_official_folder_fails_naming_the_keys_and_writes_nothing(official_copy, tmp_path, edit, message):
    _rewrite_weights(official_copy, edit)
    output = tmp_path / "converted"
    with pytest.raises(ValueError, match=message):
        convert_official_checkpoint(official_copy, output)
    assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official"]  # no staging folder left behind


def test_missing_official_file_is_named(official_copy, tmp_path):
    (official_copy / "dino_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"dino_config\.json"):
        convert_official_checkpoint(official_copy, tmp_path / "converted")


def test_build_reconstruction_only_replaces_only_its_own_output(converted_tiny, tmp_path):
    """The library function writes as `g2vlm-convert` does: a user's folder is never replaced, even with
    `overwrite=True`; an earlier converter output is, unless the user changed something in it."""
    user = tmp_path / "my-experiments"
    user.mkdir()
    (user / "results.csv").write_text("mine")
    with pytest.raises(OutputError, match="not a previous output of g2vlm"):
        build_reconstruction_only(converted_tiny, user, overwrite=True)
    assert [path.name for path in user.iterdir()] == ["results.csv"]
    with pytest.raises(OutputError, match="is the input"):
        build_reconstruction_only(converted_tiny, converted_tiny, overwrite=True)

    output = build_reconstruction_only(converted_tiny, tmp_path / "recon")
    assert json.loads((output / "config.json").read_text())["model_type"] == "g2vlm_reconstruction"
    assert read_manifest(output)["kind"] == "converted-model"
    with pytest.raises(OutputError, match="exists and is not empty; pass --overwrite"):
        build_reconstruction_only(converted_tiny, output)

    build_reconstruction_only(converted_tiny, output, overwrite=True, max_shard_size="100KB")
    shards = sorted(path.name for path in output.glob("*.safetensors"))
    assert any("-of-" in name for name in shards), shards  # the new output replaced the old one
    assert set(read_manifest(output)["files"]) == {
        path.relative_to(output).as_posix() for path in output.rglob("*") if path.name != ".g2vlm-output"
    }
    (output / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"notes\.txt"):
        build_reconstruction_only(converted_tiny, output, overwrite=True)
    assert (output / "notes.txt").read_text() == "mine" and (output / "config.json").is_file()
