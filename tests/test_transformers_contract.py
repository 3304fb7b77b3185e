"""transformers' model contract, as its common test mixins and its users exercise it: output flags, tuple outputs,
`inputs_embeds`, image features, assisted and continued generation, the cache's name, losses and the Auto classes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURE_DIR, TINY_GEO_TOKEN, geometry_block, image_block, image_patches, load_golden, tiny_model
from transformers import AutoModel, AutoProcessor, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from g2vlm_hf import G2VLMForConditionalGeneration
from g2vlm_hf.modeling.compat import CACHE_NAME, output_cache

GRID_H, GRID_W, VIEWS = 2, 3, 2
IMAGE_GRID = (4, 4)


def views(batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, VIEWS, 3, GRID_H * 14, GRID_W * 14, generator=generator)


def chat_inputs(question: list[int] | None = None) -> dict:
    pixels, grid = image_patches(*IMAGE_GRID)
    ids = [1, 5, 6, *geometry_block(VIEWS, GRID_H, GRID_W), *image_block(*IMAGE_GRID), *(question or [8, 9, 10])]
    return dict(input_ids=torch.tensor([ids]), pixel_values=pixels, image_grid_thw=grid, geometry_pixel_values=views())


@pytest.fixture(scope="module")
def model() -> G2VLMForConditionalGeneration:
    return tiny_model()


@pytest.fixture(scope="module")
def eager_model() -> G2VLMForConditionalGeneration:
    model = tiny_model()
    model.set_attn_implementation("eager")
    return model


class TestOutputFlags:
    def test_hidden_states_and_attentions_are_returned(self, eager_model):
        inputs = chat_inputs()
        with torch.no_grad():
            out = eager_model(**inputs, output_hidden_states=True, output_attentions=True)
            last = eager_model.model(**inputs).last_hidden_state
        layers = eager_model.config.text_config.num_hidden_layers
        length = inputs["input_ids"].shape[1]
        assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
        assert all(state.shape == (1, length, 128) for state in out.hidden_states)
        torch.testing.assert_close(out.hidden_states[-1], last)  # the last one is after the experts' final norms
        geometry = torch.nonzero(inputs["input_ids"][0] == TINY_GEO_TOKEN).flatten()
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        text_rows = [0, 1, 2, length - 3, length - 2, length - 1]
        for weights in out.attentions:
            assert weights.shape == (1, 4, length, length)
            # the weights the layer used follow the model's mask: text rows never weigh a later token, while every
            # geometry token weighs every geometry token of its block, later ones included
            assert (weights[0][:, text_rows][:, future[text_rows]] == 0).all()
            assert (weights[0][:, geometry][:, :, geometry] > 0).all()

    def test_generate_returns_hidden_states_and_attentions(self, eager_model):
        inputs = chat_inputs()
        out = eager_model.generate(
            **inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
            output_hidden_states=True, output_attentions=True,
        )  # fmt: skip
        length = inputs["input_ids"].shape[1]
        assert len(out.hidden_states) == 3 and len(out.attentions) == 3
        assert out.hidden_states[0][-1].shape == (1, length, 128)  # prefill
        assert out.hidden_states[1][-1].shape == (1, 1, 128)  # one decode step
        assert out.attentions[1][0].shape == (1, 4, 1, length + 1)

    def test_return_dict_false_gives_the_tuple_of_the_output(self):
        model = tiny_model()  # its own: the config is changed below
        inputs = chat_inputs()
        with torch.no_grad():
            as_output = model(**inputs)
            as_tuple = model(**inputs, return_dict=False)
            model.config.return_dict = False
            try:
                from_config = model(**inputs)
                base = model.model(**inputs)
            finally:
                model.config.return_dict = True
        for result in (as_tuple, from_config):
            assert isinstance(result, tuple)
            torch.testing.assert_close(result[0], as_output.logits)
        assert isinstance(base, tuple)

    def test_use_cache_defaults_from_the_config(self):
        model = tiny_model()  # its own: the config is changed below
        inputs = chat_inputs()
        with torch.no_grad():
            assert isinstance(output_cache(model(**inputs)), DynamicCache)
            assert isinstance(
                output_cache(model.model.language_model(inputs_embeds=torch.randn(1, 3, 128))), DynamicCache
            )
            model.config.text_config.use_cache = False
            try:
                assert output_cache(model(**inputs)) is None
                assert output_cache(model.model.language_model(inputs_embeds=torch.randn(1, 3, 128))) is None
            finally:
                model.config.text_config.use_cache = True

    def test_the_cache_has_the_installed_transformers_name(self, model):
        with torch.no_grad():
            out = model(**chat_inputs())
        assert CACHE_NAME in out
        cache = output_cache(out)
        step = {"input_ids": torch.tensor([[11]]), CACHE_NAME: cache}
        with torch.no_grad():
            assert model(**step).logits.shape == (1, 1, 100)
        with pytest.raises(ValueError, match="not both"):
            model(input_ids=torch.tensor([[11]]), cache=cache, past_key_values=cache)


class TestInputsEmbeds:
    def test_inputs_embeds_alone_equal_input_ids(self, model):
        inputs = chat_inputs()
        ids = inputs.pop("input_ids")
        with torch.no_grad():
            expected = model(input_ids=ids, **inputs).logits
            embeds = model.get_input_embeddings()(ids)
            from_embeds = model(inputs_embeds=embeds, **inputs).logits
        torch.testing.assert_close(from_embeds, expected)

    def test_generate_from_inputs_embeds(self, model):
        inputs = chat_inputs()
        ids = inputs.pop("input_ids")
        embeds = model.get_input_embeddings()(ids)
        with torch.no_grad():
            expected = model.generate(input_ids=ids, **inputs, max_new_tokens=4, do_sample=False)
            from_embeds = model.generate(inputs_embeds=embeds, **inputs, max_new_tokens=4, do_sample=False)
            both = model.generate(input_ids=ids, inputs_embeds=embeds, **inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(from_embeds, expected[:, ids.shape[1] :])
        assert torch.equal(both, expected)

    def test_a_geometry_placeholder_outside_the_vocabulary_needs_input_ids(self):
        model = tiny_model(geometry_token_id=100)  # the embedding matrix has 100 rows
        with pytest.raises(ValueError, match="pass the prompt's `input_ids` together with `inputs_embeds`"):
            model(inputs_embeds=torch.randn(1, 8, 128), geometry_pixel_values=views())

    def test_neither_ids_nor_embeds(self, model):
        with pytest.raises(ValueError, match="Pass `input_ids`"):
            model(attention_mask=torch.ones(1, 3))


def test_get_image_features_returns_one_feature_block_per_image(model):
    first, grid_a = image_patches(4, 4, seed=0)
    second, grid_b = image_patches(4, 6, seed=1)
    pixels, grids = torch.cat([first, second]), torch.cat([grid_a, grid_b])
    with torch.no_grad():
        out = model.model.get_image_features(pixels, grids)
        vit = model.model.visual(pixels, grid_thw=grids)  # transformers' Qwen2-VL vision tower itself
        as_tuple = model.model.get_image_features(pixels, grids, return_dict=False)
    assert isinstance(out, BaseModelOutputWithPooling)
    assert [feature.shape for feature in out.pooler_output] == [(4, 128), (6, 128)]
    torch.testing.assert_close(torch.cat(out.pooler_output), vit.pooler_output)
    assert isinstance(as_tuple, tuple)


class TestGeneration:
    def test_assisted_decoding_with_a_g2vlm_assistant_equals_greedy(self, eager_model):
        inputs = chat_inputs()
        assistant = tiny_model(seed=1)
        assistant.set_attn_implementation("eager")
        kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_attentions=True)
        with torch.no_grad():
            greedy = eager_model.generate(**inputs, **kwargs)
            assisted = eager_model.generate(**inputs, assistant_model=assistant, **kwargs)
        assert torch.equal(assisted.sequences, greedy.sequences)
        assert assisted.attentions is not None

    def test_continuing_from_the_cache_equals_recomputing_the_conversation(self, model):
        inputs = chat_inputs()
        with torch.no_grad():
            first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            next_turn = torch.cat([first.sequences, torch.tensor([[12, 13, 14]])], dim=1)
            media = {key: value for key, value in inputs.items() if key != "input_ids"}
            recomputed = model.generate(next_turn, **media, max_new_tokens=4, do_sample=False)
            continued = model.generate(
                next_turn, **{CACHE_NAME: output_cache(first)}, max_new_tokens=4, do_sample=False
            )  # images not sent again: they live in the cache
        assert torch.equal(continued, recomputed)

    def test_image_grids_without_their_pixels_are_ignored(self, model):
        # generate(..., image_grid_thw=...) with the pixels dropped, as transformers' continuation test does
        inputs = chat_inputs()
        with torch.no_grad():
            first = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
            next_turn = torch.cat([first.sequences, torch.tensor([[12, 13]])], dim=1)
            plain = model.generate(next_turn, **{CACHE_NAME: output_cache(first)}, max_new_tokens=2, do_sample=False)
        with torch.no_grad():
            first = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
            with_grid = model.generate(
                next_turn, image_grid_thw=inputs["image_grid_thw"], **{CACHE_NAME: output_cache(first)},
                max_new_tokens=2, do_sample=False,
            )  # fmt: skip
        assert torch.equal(with_grid, plain)

    def test_a_new_image_in_a_later_turn(self, model):
        inputs = chat_inputs()
        pixels, grid = image_patches(4, 4, seed=3)
        second_image = [*image_block(4, 4), 15]
        with torch.no_grad():
            first = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
            next_turn = torch.cat([first.sequences, torch.tensor([second_image])], dim=1)
            recomputed = model.generate(
                next_turn, pixel_values=torch.cat([inputs["pixel_values"], pixels]),
                image_grid_thw=torch.cat([inputs["image_grid_thw"], grid]),
                geometry_pixel_values=inputs["geometry_pixel_values"], max_new_tokens=3, do_sample=False,
            )  # fmt: skip
            continued = model.generate(
                next_turn, pixel_values=pixels, image_grid_thw=grid, **{CACHE_NAME: output_cache(first)},
                max_new_tokens=3, do_sample=False,
            )  # fmt: skip
        assert torch.equal(continued, recomputed)

    @pytest.mark.parametrize("batch", [1, 2])
    def test_beam_search_sees_each_prompt_with_its_own_images(self, model, batch):
        first = chat_inputs()
        pixels, grid = image_patches(4, 6, seed=5)  # the second prompt's image is another size
        ids = [1, 7, *geometry_block(VIEWS, GRID_H, GRID_W), *image_block(4, 6), 8]
        second = dict(input_ids=torch.tensor([ids]), pixel_values=pixels, image_grid_thw=grid)
        prompts = [first, second][:batch]
        width = max(p["input_ids"].shape[1] for p in prompts)
        inputs = dict(
            input_ids=torch.cat([F.pad(p["input_ids"], (width - p["input_ids"].shape[1], 0)) for p in prompts]),
            attention_mask=torch.cat(
                [F.pad(torch.ones_like(p["input_ids"]), (width - p["input_ids"].shape[1], 0)) for p in prompts]
            ),
            pixel_values=torch.cat([p["pixel_values"] for p in prompts]),
            image_grid_thw=torch.cat([p["image_grid_thw"] for p in prompts]),
            geometry_pixel_values=views(batch),
        )
        with torch.no_grad():
            expected = model(**inputs).logits[:, -1]
            out = model.generate(
                **inputs, num_beams=3, num_return_sequences=3, max_new_tokens=1, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        # every beam of a prompt starts from that prompt's own next-token logits
        torch.testing.assert_close(out.logits[0], expected.repeat_interleave(3, dim=0), rtol=1e-4, atol=1e-5)


class TestLosses:
    def test_labels_copied_from_input_ids_skip_the_placeholders(self, converted_tiny):
        model = G2VLMForConditionalGeneration.from_pretrained(converted_tiny).eval()
        processor = AutoProcessor.from_pretrained(converted_tiny)
        inputs = processor(geometry_images=[FIXTURE_DIR / "images" / "view_0.png"], return_tensors="pt")
        ids = inputs["input_ids"]
        assert int(ids.max()) >= model.config.text_config.vocab_size  # <|geo_pad|> lies outside the LM head
        with torch.no_grad():
            out = model(**inputs, labels=ids.clone())
        # transformers' causal LM loss written out: shift, drop the placeholders, mean cross-entropy
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == model.config.geometry_token_id, -100)
        expected = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        torch.testing.assert_close(out.loss, expected)

    def test_other_out_of_range_labels_are_refused(self, model):
        inputs = chat_inputs()
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[0, -1] = 1000
        with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 100\).*-100"):
            model(**inputs, labels=labels)

    def test_a_batch_with_nothing_to_learn_gives_a_zero_loss(self):
        model = tiny_model().train()
        inputs = chat_inputs()
        out = model(**inputs, labels=torch.full_like(inputs["input_ids"], -100))
        assert out.loss.item() == 0.0
        out.loss.backward()
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())

    def test_language_loss_alone_leaves_the_heads_without_gradient_and_says_so(self):
        model = tiny_model().train()
        inputs = chat_inputs()
        logger = logging.get_logger("g2vlm_hf.modeling.modeling_g2vlm")
        logging.warning_once.cache_clear()  # said once per process: other training tests may have said it already
        with CaptureLogger(logger) as captured:
            model(**inputs, labels=inputs["input_ids"].clone()).loss.backward()
        assert "find_unused_parameters" in captured.out
        without = {name for name, p in model.named_parameters() if p.requires_grad and p.grad is None}
        assert without and all(name.startswith("geometry_heads.") for name in without)


def test_geometry_heads_are_built_in_float32_under_a_half_precision_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = tiny_model()
    finally:
        torch.set_default_dtype(previous)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.geometry_heads.parameters()} == {torch.float32}


@pytest.mark.skipif(CACHE_NAME == "past_key_values", reason="transformers < 5.24 has no other name for the cache")
def test_the_legacy_cache_name_is_deprecated_as_in_transformers(model):
    with torch.no_grad():
        cache = output_cache(model(**chat_inputs()))
    with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):  # as transformers' deprecate_kwarg
        model(input_ids=torch.tensor([[11]]), past_key_values=cache)


def test_auto_model_loads_a_model_that_reconstructs_as_the_official_code(converted_tiny):
    processor = AutoProcessor.from_pretrained(converted_tiny)
    model, info = AutoModel.from_pretrained(converted_tiny, output_loading_info=True, dtype=torch.float32)
    assert isinstance(model, G2VLMForConditionalGeneration)
    assert not any(info.values()), info
    views = [FIXTURE_DIR / "images" / f"view_{index}.png" for index in range(3)]
    with torch.no_grad():
        scene = model.eval().reconstruct(**processor(geometry_images=views, return_tensors="pt"))
    golden = load_golden("fp32").tensors  # the official `recon` on the same three views
    torch.testing.assert_close(scene.camera_poses, golden["recon.camera_poses"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scene.world_points, golden["recon.points"], rtol=1e-4, atol=1e-4)


def test_a_model_cast_to_bfloat16_still_reconstructs_in_float32(model):
    inputs = dict(
        input_ids=torch.tensor([[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]]), geometry_pixel_values=views()
    )
    cast = tiny_model().to(torch.bfloat16)
    with torch.no_grad():
        reference = model.reconstruct(**inputs)
        scene = cast.reconstruct(**inputs)
    assert scene.world_points.dtype == torch.float32 and scene.camera_poses.dtype == torch.float32
    rotations = scene.camera_poses[..., :3, :3]
    torch.testing.assert_close(
        rotations @ rotations.transpose(-1, -2), torch.eye(3).expand_as(rotations), atol=1e-5, rtol=0
    )
    relative = (scene.world_points - reference.world_points).norm() / reference.world_points.norm()
    assert relative < 0.1
