"""Behaviour of the model on tiny random weights and on the converted official fixture: caching, generation,
batching, attention pattern, expert routing, save/load, geometry invariants and input errors."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import (
    NEWLINE_TOKEN_ID,
    TINY_GEO_TOKEN,
    geometry_block,
    image_block,
    image_patches,
    load_golden,
    tiny_model,
    tiny_reconstruction_model,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, Dinov2WithRegistersModel, DynamicCache

from g2vlm_hf import G2VLMForConditionalGeneration

GRID_H, GRID_W, VIEWS = 2, 3, 2  # geometry views of 28x42 pixels
IMAGE_GRID = (4, 4)  # one semantic image of 4x4 patches -> 4 merged tokens


def views(batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, VIEWS, 3, GRID_H * 14, GRID_W * 14, generator=generator)


def chat_prompt(prefix: list[int], question: list[int]) -> list[int]:
    return [*prefix, *geometry_block(VIEWS, GRID_H, GRID_W), *image_block(*IMAGE_GRID), *question]


def chat_and_reconstruction_inputs() -> tuple[dict, dict]:
    """A chat prompt with a semantic image and geometry views, and a reconstruction-only prompt over those views."""
    pixels, grid = image_patches(*IMAGE_GRID)
    chat = dict(
        input_ids=torch.tensor([chat_prompt([1, 5, 6], [8, 9])]), pixel_values=pixels, image_grid_thw=grid,
        geometry_pixel_values=views(),
    )  # fmt: skip
    recon = dict(
        input_ids=torch.tensor([[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]]), geometry_pixel_values=views()
    )
    return chat, recon


@pytest.fixture(scope="module")
def model() -> G2VLMForConditionalGeneration:
    return tiny_model()


@pytest.fixture(scope="module")
def chat_inputs() -> dict:
    pixels, grid = image_patches(*IMAGE_GRID)
    ids = torch.tensor([chat_prompt([1, 5, 6, 7], [8, 9, 10, 11])])
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, geometry_pixel_values=views())


def test_single_pass_equals_phased_cached_computation_on_official_fixture(converted_tiny):
    """The official inference runs in phases with a KV cache; one forward over the whole prompt must agree."""
    golden = load_golden("fp32")
    model = AutoModelForImageTextToText.from_pretrained(converted_tiny, dtype=torch.float32).eval()
    config, tensors = model.config, golden.tensors
    phases = [
        dict(input_ids=tensors["chat.phase0.packed_text_ids"]),
        dict(
            input_ids=golden.phase_ids("chat.phase1", "packed_dino_token_indexes", config.geometry_token_id),
            geometry_pixel_values=tensors["chat.phase1.packed_dino_images"][None],
        ),
        dict(
            input_ids=golden.phase_ids("chat.phase2", "packed_vit_token_indexes", config.image_token_id),
            pixel_values=tensors["chat.phase2.packed_vit_images"][0],
            image_grid_thw=tensors["chat.phase2.packed_image_grid_thw"],
        ),
        dict(input_ids=torch.cat([tensors["chat.phase3.packed_text_ids"], torch.tensor([NEWLINE_TOKEN_ID])])),
    ]
    cache = DynamicCache(config=config.text_config)
    with torch.no_grad():
        phased = [
            model(**{**phase, "input_ids": phase["input_ids"][None]}, past_key_values=cache, use_cache=True).logits
            for phase in phases
        ]
        merged = {key: value for phase in phases for key, value in phase.items() if key != "input_ids"}
        single = model(input_ids=torch.cat([phase["input_ids"] for phase in phases])[None], **merged).logits
    torch.testing.assert_close(torch.cat(phased, dim=1), single, rtol=1e-4, atol=1e-5)


def test_single_pass_equals_phased_cached_computation_with_gqa(model, chat_inputs):
    ids = chat_inputs["input_ids"]
    prefix = 4
    geometry_end = prefix + len(geometry_block(VIEWS, GRID_H, GRID_W))
    image_end = geometry_end + len(image_block(*IMAGE_GRID))
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        single = model(**chat_inputs).logits
        phased = [
            model(input_ids=ids[:, :prefix], past_key_values=cache, use_cache=True).logits,
            model(
                input_ids=ids[:, prefix:geometry_end],
                geometry_pixel_values=chat_inputs["geometry_pixel_values"],
                past_key_values=cache,
                use_cache=True,
            ).logits,
            model(
                input_ids=ids[:, geometry_end:image_end],
                pixel_values=chat_inputs["pixel_values"],
                image_grid_thw=chat_inputs["image_grid_thw"],
                past_key_values=cache,
                use_cache=True,
            ).logits,
            model(input_ids=ids[:, image_end:], past_key_values=cache, use_cache=True).logits,
        ]
    torch.testing.assert_close(torch.cat(phased, dim=1), single, rtol=1e-4, atol=1e-5)


def test_generate_with_cache_equals_recomputing_without_cache(model, chat_inputs):
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(**chat_inputs, use_cache=True, **kwargs)
        uncached = model.generate(**chat_inputs, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), rtol=1e-4, atol=1e-5)


def test_generate_continues_the_single_pass_greedy_argmax(model, chat_inputs):
    with torch.no_grad():
        generated = model.generate(**chat_inputs, max_new_tokens=4, do_sample=False)
        sequence = chat_inputs["input_ids"]
        for _ in range(4):
            logits = model(**{**chat_inputs, "input_ids": sequence}).logits
            sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, sequence)


def test_left_padded_batch_generation_equals_one_by_one(model):
    prompts = [chat_prompt([1, 5], [8, 9, 10]), chat_prompt([1, 5, 6, 7, 12, 13], [8])]
    geometry = views(batch=2)
    pixels = [image_patches(*IMAGE_GRID, seed=row) for row in range(2)]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        batched = model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=torch.cat([p for p, _ in pixels]),
            image_grid_thw=torch.cat([g for _, g in pixels]),
            geometry_pixel_values=geometry,
            max_new_tokens=5,
            do_sample=False,
        )
        for row, prompt in enumerate(prompts):
            single = model.generate(
                input_ids=torch.tensor([prompt]),
                pixel_values=pixels[row][0],
                image_grid_thw=pixels[row][1],
                geometry_pixel_values=geometry[row : row + 1],
                max_new_tokens=5,
                do_sample=False,
            )
            assert batched[row, width:].tolist() == single[0, len(prompt) :].tolist()


def test_reconstruct_batch_equals_one_scene_at_a_time(model):
    ids = torch.tensor([[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]] * 2)
    scenes = views(batch=2)
    with torch.no_grad():
        batched = model.reconstruct(input_ids=ids, geometry_pixel_values=scenes)
        for row in range(2):
            single = model.reconstruct(input_ids=ids[row : row + 1], geometry_pixel_values=scenes[row : row + 1])
            for name in ("camera_poses", "local_points", "world_points", "global_points", "depth", "confidence"):
                torch.testing.assert_close(batched[name][row], single[name][0], rtol=1e-4, atol=1e-5)


def test_a_padded_reconstruct_batch_needs_its_attention_mask(model):
    """With the mask, a left-padded scene reconstructs as it does alone; without it the padding is attended to, which
    changes the result, and a warning says so (as transformers warns for its models)."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    prompts = [[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)], [1, 5, 6, 7, *geometry_block(VIEWS, GRID_H, GRID_W)]]
    pad, width = model.config.text_config.pad_token_id, max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width) >= torch.tensor([[width - len(p)] for p in prompts])).long()
    scenes = views(batch=2)
    logger = logging.get_logger("g2vlm_hf.modeling.modeling_g2vlm")
    logging.warning_once.cache_clear()  # said once per process
    with torch.no_grad():
        with CaptureLogger(logger) as quiet:
            alone = model.reconstruct(input_ids=torch.tensor(prompts[:1]), geometry_pixel_values=scenes[:1])
            masked = model.reconstruct(input_ids=ids, attention_mask=mask, geometry_pixel_values=scenes)
        with CaptureLogger(logger) as warned:
            unmasked = model.reconstruct(input_ids=ids, geometry_pixel_values=scenes)
    assert quiet.out == "" and "no `attention_mask` was given" in warned.out
    torch.testing.assert_close(masked.world_points[0], alone.world_points[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unmasked.world_points[0], alone.world_points[0], rtol=1e-3, atol=1e-4)


def test_geometry_invariants_hold_for_random_weights(model):
    ids = torch.tensor([[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]])
    with torch.no_grad():
        out = model.reconstruct(input_ids=ids, geometry_pixel_values=views(seed=3))
    shape = (1, VIEWS, GRID_H * 14, GRID_W * 14)
    assert out.camera_poses.shape == (1, VIEWS, 4, 4)
    assert out.local_points.shape == out.world_points.shape == out.global_points.shape == (*shape, 3)
    assert out.depth.shape == out.confidence.shape == shape
    assert all(t.dtype == torch.float32 for t in (out.camera_poses, out.local_points, out.depth))
    rotations = out.camera_poses[..., :3, :3].double()
    identity = torch.eye(3, dtype=torch.float64).expand_as(rotations)
    torch.testing.assert_close(rotations @ rotations.transpose(-1, -2), identity, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        torch.linalg.det(rotations), torch.ones(1, VIEWS, dtype=torch.float64), rtol=0, atol=1e-5
    )
    assert torch.equal(out.camera_poses[..., 3, :], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(1, VIEWS, 4))
    homogeneous = torch.cat([out.local_points, torch.ones_like(out.depth)[..., None]], dim=-1)
    world = torch.einsum("bnij,bnhwj->bnhwi", out.camera_poses, homogeneous)[..., :3]
    torch.testing.assert_close(out.world_points, world, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.depth, out.local_points[..., 2])
    assert bool((out.depth > 0).all())


def test_image_blocks_are_bidirectional_and_text_is_causal(model):
    ids = torch.tensor([[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W), 8, 9]])
    scene = views()
    first_geo = 3  # after [1, 5, <start>]
    with torch.no_grad():
        base = model.model(input_ids=ids, geometry_pixel_values=scene).last_hidden_state
        # the second view changes: the FIRST view's tokens see it (one block over all views) ...
        other = scene.clone()
        other[:, 1] += 1.0
        changed_view = model.model(input_ids=ids, geometry_pixel_values=other).last_hidden_state
        # ... while a text token after the block changes nothing before it
        later_text = ids.clone()
        later_text[0, -1] = 10
        changed_text = model.model(input_ids=later_text, geometry_pixel_values=scene).last_hidden_state
    assert not torch.allclose(changed_view[0, first_geo], base[0, first_geo])
    assert torch.allclose(changed_view[0, :2], base[0, :2])  # text before the block is causal
    assert torch.equal(changed_text[0, :-1], base[0, :-1])


def test_a_prompt_whose_view_lost_its_end_marker_is_refused_before_the_encoders_run(model, chat_inputs, monkeypatch):
    ids = chat_inputs["input_ids"][0].tolist()
    last_view_end = len(ids) - 1 - ids[::-1].index(TINY_GEO_TOKEN) + 1
    broken = dict(chat_inputs, input_ids=torch.tensor([ids[:last_view_end] + ids[last_view_end + 1 :]]))
    monkeypatch.setattr(type(model.model), "get_geometry_features", lambda *args: pytest.fail("encoder ran"))
    with pytest.raises(ValueError, match="placeholder tokens must sit directly between <\\|vision_start\\|>"):
        model(**broken)


def test_text_only_tokens_never_use_the_geometry_expert(model):
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        layer = model.model.language_model.layers[0]
        saved = layer.self_attn.geo_q_proj.weight.clone()
        layer.self_attn.geo_q_proj.weight.add_(1.0)
        after = model(input_ids=ids).logits
        with_geometry = model(
            input_ids=torch.tensor([[1, *geometry_block(1, GRID_H, GRID_W)]]), geometry_pixel_values=views()[:, :1]
        )
        layer.self_attn.geo_q_proj.weight.copy_(saved)
        with_geometry_restored = model(
            input_ids=torch.tensor([[1, *geometry_block(1, GRID_H, GRID_W)]]), geometry_pixel_values=views()[:, :1]
        )
    assert torch.equal(before, after)
    assert not torch.allclose(with_geometry.logits, with_geometry_restored.logits)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_backends_agree_with_padding(implementation, chat_inputs):
    """Each backend, on a left-padded prompt, gives what eager gives on the prompt without padding."""
    reference = tiny_model(seed=1)
    reference.set_attn_implementation("eager")
    candidate = tiny_model(seed=1)
    candidate.set_attn_implementation(implementation)
    for sub_model in (candidate.model.language_model, candidate.model.visual, candidate.model.geometry_encoder):
        assert sub_model.config._attn_implementation == implementation
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), chat_inputs["input_ids"]], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(chat_inputs["input_ids"])], dim=1)
    inputs = {**chat_inputs, "input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        expected = reference(**chat_inputs).logits
        actual = candidate(**inputs).logits[:, 3:]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_per_view_geometry_encoder_is_plain_dinov2(model):
    encoder = model.model.geometry_encoder
    assert not encoder.packed_windows
    reference = Dinov2WithRegistersModel(encoder.config).eval()
    # our attention keeps the original DINOv2 leaf names; transformers' uses q/k/v/o_proj
    names = {".attention.query.": ".attention.q_proj.", ".attention.key.": ".attention.k_proj.",
             ".attention.value.": ".attention.v_proj.", ".attention.dense.": ".attention.o_proj."}  # fmt: skip
    state = {}
    for key, value in encoder.state_dict().items():
        for ours, theirs in names.items():
            key = key.replace(ours, theirs)
        state[key] = value
    reference.load_state_dict(state)
    pixels = views().flatten(0, 1)
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state[:, 1 + encoder.config.num_register_tokens :]
        actual = encoder(pixels, views_per_scene=VIEWS)
    torch.testing.assert_close(actual, expected)


def test_packed_window_mode_leaves_the_tail_tokens_without_attention():
    model = tiny_model(geometry_encoder_attention="official_packed_windows")
    encoder = model.model.geometry_encoder
    captured = []
    hook = encoder.encoder.layer[0].attention.dense.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    with torch.no_grad():
        encoder(views().flatten(0, 1), views_per_scene=VIEWS)
    hook.remove()
    attended = captured[0].reshape(VIEWS * (GRID_H * GRID_W + 5), -1)
    tail = 5 * VIEWS  # CLS + 4 registers per view, counted from the end of the packed scene
    assert torch.count_nonzero(attended[-tail:]) == 0
    assert bool((attended[:-tail].abs().sum(-1) > 0).all())


def test_save_pretrained_round_trip(model, chat_inputs, tmp_path):
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, G2VLMForConditionalGeneration)
    assert all(not keys for name, keys in info.items()), info
    ids = torch.tensor([[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**chat_inputs).logits, model(**chat_inputs).logits, rtol=0, atol=0)
        expected = model.reconstruct(input_ids=ids, geometry_pixel_values=views())
        actual = loaded.reconstruct(input_ids=ids, geometry_pixel_values=views())
    torch.testing.assert_close(actual.world_points, expected.world_points, rtol=0, atol=0)


@pytest.mark.parametrize("build", [tiny_model, tiny_reconstruction_model], ids=["chat-model", "reconstruction-model"])
def test_initialisation_covers_every_parameter(tmp_path, build):
    """Weights missing from a checkpoint are initialised by the model (the chat model and the reconstruction-only
    class): from_pretrained builds it on the meta device, materialises the missing weights uninitialised and runs the
    model's initialisation on them. Every parameter but one is missing here: all come out finite, the geometry
    LayerScale at the config's value."""
    saved = build()
    # a value no tensor ever held (the constructor filled gamma with the default): uninitialised memory cannot pass
    saved.config.text_config.geometry_layer_scale_init = 0.375
    saved.save_pretrained(tmp_path)
    kept = "model.geometry_encoder.embeddings.cls_token"
    save_file({kept: load_file(tmp_path / "model.safetensors")[kept]}, tmp_path / "model.safetensors", {"format": "pt"})
    model = type(saved).from_pretrained(tmp_path)
    scales = {name: p for name, p in model.named_parameters() if name.endswith("layer_scale.gamma")}
    assert len(scales) == 2 * model.config.text_config.num_hidden_layers
    for name, gamma in scales.items():
        assert torch.all(gamma == 0.375), name
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name


class TestBadInput:
    def test_geometry_sides_must_be_multiples_of_the_patch(self, model):
        ids = torch.tensor([[1, *geometry_block(1, GRID_H, GRID_W)]])
        with pytest.raises(ValueError, match="multiples of the patch size 14"):
            model.reconstruct(input_ids=ids, geometry_pixel_values=torch.randn(1, 1, 3, 30, 42))

    def test_views_of_one_scene_must_share_a_size(self, model):
        ids = torch.tensor([[1, *geometry_block(2, GRID_H, GRID_W)]])
        with pytest.raises(ValueError, match="same size"):
            model.reconstruct(input_ids=ids, geometry_pixel_values=[torch.randn(3, 28, 42), torch.randn(3, 42, 28)])

    @pytest.mark.parametrize(
        ("values", "message"),
        [
            (lambda v: v.numpy(), "must be torch tensors, got ndarray; call the processor with return_tensors='pt'"),
            (lambda v: (v * 50).to(torch.uint8), "normalised floating-point views, got torch.uint8"),
            (lambda v: v.index_fill(1, torch.tensor([1]), float("nan")), "holds NaN or infinite values"),
            (lambda v: v.index_fill(4, torch.tensor([0]), float("inf")), "holds NaN or infinite values"),
        ],
        ids=["numpy", "uint8", "nan", "inf"],
    )
    def test_geometry_views_must_be_finite_float_tensors(self, model, values, message):
        """What the model reads is what the processor makes; anything else is named before the encoders run (NaN
        views made generate answer token 0 and reconstruct fail inside an SVD)."""
        ids = torch.tensor([[1, *geometry_block(VIEWS, GRID_H, GRID_W)]])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "geometry_pixel_values": values(views())}
        for run in (model.reconstruct, model.__call__, functools.partial(model.generate, max_new_tokens=1)):
            with pytest.raises(ValueError, match=message):
                run(**inputs)

    def test_input_ids_must_be_a_batch_of_sequences(self, model):
        ids = torch.tensor([[1, *geometry_block(VIEWS, GRID_H, GRID_W)]])
        generate = functools.partial(model.generate, max_new_tokens=1)
        # (generate() itself reads `.shape` of a list before the model sees it)
        for bad, got, runs in ((ids[0].tolist(), "list", (model.reconstruct, model.__call__)),
                               (ids[0], rf"shape \({ids.shape[1]},\)", (model.reconstruct, model.__call__, generate))):  # fmt: skip
            for run in runs:
                with pytest.raises(ValueError, match=rf"must be a \(batch_size, sequence_length\) tensor, got {got};"):
                    run(input_ids=bad, geometry_pixel_values=views())

    def test_geometry_placeholder_count_must_match_the_features(self, model):
        ids = torch.tensor([[1, *geometry_block(2, GRID_H, GRID_W)[:-3], 99]])
        with pytest.raises(ValueError, match="geometry placeholder tokens"):
            model.reconstruct(input_ids=ids, geometry_pixel_values=views())

    def test_semantic_images_must_be_finite(self, model):
        """NaN patches made generate answer token 0 without a word."""
        pixels, grid = image_patches(*IMAGE_GRID)
        ids = torch.tensor([[1, *image_block(*IMAGE_GRID)]])
        bad = pixels.index_fill(0, torch.tensor([2]), float("nan"))
        for run in (model.__call__, functools.partial(model.generate, max_new_tokens=1)):
            with pytest.raises(ValueError, match="pixel_values holds NaN or infinite values"):
                run(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=bad, image_grid_thw=grid)

    def test_image_placeholders_need_pixel_values(self, model):
        with pytest.raises(ValueError, match="no `pixel_values`"):
            model(input_ids=torch.tensor([[1, *image_block(*IMAGE_GRID)]]))

    def test_more_images_than_placeholders(self, model):
        pixels, grid = image_patches(*IMAGE_GRID)
        with pytest.raises(ValueError, match="placeholder tokens"):
            model(
                input_ids=torch.tensor([[1, *image_block(*IMAGE_GRID)]]),
                pixel_values=torch.cat([pixels, pixels]),
                image_grid_thw=torch.cat([grid, grid]),
            )

    def test_geometry_placeholders_need_views(self, model):
        with pytest.raises(ValueError, match="no `geometry_pixel_values`"):
            model(input_ids=torch.tensor([[1, TINY_GEO_TOKEN]]))


def rotate_2d_reference(states: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, theta: float) -> torch.Tensor:
    """The 2D RoPE of the official heads written out: the first half of each head turns with the patch row, the second
    with the patch column, each half a 1D RoPE (rotate-half convention) with base `theta`. states `(seq, heads, dim)`."""

    def rotate_1d(half: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        dim = half.shape[-1]
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = (positions.double()[:, None] * inv_freq).repeat(1, 2)[:, None]  # (seq, 1, dim)
        turned = torch.cat((-half[..., dim // 2 :], half[..., : dim // 2]), dim=-1)
        return half * angles.cos() + turned * angles.sin()

    row_half, column_half = states.double().chunk(2, dim=-1)
    return torch.cat((rotate_1d(row_half, rows), rotate_1d(column_half, columns)), dim=-1)


def test_the_views_of_a_scene_attend_to_its_first_view_alone():
    """The global-points decoder's cross-attention computes a scene's context keys once for all of its views; each view
    must get what attending to its own scene's context alone gives, written out per view in float64."""
    from g2vlm_hf.modeling.head_layers import G2VLMRotary2D

    model = tiny_model()
    cross_attention = model.geometry_heads.global_points_decoder.blocks[0].cross_attn
    theta = model.config.head_rope_theta
    scenes, views, grid_h, grid_w = 2, 3, 3, 4
    dim, heads = model.config.text_config.hidden_size, cross_attention.num_heads
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(scenes * views, grid_h * grid_w, dim, generator=generator)
    context = torch.randn(scenes, grid_h * grid_w, dim, generator=generator)
    rows, columns = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    rows, columns = rows.flatten(), columns.flatten()
    rope = G2VLMRotary2D(theta).embeddings(torch.stack((rows, columns), dim=-1)[None], dim // heads, torch.float32)
    with torch.no_grad():
        output = cross_attention(hidden, context, rope)

        def linear(layer, states):
            return (states.double() @ layer.weight.double().T + layer.bias.double()).unflatten(-1, (heads, -1))

        for view in range(scenes * views):
            scene = view // views
            query = rotate_2d_reference(linear(cross_attention.query, hidden[view]), rows, columns, theta)
            key = rotate_2d_reference(linear(cross_attention.key, context[scene]), rows, columns, theta)
            value = linear(cross_attention.value, context[scene])
            scores = torch.einsum("qhd,khd->hqk", query, key) / (dim // heads) ** 0.5
            attended = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), value).flatten(-2)
            expected = attended @ cross_attention.proj.weight.double().T + cross_attention.proj.bias.double()
            torch.testing.assert_close(output[view].double(), expected, rtol=1e-4, atol=1e-5)


def test_two_requests_interleaved_step_by_step_equal_each_alone(model):
    """No per-request state on the model: each cache carries its own rope deltas, so two generations of different
    image layouts advanced alternately on one model give what each gives alone."""
    pixels, grid = image_patches(*IMAGE_GRID)
    requests = [
        dict(
            input_ids=torch.tensor([chat_prompt([1, 5, 6], [8, 9])]),
            pixel_values=pixels,
            image_grid_thw=grid,
            geometry_pixel_values=views(),
        ),
        dict(
            input_ids=torch.tensor([[1, 7, *image_block(*IMAGE_GRID), 8, 9, 10]]),
            pixel_values=pixels,
            image_grid_thw=grid,
        ),
    ]

    def start(request):
        cache = DynamicCache(config=model.config.text_config)
        logits = model(**request, past_key_values=cache, use_cache=True).logits
        return cache, [int(logits[0, -1].argmax())]

    def step(cache, tokens):
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits
        tokens.append(int(logits[0, -1].argmax()))

    with torch.no_grad():
        alone = []
        for request in requests:
            cache, tokens = start(request)
            for _ in range(5):
                step(cache, tokens)
            alone.append((tokens, cache.layers[0].keys.clone()))
        states = [start(request) for request in requests]
        for _ in range(5):
            for cache, tokens in states:
                step(cache, tokens)
    for (tokens, keys), (cache, interleaved) in zip(alone, states):
        assert interleaved == tokens
        torch.testing.assert_close(cache.layers[0].keys, keys)  # the same positions went into the cache
    assert not hasattr(model.model, "rope_deltas")
