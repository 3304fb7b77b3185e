"""The parts table (g2vlm_hf/modeling/parts.py) against the model classes: it claims every weight exactly once, every
row claims some weight, and the README shows it as it is."""

from __future__ import annotations

import pytest
from conftest import tiny_config, tiny_model
from fixture_paths import REPO_ROOT

from g2vlm_hf import G2VLMForDepthEstimation, G2VLMForReconstruction
from g2vlm_hf.conversion import reconstruction_config
from g2vlm_hf.modeling.parts import MODEL_PARTS, PART_NAMES, part_of


def claiming_parts(name: str) -> list[str]:
    return [part.name for part in MODEL_PARTS if part.claims(name)]


@pytest.fixture(scope="module")
def full_model_names() -> list[str]:
    return list(tiny_model().state_dict())  # parameters and buffers; both encoders and all heads: every part present


def test_every_weight_belongs_to_exactly_one_part_and_every_part_to_some_weight(full_model_names):
    for name in full_model_names:
        assert len(claiming_parts(name)) == 1, (name, claiming_parts(name))
    assert {part_of(name) for name in full_model_names} == set(PART_NAMES)


@pytest.mark.parametrize(
    "build",
    [
        lambda: G2VLMForReconstruction(reconstruction_config(tiny_config())),
        lambda: G2VLMForDepthEstimation(tiny_config()),
    ],
    ids=["reconstruction", "depth-estimation"],
)
def test_the_reconstruction_and_depth_classes_use_the_same_names(build):
    model = build()
    parts = {part_of(name) for name in model.state_dict()}
    assert parts == set(PART_NAMES) - {"semantic_encoder", "lm_head"}


def test_wrapped_names_keep_their_part_and_unknown_names_are_refused():
    name = "model.language_model.layers.0.self_attn.geo_q_proj.weight"
    assert part_of(name) == part_of(f"base_model.model.{name}") == "geometry_expert"
    assert part_of("model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight") == "semantic_expert"
    assert part_of("model.language_model.geo_norm.weight") == "geometry_expert"
    assert part_of("model.language_model.norm.weight") == "semantic_expert"
    with pytest.raises(
        ValueError, match=r"'model\.something_new\.weight' belongs to no part of G2VLM \(semantic_encoder"
    ):
        part_of("model.something_new.weight")


def test_the_readme_lists_the_parts_as_the_table_does():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    rows = [f"| `{part.name}` | {part.description} |" for part in MODEL_PARTS]
    listed = [line for line in readme.splitlines() if line.startswith("| `") and line.split("`")[1] in PART_NAMES]
    assert listed == rows
