"""G2VLMProcessor: official prompt/token parity from the PNG files, chat template, batching, save/load, bad input."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from conftest import FIXTURE_DIR, NEWLINE_TOKEN_ID, load_golden
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, TextStreamer

from g2vlm_hf import G2VLMGeometryImageProcessor, G2VLMProcessor

IMAGES = FIXTURE_DIR / "images"
VIEWS = [IMAGES / f"view_{index}.png" for index in range(3)]


@pytest.fixture(scope="module")
def processor(converted_tiny) -> G2VLMProcessor:
    return AutoProcessor.from_pretrained(converted_tiny)


@pytest.fixture(scope="module")
def model(converted_tiny):
    return AutoModelForImageTextToText.from_pretrained(converted_tiny, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def golden():
    return load_golden("fp32")


def chat_messages(question: str, *images) -> list[dict]:
    content = [{"type": "image", "image": str(image)} for image in images]
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


def test_reconstruction_inputs_equal_the_official_ones(processor, golden):
    inputs = processor(geometry_images=VIEWS, return_tensors="pt")
    tensors = golden.tensors
    assert torch.equal(inputs["geometry_pixel_values"][0], tensors["recon.phase1.packed_dino_images"])
    expected = torch.cat(
        [
            tensors["recon.phase0.packed_text_ids"],
            golden.phase_ids("recon.phase1", "packed_dino_token_indexes", processor.geometry_token_id),
        ]
    )
    assert inputs["input_ids"][0].tolist() == expected.tolist()


def test_reconstruction_from_png_files_matches_official(processor, model, golden):
    with torch.no_grad():
        out = model.reconstruct(**processor(geometry_images=[str(v) for v in VIEWS], return_tensors="pt"))
    for name, key in (("camera_poses", "recon.camera_poses"), ("world_points", "recon.points")):
        golden_tensor = golden.tensors[key]
        assert float((out[name] - golden_tensor).norm() / golden_tensor.norm()) <= 1e-4


def test_chat_template_reproduces_the_official_prompt(processor, golden):
    question = golden.meta["chat"]["question"]
    inputs = processor.apply_chat_template(
        chat_messages(question, IMAGES / "chat.png"), add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )  # fmt: skip
    tensors = golden.tensors
    expected = torch.cat(
        [
            tensors["chat.phase0.packed_text_ids"],
            golden.phase_ids("chat.phase1", "packed_dino_token_indexes", processor.geometry_token_id),
            golden.phase_ids("chat.phase2", "packed_vit_token_indexes", processor.image_token_id),
            tensors["chat.phase3.packed_text_ids"],
            torch.tensor([NEWLINE_TOKEN_ID]),  # the official decoding starts by feeding "\n"
        ]
    )
    assert inputs["input_ids"][0].tolist() == expected.tolist()
    assert torch.equal(inputs["pixel_values"], tensors["chat.phase2.packed_vit_images"][0])
    assert torch.equal(inputs["image_grid_thw"], tensors["chat.phase2.packed_image_grid_thw"])
    assert torch.equal(inputs["geometry_pixel_values"][0], tensors["chat.phase1.packed_dino_images"])


def test_chat_from_png_generates_the_official_tokens_and_streams(processor, model, golden, capsys):
    inputs = processor.apply_chat_template(
        chat_messages(golden.meta["chat"]["question"], IMAGES / "chat.png"), add_generation_prompt=True,
        tokenize=True, return_dict=True, return_tensors="pt",
    )  # fmt: skip
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=None, streamer=streamer)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :].tolist()
    assert new_tokens == golden.meta["chat"]["greedy_token_ids"]
    assert capsys.readouterr().out.strip() == processor.decode(new_tokens).strip()


def test_batched_generation_equals_one_by_one(processor, model):
    conversations = [
        # geometry views of a batch share one size: both views are 1036x280
        chat_messages("How far is the red box?", IMAGES / "view_1.png"),
        chat_messages("Which view is the leftmost one? Answer in one word please.", IMAGES / "view_0.png"),
    ]
    batched = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"padding_side": "left"},
    )  # fmt: skip
    assert batched["attention_mask"][:, 0].tolist().count(0) == 1  # the shorter prompt is left-padded
    with torch.no_grad():
        together = model.generate(**batched, max_new_tokens=5, do_sample=False)
        for row, conversation in enumerate(conversations):
            alone = processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
            single = model.generate(**alone, max_new_tokens=5, do_sample=False)
            width = batched["input_ids"].shape[1]
            assert together[row, width:].tolist() == single[0, alone["input_ids"].shape[1] :].tolist()


def test_batched_scenes_of_equal_size(processor):
    """Each row of a batch holds its own scene: the views and ids of that scene processed alone (the golden tests
    check one scene against the official preprocessing)."""
    scenes = [VIEWS[:2], VIEWS[1:]]
    inputs = processor(geometry_images=scenes, return_tensors="pt")
    assert inputs["geometry_pixel_values"].shape == (2, 2, 3, 140, 518)
    assert inputs["input_ids"].shape[0] == 2
    for row, scene in enumerate(scenes):
        alone = processor(geometry_images=scene, return_tensors="pt")
        torch.testing.assert_close(inputs["geometry_pixel_values"][row], alone["geometry_pixel_values"][0])
        assert inputs["input_ids"][row].tolist() == alone["input_ids"][0].tolist()
    assert not torch.equal(inputs["geometry_pixel_values"][0], inputs["geometry_pixel_values"][1])


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == processor.chat_template
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, G2VLMProcessor)
    assert loaded.geometry_image_processor.to_dict() == processor.geometry_image_processor.to_dict()
    messages = chat_messages("Where is the door?", IMAGES / "chat.png")
    first = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    second = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert first["input_ids"] == second["input_ids"]


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P", "F in [0, 1]", "F in [0, 255]"])
def test_other_image_modes_are_converted_to_rgb(mode):
    rgb = Image.open(VIEWS[0]).convert("RGB")
    if mode == "I;16":
        gray = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        image = Image.fromarray(gray)
        assert image.mode == "I;16"
        expected = rgb.convert("L").convert("RGB")
    elif mode.startswith("F"):  # float images: in [0, 1] as float arrays are read, or in 8-bit units
        scale = 255.0 if mode.endswith("[0, 1]") else 1.0
        image = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32) / scale)
        assert image.mode == "F"
        expected = rgb.convert("L").convert("RGB")
    elif mode == "RGBA":
        image = rgb.convert("RGBA")  # fully opaque: compositing onto white changes nothing
        expected = rgb
    else:
        image = rgb.convert(mode)
        expected = image.convert("RGB")
    geometry = G2VLMGeometryImageProcessor()
    assert torch.allclose(geometry([image])["geometry_pixel_values"], geometry([expected])["geometry_pixel_values"])


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (28, 28), (10, 20, 30, 0))
    pixels = G2VLMGeometryImageProcessor(do_normalize=False, target_width=28)([image])["geometry_pixel_values"]
    assert torch.allclose(pixels, torch.ones_like(pixels))


class TestBadInput:
    def test_reconstruction_needs_views(self, processor):
        with pytest.raises(ValueError, match="at least one view"):
            processor(geometry_images=[])
        with pytest.raises(ValueError, match="geometry_images"):
            processor()
        with pytest.raises(ValueError, match="Scene 1 of the geometry images has no views"):
            processor(geometry_images=[[VIEWS[0]], []])
        for single in (str(VIEWS[0]), VIEWS[0]):  # not read letter by letter
            with pytest.raises(ValueError, match="takes the views of one scene as a list; got a single"):
                processor.geometry_image_processor.preprocess_scene(single)

    def test_too_many_views_says_how_much_memory_they_need(self, processor):
        with pytest.raises(ValueError, match=r"1000 views exceed max_views=256.*GB"):
            processor(geometry_images=[str(VIEWS[0])] * 1000)

    def test_corrupt_file(self, processor, tmp_path):
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not a png at all")
        with pytest.raises(ValueError, match="not an image"):
            processor(geometry_images=[broken])

    def test_missing_file(self, processor, tmp_path):
        with pytest.raises(ValueError, match="does not exist"):
            processor(geometry_images=[tmp_path / "nowhere.png"])

    def test_images_must_match_the_placeholders(self, processor):
        messages = chat_messages("Compare them.", IMAGES / "chat.png", IMAGES / "view_0.png")
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholder\\(s\\) but 1 `images`"):
            processor(text=prompt, images=[str(IMAGES / "chat.png")])

    def test_scenes_of_different_sizes_cannot_be_batched(self, processor):
        with pytest.raises(ValueError, match="process them one by one"):
            processor(geometry_images=[[VIEWS[0]], [IMAGES / "chat.png"]])

    def test_an_empty_list_of_prompts_is_refused(self, processor):
        with pytest.raises(ValueError, match="`text` is an empty list: pass at least one prompt"):
            processor(text=[], return_tensors="pt")

    def test_videos_are_refused(self, processor):
        with pytest.raises(ValueError, match="images only"):
            processor(text="hi", videos=["clip.mp4"])

    @pytest.mark.parametrize("kind", ["images", "Image", "image_url", None])
    def test_content_the_template_would_drop_is_refused(self, processor, kind):
        """An item of another type would leave its image out of the prompt: the answer would ignore it (an
        "image_url" item without OpenAI's "image_url" key too; with it, it is an image: test_processor_kwargs)."""
        item = {"type": kind, "image": str(IMAGES / "chat.png")} if kind else {"image": str(IMAGES / "chat.png")}
        messages = [{"role": "user", "content": [item, {"type": "text", "text": "What is this?"}]}]
        for conversation in (messages, [messages]):
            for tokenize in (False, True):
                with pytest.raises(ValueError, match=f"content item has type {kind!r}, which the G2VLM chat"):
                    processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=tokenize)
        item["type"] = "image"
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert prompt.count("<|image_pad|>") == 1 and prompt.count("<|geo_pad|>") == 1


def test_model_input_names_are_what_a_call_with_both_kinds_of_images_returns(processor, model):
    """transformers' `test_model_input_names`, with G2VLM's image layout (the mixin's call cannot give geometry views):
    every name is returned, and the model's forward takes each of them."""
    inputs = processor.apply_chat_template(
        chat_messages("Where is the chair?", VIEWS[0], VIEWS[1]),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert set(inputs) == set(processor.model_input_names)
    assert set(processor.model_input_names) <= set(inspect.signature(model.forward).parameters)
