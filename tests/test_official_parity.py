"""Parity with the official implementation: the converted official tiny checkpoint must reproduce the outputs the
official code produced on it (../shared/fixtures/official-tiny), within the tolerances of that fixture's README."""

from __future__ import annotations

import pytest
import torch
from conftest import NEWLINE_TOKEN_ID, load_golden
from transformers import AutoModelForImageTextToText

TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def relative_error(port: torch.Tensor, golden: torch.Tensor) -> float:
    port, golden = port.float(), golden.float()
    return float((port - golden).norm() / golden.norm())


class OfficialRun:
    """The port run on the fixture's inputs, the way the official `recon` and `chat_with_recon` ran."""

    def __init__(self, folder, precision: str, attn_implementation: str = "sdpa"):
        self.golden = load_golden(precision)
        self.model = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=DTYPE[precision], attn_implementation=attn_implementation
        ).eval()
        config, tensors = self.model.config, self.golden.tensors
        geo, image = config.geometry_token_id, config.image_token_id
        self.recon_ids = torch.cat(
            [
                tensors["recon.phase0.packed_text_ids"],
                self.golden.phase_ids("recon.phase1", "packed_dino_token_indexes", geo),
            ]
        )[None]
        self.recon_views = tensors["recon.phase1.packed_dino_images"][None]
        self.chat_phases = [
            tensors["chat.phase0.packed_text_ids"],
            self.golden.phase_ids("chat.phase1", "packed_dino_token_indexes", geo),
            self.golden.phase_ids("chat.phase2", "packed_vit_token_indexes", image),
            tensors["chat.phase3.packed_text_ids"],
        ]
        self.chat_prompt = torch.cat([*self.chat_phases, torch.tensor([NEWLINE_TOKEN_ID])])[None]
        self.chat_views = tensors["chat.phase1.packed_dino_images"][None]
        self.chat_pixels = tensors["chat.phase2.packed_vit_images"][0]
        self.chat_grid = tensors["chat.phase2.packed_image_grid_thw"]
        self.greedy = torch.tensor(self.golden.meta["chat"]["greedy_token_ids"])
        with torch.no_grad():
            self.recon = self.model.reconstruct(input_ids=self.recon_ids, geometry_pixel_values=self.recon_views)

    def chat_inputs(self) -> dict:
        return dict(pixel_values=self.chat_pixels, image_grid_thw=self.chat_grid, geometry_pixel_values=self.chat_views)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def run(request, converted_tiny) -> OfficialRun:
    run = OfficialRun(converted_tiny, request.param)
    run.precision = request.param
    return run


@pytest.mark.parametrize(
    "name, golden_name",
    [
        ("camera_poses", "recon.camera_poses"),
        ("local_points", "recon.local_points"),
        ("world_points", "recon.points"),
        ("global_points", "recon.global_points"),
    ],
)
def test_reconstruction_matches_official(run, name, golden_name):
    error = relative_error(getattr(run.recon, name), run.golden.tensors[golden_name])
    assert error <= TOLERANCE[run.precision], f"{name}: relative error {error:.2e}"


def test_fixture_has_no_confidence_head(run):
    assert run.recon.confidence is None and run.model.geometry_heads.confidence_head is None


def test_rotations_orthonormal(run):
    # The heads run in float32 whatever the model dtype, so the fixture README's 1e-5 bound holds for both runs.
    rotations = run.recon.camera_poses[..., :3, :3].double()
    identity = torch.eye(3, dtype=torch.float64).expand_as(rotations)
    assert torch.allclose(rotations @ rotations.transpose(-1, -2), identity, atol=1e-5)
    assert torch.allclose(torch.linalg.det(rotations), torch.ones(rotations.shape[:2], dtype=torch.float64), atol=1e-5)


def test_geometry_encoder_features_match_official(run):
    with torch.no_grad():
        tokens = run.model.model.geometry_encoder(
            run.recon_views.flatten(0, 1).to(run.model.dtype), views_per_scene=run.recon_views.shape[1]
        )
        chat_tokens = run.model.model.geometry_encoder(
            run.chat_views.flatten(0, 1).to(run.model.dtype), views_per_scene=1
        )
    assert relative_error(tokens, run.golden.tensors["recon.dino_patch_tokens"]) <= TOLERANCE[run.precision]
    assert relative_error(chat_tokens, run.golden.tensors["chat.dino_patch_tokens"]) <= TOLERANCE[run.precision]


def test_semantic_encoder_features_match_official(run):
    with torch.no_grad():
        features = torch.cat(run.model.model.get_image_features(run.chat_pixels, run.chat_grid).pooler_output)
    assert relative_error(features, run.golden.tensors["chat.vit_embeds"]) <= TOLERANCE[run.precision]


def test_position_ids_match_every_official_phase(run):
    tensors, model = run.golden.tensors, run.model.model
    recon_positions = model.compute_position_ids(
        run.recon_ids, None, None, None, model.geometry_grid_thw(run.recon_views)
    )
    expected = torch.cat(
        [tensors["recon.phase0.packed_text_position_ids"], tensors["recon.phase1.packed_position_ids"]], 1
    )
    assert torch.equal(recon_positions[:, 0], expected)

    chat_positions = model.compute_position_ids(
        run.chat_prompt, None, None, run.chat_grid, model.geometry_grid_thw(run.chat_views)
    )
    phases = [
        tensors["chat.phase0.packed_text_position_ids"],
        tensors["chat.phase1.packed_position_ids"],
        tensors["chat.phase2.packed_position_ids"],
        tensors["chat.phase3.packed_text_position_ids"],
    ]
    assert torch.equal(chat_positions[:, 0, :-1], torch.cat(phases, 1))
    # the official decode loop feeds "\n" at the position after the prompt
    assert chat_positions[:, 0, -1].tolist() == [phases[-1].max().item() + 1] * 3


def test_teacher_forced_logits_match_official_at_every_step(run):
    sequence = torch.cat([run.chat_prompt, run.greedy[None, :-1]], dim=1)
    with torch.no_grad():
        logits = run.model(input_ids=sequence, **run.chat_inputs()).logits[0, run.chat_prompt.shape[1] - 1 :]
    golden = run.golden.tensors["chat.decode_logits"][:, 0]
    errors = [relative_error(logits[step], golden[step]) for step in range(golden.shape[0])]
    assert max(errors) <= TOLERANCE[run.precision], f"per-step relative errors {errors}"


def test_greedy_generation_matches_official_tokens(run):
    with torch.no_grad():
        generated = run.model.generate(
            input_ids=run.chat_prompt,
            **run.chat_inputs(),
            max_new_tokens=len(run.greedy),
            do_sample=False,
            eos_token_id=None,
        )
    assert generated[0, run.chat_prompt.shape[1] :].tolist() == run.greedy.tolist()


def test_eager_attention_matches_official(converted_tiny):
    run = OfficialRun(converted_tiny, "fp32", attn_implementation="eager")
    error = relative_error(run.recon.world_points, run.golden.tensors["recon.points"])
    assert error <= TOLERANCE["fp32"]
