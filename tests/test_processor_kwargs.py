"""G2VLMProcessor as a transformers processor: keyword routing (`_merge_kwargs`), assistant masks, image URLs and the
`__call__` signature. References are transformers' own code paths (its generic `ProcessorMixin.__call__`, the
tokenizer's `apply_chat_template`) or the components called directly; none needs the model, so these run on every
supported transformers release."""

from __future__ import annotations

import functools
import http.server
import inspect
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURE_DIR
from PIL import Image
from transformers import AutoProcessor, ProcessorMixin

from g2vlm_hf import G2VLMGeometryImageProcessor, G2VLMProcessor
from g2vlm_hf.conversion.convert_official import _build_processor, _load_tokenizer
from g2vlm_hf.processing import G2VLMProcessorKwargs
from g2vlm_hf.processing.processing_g2vlm import _G2VLMModalityKwargs

CHECKPOINT = FIXTURE_DIR / "checkpoint"
IMAGES = FIXTURE_DIR / "images"
VIEWS = [IMAGES / f"view_{index}.png" for index in range(3)]
SEMANTIC = "<|vision_start|><|image_pad|><|vision_end|>"
GEOMETRY = "<|vision_start|><|geo_pad|><|vision_end|>"


def build_processor(**tokenizer_kwargs) -> G2VLMProcessor:
    """The processor `g2vlm-convert` writes for the official tiny checkpoint, optionally with saved tokenizer
    defaults (`padding=`, `max_length=`, ...) given as tokenizer init kwargs, as a saved tokenizer carries them."""
    tokenizer = _load_tokenizer(CHECKPOINT)
    if tokenizer_kwargs:
        tokenizer = type(tokenizer).from_pretrained(str(CHECKPOINT), padding_side="left", **tokenizer_kwargs)
        tokenizer.add_tokens(["<|geo_pad|>"], special_tokens=True)
    return _build_processor(CHECKPOINT, tokenizer)


@pytest.fixture(scope="module")
def processor() -> G2VLMProcessor:
    return build_processor()


@pytest.fixture(scope="module")
def plain_processor() -> G2VLMProcessor:
    """Without the official 768x768 pre-resize, so that transformers' generic pipeline sees the same images."""
    plain = build_processor()
    plain.semantic_image_size = None
    return plain


@pytest.fixture(scope="module")
def square_image() -> Image.Image:
    return Image.open(IMAGES / "chat.png").convert("RGB").resize((224, 224))


PROMPTS = [f"hello {SEMANTIC} there", f"a longer prompt {SEMANTIC} with more words in it"]


def assert_same_outputs(ours, reference) -> None:
    assert sorted(ours.keys()) == sorted(reference.keys())
    for key in reference:
        if isinstance(reference[key], torch.Tensor):
            assert torch.equal(ours[key], reference[key]), key
        else:
            assert ours[key] == reference[key], key


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"do_rescale": False},
        {"images_kwargs": {"do_rescale": False}},
        {"size": {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16}},
        {"padding": "max_length", "max_length": 200},
        {"text_kwargs": {"padding": "max_length", "max_length": 200}},
        {"padding_side": "right"},
        {"truncation": True, "max_length": 800},
        {"return_offsets_mapping": True, "return_text_replacement_offsets": True},
    ],
    ids=lambda kwargs: ",".join(kwargs) or "defaults",
)
def test_kwargs_reach_components_as_in_transformers(plain_processor, square_image, kwargs, monkeypatch):
    """Flat, nested and tokenizer kwargs give what transformers' generic processor pipeline gives, routed there by
    transformers' own `_merge_kwargs` (not ours, which the generic `__call__` would otherwise call too)."""
    images = [square_image, square_image]
    ours = plain_processor(images=images, text=PROMPTS, return_tensors="pt", **kwargs)
    # transformers' merge of the groups it knows (all but the geometry one, which transformers < 5.25 cannot route)
    monkeypatch.setattr(
        plain_processor,
        "_merge_kwargs",
        lambda _kwargs_class=None, **merge_kwargs: ProcessorMixin._merge_kwargs(
            plain_processor, _G2VLMModalityKwargs, **merge_kwargs
        ),
    )
    reference = ProcessorMixin.__call__(plain_processor, images=images, text=PROMPTS, return_tensors="pt", **kwargs)
    assert_same_outputs(ours, reference)


def test_truncating_image_tokens_is_refused(plain_processor, square_image):
    """Like transformers' processors, refuse a `max_length` that would cut an image's tokens."""
    for call in (plain_processor, functools.partial(ProcessorMixin.__call__, plain_processor)):
        with pytest.raises(ValueError, match="max_length"):
            call(images=[square_image] * 2, text=PROMPTS, truncation=True, max_length=20)


def test_image_kwargs_change_the_pixels(plain_processor, square_image):
    """An image-processor kwarg is not dropped: pixels equal the image processor's own with that kwarg."""
    default = plain_processor(images=[square_image], text=PROMPTS[:1], return_tensors="pt")["pixel_values"]
    for kwargs in ({"do_rescale": False}, {"images_kwargs": {"do_rescale": False}}):
        raw = plain_processor(images=[square_image], text=PROMPTS[:1], return_tensors="pt", **kwargs)["pixel_values"]
        expected = plain_processor.image_processor([square_image], do_rescale=False, return_tensors="pt")
        assert torch.equal(raw, expected["pixel_values"])
        assert not torch.allclose(raw, default)


def test_saved_tokenizer_defaults_apply_unless_overridden(square_image):
    """A tokenizer saved with `padding="max_length", max_length=N` pads to N through the processor (the processor
    used to force `padding=True` over it); an explicit kwarg still wins."""
    saved = build_processor(padding="max_length", max_length=900)
    saved.semantic_image_size = None
    inputs = saved(images=[square_image], text=PROMPTS[:1], return_tensors="pt")
    assert inputs["input_ids"].shape[-1] == 900
    reference = ProcessorMixin.__call__(saved, images=[square_image], text=PROMPTS[:1], return_tensors="pt")
    assert_same_outputs(inputs, reference)
    longest = saved(images=[square_image], text=PROMPTS[:1], padding="longest", return_tensors="pt")
    assert longest["input_ids"].shape[-1] < 900
    assert bool(longest["attention_mask"].all())


def test_kwarg_passed_twice_is_refused(processor):
    with pytest.raises(ValueError, match="passed two times"):
        processor(text=["hi"], text_kwargs={"padding": "do_not_pad"}, padding="max_length")
    with pytest.raises(ValueError, match="passed two times"):
        processor(geometry_images=VIEWS, target_width=28, geometry_images_kwargs={"target_width": 42})


def test_unknown_geometry_kwarg_is_refused(processor):
    with pytest.raises(ValueError, match="not geometry image processor settings"):
        processor(geometry_images=VIEWS, geometry_images_kwargs={"do_rescale": False})


def test_geometry_image_processor_takes_per_call_settings_and_names_unknown_ones():
    """Both entry points (`preprocess` for scenes, `preprocess_scene` for one) read one settings description: a
    per-call value gives what a processor built with it gives, `None` keeps the processor's own, and a setting it
    does not take is refused with the list of those it does."""
    shared = G2VLMGeometryImageProcessor()
    built = G2VLMGeometryImageProcessor(target_width=28, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    call = {"target_width": 28, "image_mean": 0.5, "image_std": 0.25, "do_resize": None}
    expected = built.preprocess_scene(VIEWS)
    assert torch.equal(shared.preprocess_scene(VIEWS, **call), expected)
    assert torch.equal(shared(VIEWS, **call)["geometry_pixel_values"][0], expected)
    assert shared.preprocess_scene(VIEWS).shape[-1] == 518  # the call left the processor as it was
    for entry in (shared.preprocess_scene, shared.preprocess):
        with pytest.raises(TypeError, match=r"unknown setting\(s\) \['do_rescale'\].*'target_width'"):
            entry(VIEWS, do_rescale=False)
    with pytest.raises(ValueError, match="positive integer multiple of the patch size 14"):
        shared(VIEWS, target_width=30)


BAD_GEOMETRY_SETTINGS = [
    ({"target_width": 280.0}, r"target_width=280\.0 must be a positive integer multiple"),
    ({"target_width": "280"}, r"target_width='280' must be a positive integer multiple"),
    ({"target_width": -14}, "target_width=-14 must be a positive integer multiple"),
    ({"max_views": 0}, "max_views must be a positive integer, got 0"),
    ({"image_mean": [0.5, 0.5]}, r"image_mean must be one number or three \(R, G, B\), got \[0.5, 0.5\]"),
    ({"image_std": [0.2, 0.0, 0.2]}, "image_std must be one number or three .*, all positive"),
]


@pytest.mark.parametrize(("settings", "message"), BAD_GEOMETRY_SETTINGS, ids=lambda v: str(v)[:30])
def test_bad_geometry_settings_are_refused_where_they_are_given(settings, message):
    """At construction (where a saved processor is loaded too) and per call, before any image is read."""
    with pytest.raises(ValueError, match=message):
        G2VLMGeometryImageProcessor(**settings)
    with pytest.raises(ValueError, match=message):
        G2VLMGeometryImageProcessor().preprocess_scene(["never-read.png"], **settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"patch_size": 0}, "patch_size must be a positive integer, got 0"),
        ({"max_tokens_per_view": 1.5}, "max_tokens_per_view must be a positive integer, got 1.5"),
        ({"max_aspect_ratio": 0.5}, "max_aspect_ratio must be a number of at least 1"),
        ({"max_aspect_ratio": float("nan")}, "max_aspect_ratio must be a number of at least 1"),
        ({"max_aspect_ratio": "4"}, "max_aspect_ratio must be a number of at least 1"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_geometry_processor_checks_its_construction_only_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        G2VLMGeometryImageProcessor(**settings)


def test_numpy_integer_settings_act_and_save_as_python_integers(tmp_path):
    """A width computed with NumPy is a setting like any other, and the processor still saves to JSON."""
    settings = {"target_width": np.int64(28), "max_views": np.int32(5), "patch_size": np.int64(14)}
    built = G2VLMGeometryImageProcessor(**settings, max_tokens_per_view=np.int64(100))
    expected = G2VLMGeometryImageProcessor(target_width=28, max_views=5)
    assert torch.equal(built.preprocess_scene(VIEWS), expected.preprocess_scene(VIEWS))
    assert torch.equal(
        G2VLMGeometryImageProcessor().preprocess_scene(VIEWS, target_width=np.int64(28)),
        expected.preprocess_scene(VIEWS),
    )
    built.save_pretrained(tmp_path)
    reloaded = G2VLMGeometryImageProcessor.from_pretrained(tmp_path)
    assert (reloaded.target_width, reloaded.max_views, reloaded.max_tokens_per_view) == (28, 5, 100)
    assert type(reloaded.target_width) is int


def test_geometry_processor_takes_one_number_for_all_channels():
    single, spelled = G2VLMGeometryImageProcessor(image_mean=0.5), G2VLMGeometryImageProcessor(image_mean=[0.5] * 3)
    assert single.image_mean == [0.5] * 3
    assert torch.equal(single.preprocess_scene(VIEWS), spelled.preprocess_scene(VIEWS))


@pytest.mark.parametrize("form", ["flat", "nested"])
def test_geometry_kwargs_reach_the_geometry_processor(processor, form):
    kwargs = {"target_width": 28} if form == "flat" else {"geometry_images_kwargs": {"target_width": 28}}
    inputs = processor(geometry_images=VIEWS, return_tensors="pt", **kwargs)
    expected = G2VLMGeometryImageProcessor(target_width=28)(VIEWS)["geometry_pixel_values"]
    assert torch.equal(inputs["geometry_pixel_values"], expected)
    height, width = expected.shape[-2:]
    tokens = int((inputs["input_ids"] == processor.geometry_token_id).sum())
    assert tokens == len(VIEWS) * (height // 14) * (width // 14)


def test_flat_shared_kwarg_reaches_both_image_processors_and_nested_only_one(processor):
    """As in transformers, a flat kwarg goes to every component that takes it; a group dict to its component only."""
    text = f"{GEOMETRY}{SEMANTIC} Where?"
    default = processor(images=[VIEWS[0]], text=text, return_tensors="pt")
    flat = processor(images=[VIEWS[0]], text=text, do_normalize=False, return_tensors="pt")
    nested = processor(
        images=[VIEWS[0]], text=text, geometry_images_kwargs={"do_normalize": False}, return_tensors="pt"
    )
    raw_views = G2VLMGeometryImageProcessor(do_normalize=False)([VIEWS[0]])["geometry_pixel_values"]
    semantic_image = processor._semantic_image(VIEWS[0])
    raw_pixels = processor.image_processor([semantic_image], do_normalize=False, return_tensors="pt")["pixel_values"]
    assert torch.equal(flat["geometry_pixel_values"], raw_views)
    assert torch.equal(flat["pixel_values"], raw_pixels)
    assert torch.equal(nested["geometry_pixel_values"], raw_views)
    assert torch.equal(nested["pixel_values"], default["pixel_values"])
    assert not torch.equal(default["geometry_pixel_values"], raw_views)
    assert processor.geometry_image_processor.do_normalize  # the override did not leak into the component


def conversation(question: str, answer: str, follow_up: str, second_answer: str, image: Path) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        {"role": "user", "content": [{"type": "text", "text": follow_up}]},
        {"role": "assistant", "content": [{"type": "text", "text": second_answer}]},
    ]


def test_assistant_tokens_mask_marks_the_replies(processor):
    """`return_assistant_tokens_mask=True` works and marks exactly the reply tokens (with their `<|im_end|>`), as
    transformers' tokenizer marks them on the same template, although every image placeholder is expanded."""
    long = conversation("What colour is the box?", "The box is red.", "And the wall?", "Blue.", IMAGES / "chat.png")
    short = [*conversation("How many?", "Two.", "Sure?", "Yes.", IMAGES / "chat.png")[:2]]
    for batch, padding_side in (([long], None), ([long, short], "left"), ([long, short], "right")):
        inputs = processor.apply_chat_template(
            batch, tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True,
            processor_kwargs={"padding_side": padding_side} if padding_side else None,
        )  # fmt: skip
        reference = processor.tokenizer.apply_chat_template(
            batch, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
            chat_template=processor.chat_template,
        )  # fmt: skip
        assert "offset_mapping" not in inputs
        assert inputs["assistant_masks"].shape == inputs["input_ids"].shape
        for ids, mask, ref_ids, ref_mask in zip(
            inputs["input_ids"], inputs["assistant_masks"].bool(), reference["input_ids"], reference["assistant_masks"]
        ):
            expected = [token for token, keep in zip(ref_ids, ref_mask) if keep]
            assert ids[mask].tolist() == expected
        replies = processor.tokenizer.decode(inputs["input_ids"][0][inputs["assistant_masks"][0].bool()])
        assert replies == "The box is red.<|im_end|>Blue.<|im_end|>"


def test_assistant_tokens_mask_agrees_with_assistant_labels(processor):
    """The training labels of `assistant_labels` (found by token search) and transformers' assistant mask (found by
    the template's `{% generation %}` spans) mark the same tokens, for string and list message contents."""
    text_only = [
        [{"role": "user", "content": "How far is the door?"}, {"role": "assistant", "content": "About two metres."}],
        [{"role": "user", "content": "And the box?"}, {"role": "assistant", "content": "One."}],
    ]
    with_image = [conversation("Colour?", "Red.", "Sure?", "Yes, red.", IMAGES / "chat.png")]
    for batch in (text_only, with_image):
        inputs = processor.apply_chat_template(
            batch, tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True
        )
        labels = processor.assistant_labels(inputs["input_ids"])
        assert torch.equal(inputs["assistant_masks"].bool(), labels != -100)


@pytest.mark.skipif(
    "sanitize_control_tokens" not in inspect.signature(ProcessorMixin.apply_chat_template).parameters,
    reason="transformers < 5.23 has no sanitize_control_tokens",
)
def test_sanitized_user_text_cannot_add_image_placeholders(processor):
    """With `sanitize_control_tokens=True`, an `<|image_pad|>` typed by the user stays text, as in transformers."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "path": str(VIEWS[0])}, {"type": "text", "text": "Is <|image_pad|> odd?"}],
        }
    ]
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholder"):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, sanitize_control_tokens=True)
    grid = inputs["image_grid_thw"][0]
    assert inputs["input_ids"][0].count(processor.image_token_id) == int(grid.prod()) // 4
    assert processor.tokenizer.decode(inputs["input_ids"][0]).endswith("Is <|image_pad|> odd?<|im_end|>\n")


def test_offsets_mapping_is_returned_when_asked(processor):
    messages = conversation("Colour?", "Red.", "Sure?", "Yes.", IMAGES / "chat.png")
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, processor_kwargs={"return_offsets_mapping": True}
    )
    prompt = processor.apply_chat_template(messages)
    expanded = processor(text=prompt, images=[IMAGES / "chat.png"], return_text_replacement_offsets=True)
    offsets = expanded["text_replacement_offsets"][0]
    assert [entry["type"] for entry in offsets] == ["geometry_image", "image"]
    assert len(inputs["offset_mapping"][0]) == len(inputs["input_ids"][0])
    # Replacement offsets index the expanded prompt, and the token offsets cover it.
    text = prompt
    for entry in reversed(offsets):
        start, end = entry["span"]
        text = text[:start] + entry["replacement"] + text[end:]
    for entry in offsets:
        assert text[slice(*entry["new_span"])] == entry["replacement"]
    spans = [text[start:end] for start, end in inputs["offset_mapping"][0]]
    assert "".join(spans) == text


def test_mm_token_type_ids_mark_image_and_geometry_tokens(processor):
    """`return_mm_token_type_ids=True` (transformers' 0 = text, 1 = image) is honoured, not dropped: semantic image
    tokens and geometry tokens, also image features, are 1, everything else 0."""
    text = [f"{GEOMETRY}{SEMANTIC} Where?", f"{GEOMETRY}{SEMANTIC} And now?"]
    inputs = processor(images=[VIEWS[0], VIEWS[1]], text=text, return_mm_token_type_ids=True, return_tensors="pt")
    types = inputs["mm_token_type_ids"]
    semantic = inputs["input_ids"] == processor.image_token_id
    geometry = inputs["input_ids"] == processor.geometry_token_id
    assert bool(semantic.any()) and bool(geometry.any())
    assert torch.equal(types == 1, semantic | geometry)
    assert "mm_token_type_ids" not in processor(images=[VIEWS[0]], text=text[0])


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving the fixture images."""
    handler = functools.partial(QuietHandler, directory=str(IMAGES))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def test_image_urls_in_messages_are_fetched(processor, image_server):
    question = "Where is the door?"
    by_path = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "path": str(IMAGES / "chat.png")}, {"type": "text", "text": question}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )  # fmt: skip
    for block in (
        {"type": "image", "url": f"{image_server}/chat.png"},
        {"type": "image", "image": f"{image_server}/chat.png"},
        {"type": "image_url", "image_url": {"url": f"{image_server}/chat.png"}},  # OpenAI style
    ):
        by_url = processor.apply_chat_template(
            [{"role": "user", "content": [block, {"type": "text", "text": question}]}],
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        )  # fmt: skip
        assert_same_outputs(by_url, by_path)


def test_image_urls_in_call_are_fetched(processor, image_server):
    urls = [f"{image_server}/{view.name}" for view in VIEWS]
    assert_same_outputs(
        processor(geometry_images=urls, return_tensors="pt"), processor(geometry_images=VIEWS, return_tensors="pt")
    )
    text = f"{GEOMETRY}{SEMANTIC} Where?"
    assert_same_outputs(
        processor(images=[urls[0]], text=text, return_tensors="pt"),
        processor(images=[VIEWS[0]], text=text, return_tensors="pt"),
    )


def test_unreachable_or_broken_url_says_so(processor, image_server):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/view.png"
    with pytest.raises(ValueError, match=r"Could not read an image from http://127\.0\.0\.1"):
        processor(geometry_images=[closed])
    with pytest.raises(ValueError, match=r"Could not read an image from .*/missing\.png"):
        processor(geometry_images=[f"{image_server}/missing.png"])


def test_call_signature_follows_transformers():
    """`images` then `text` as in `ProcessorMixin.__call__`, then our `geometry_images`; no `videos`/`audio`."""
    ours = list(inspect.signature(G2VLMProcessor.__call__).parameters)
    base = list(inspect.signature(ProcessorMixin.__call__).parameters)
    assert ours[:3] == base[:3] == ["self", "images", "text"]
    assert ours[3:] == ["geometry_images", "kwargs"]
    assert G2VLMProcessor.valid_processor_kwargs is G2VLMProcessorKwargs


def test_videos_and_audio_are_refused_clearly(processor):
    for modality in ("videos", "audio"):
        with pytest.raises(ValueError, match=f"G2VLM takes images only; `{modality}`"):
            processor(text="hi", **{modality: ["clip.mp4"]})


def test_images_without_text_point_at_the_argument_order(processor):
    with pytest.raises(ValueError, match="first positional argument is `images`"):
        processor("A prompt given positionally")


def test_apply_chat_template_processor_kwargs(processor):
    """`processor_kwargs` of `apply_chat_template` reach the tokenizer, the semantic and the geometry processors."""
    messages = [{"role": "user", "content": [{"type": "image", "path": str(VIEWS[0])}, {"type": "text", "text": "Hi"}]}]
    default = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={
            "padding": "max_length", "max_length": 3000, "images_kwargs": {"do_rescale": False},
            "geometry_images_kwargs": {"target_width": 28},
        },
    )  # fmt: skip
    assert inputs["input_ids"].shape == (1, 3000)
    semantic_image = processor._semantic_image(VIEWS[0])
    raw = processor.image_processor([semantic_image], do_rescale=False, return_tensors="pt")["pixel_values"]
    assert torch.equal(inputs["pixel_values"], raw)
    assert not torch.allclose(raw, default["pixel_values"])
    assert inputs["geometry_pixel_values"].shape[-1] == 28


def test_round_trip_keeps_kwarg_routing(tmp_path):
    # A fresh processor: transformers' fast tokenizer saves the padding of its last `padding="max_length"` call.
    processor = build_processor()
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, G2VLMProcessor)
    for kwargs in ({}, {"target_width": 28, "do_rescale": False, "padding": "max_length", "max_length": 3000}):
        assert_same_outputs(
            loaded(images=[VIEWS[0]], text=f"{GEOMETRY}{SEMANTIC} Where?", return_tensors="pt", **kwargs),
            processor(images=[VIEWS[0]], text=f"{GEOMETRY}{SEMANTIC} Where?", return_tensors="pt", **kwargs),
        )


def test_from_pretrained_settings_reach_the_components(tmp_path):
    """As transformers' processors: settings given to `from_pretrained` override the saved ones of every component
    that takes them (here both image processors and the tokenizer); the saved folder is unchanged."""
    build_processor().save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, do_normalize=False, target_width=28, cls_token="(CLS)")
    assert loaded.image_processor.do_normalize is False
    assert loaded.geometry_image_processor.do_normalize is False and loaded.geometry_image_processor.target_width == 28
    assert loaded.tokenizer.cls_token == "(CLS)"
    default = AutoProcessor.from_pretrained(tmp_path)
    assert default.image_processor.do_normalize and default.geometry_image_processor.target_width == 518


def test_the_geometry_image_processor_as_image_processor_is_refused():
    tokenizer = _load_tokenizer(CHECKPOINT)
    with pytest.raises(ValueError, match=r"AutoProcessor\.from_pretrained"):
        G2VLMProcessor(image_processor=G2VLMGeometryImageProcessor(), tokenizer=tokenizer)


def test_per_call_geometry_settings_leave_the_shared_processor_unchanged(processor):
    """`resize_views_to_first`, `target_width`, normalisation and `max_views` given to one call apply to that call
    only: the geometry image processor the processor holds keeps its settings (nothing is mutated or swapped)."""
    views = [Image.open(VIEWS[0]).convert("RGB"), Image.open(VIEWS[1]).convert("RGB").resize((60, 45))]
    shared = processor.geometry_image_processor
    before = shared.to_dict()
    with pytest.raises(ValueError, match="resize_views_to_first=True"):
        processor(geometry_images=views, return_tensors="pt")
    settings = {"resize_views_to_first": True, "target_width": 28, "do_normalize": False, "max_views": 2}
    inputs = processor(geometry_images=views, return_tensors="pt", **settings)
    expected = G2VLMGeometryImageProcessor(**settings)(views)["geometry_pixel_values"]
    assert torch.equal(inputs["geometry_pixel_values"], expected)
    assert processor.geometry_image_processor is shared and shared.to_dict() == before
    with pytest.raises(ValueError, match="resize_views_to_first=True"):  # the next call is back to the defaults
        processor(geometry_images=views, return_tensors="pt")
    with pytest.raises(ValueError, match="exceed max_views=1"):
        processor(geometry_images=views, return_tensors="pt", resize_views_to_first=True, max_views=1)


def test_chat_answer_passes_per_call_settings_to_the_processor(processor):
    """`answer(..., resize_views_to_first=True, target_width=28)` reaches the processor through
    `apply_chat_template` (checked at the model's entry), and leaves the processor's settings as they were."""
    from g2vlm_hf.chat import answer

    views = [Image.open(VIEWS[0]).convert("RGB"), Image.open(VIEWS[1]).convert("RGB").resize((60, 45))]
    before = processor.geometry_image_processor.to_dict()

    class Seen(Exception):
        pass

    class Model:
        device = torch.device("cpu")

        def generate(self, **inputs):
            raise Seen(inputs["geometry_pixel_values"])

    with pytest.raises(Seen) as seen:
        answer(Model(), processor, views, "Where?", 4, resize_views_to_first=True, target_width=28)
    expected = G2VLMGeometryImageProcessor(resize_views_to_first=True, target_width=28)(views)["geometry_pixel_values"]
    assert torch.equal(seen.value.args[0], expected)
    assert processor.geometry_image_processor.to_dict() == before
