"""The saved processor loads the same on every supported transformers release.

transformers 5.21 to 5.24 build a processor's components in `_get_arguments_from_pretrained`, 5.25 in
`_resolve_subprocessors` (g2vlm_hf/processing/processing_compat.py routes both to one loader). A folder saved on one
release must load the same on the other: `.ci/run` points `G2VLM_PROCESSOR_EXCHANGE` at one folder for both of its
environments, each saves its processor there (`saved-by-<version>`) and loads every folder the other saved.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoProcessor, ProcessorMixin

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_testing import VIEWS

from g2vlm_hf import G2VLMGeometryImageProcessor, G2VLMProcessor

EXCHANGE = "G2VLM_PROCESSOR_EXCHANGE"
MESSAGES = [
    {
        "role": "user",
        "content": [*({"type": "image", "image": str(view)} for view in VIEWS), {"type": "text", "text": "Where?"}],
    }
]


def processor_inputs(processor: G2VLMProcessor) -> dict[str, torch.Tensor]:
    chat = processor.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    recon = processor(geometry_images=[str(view) for view in VIEWS], return_tensors="pt")
    return {**{f"chat.{k}": v for k, v in chat.items()}, **{f"recon.{k}": v for k, v in recon.items()}}


def assert_same_processor(loaded: G2VLMProcessor, expected: G2VLMProcessor) -> None:
    assert type(loaded.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert type(loaded.geometry_image_processor) is G2VLMGeometryImageProcessor
    assert loaded.image_processor.to_dict() == expected.image_processor.to_dict()
    assert loaded.geometry_image_processor.to_dict() == expected.geometry_image_processor.to_dict()
    assert loaded.tokenizer.get_vocab() == expected.tokenizer.get_vocab()
    assert loaded.chat_template == expected.chat_template
    assert loaded.semantic_image_size == expected.semantic_image_size
    ours, theirs = processor_inputs(loaded), processor_inputs(expected)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.fixture(scope="module")
def processor(converted_tiny) -> G2VLMProcessor:
    return AutoProcessor.from_pretrained(converted_tiny)


def test_loading_goes_through_the_hook_of_the_installed_release(processor, tmp_path, monkeypatch):
    processor.save_pretrained(tmp_path)
    # the hook this release calls (5.25 on: `_resolve_subprocessors`; before: `_get_arguments_from_pretrained`)
    hook = (
        "_resolve_subprocessors"
        if hasattr(ProcessorMixin, "_resolve_subprocessors")
        else "_get_arguments_from_pretrained"
    )
    loader = G2VLMProcessor._load_image_processors.__func__
    calls = []

    def spy(cls, *args, **kwargs):
        calls.append(hook)
        return loader(cls, *args, **kwargs)

    monkeypatch.setattr(G2VLMProcessor, "_load_image_processors", classmethod(spy))
    assert_same_processor(AutoProcessor.from_pretrained(tmp_path), processor)
    assert calls == [hook]


def test_components_given_to_from_pretrained_are_used(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    geometry = G2VLMGeometryImageProcessor(target_width=56)
    semantic = type(processor.image_processor).from_dict({**processor.image_processor.to_dict(), "do_normalize": False})
    loaded = G2VLMProcessor.from_pretrained(tmp_path, image_processor=semantic, geometry_image_processor=geometry)
    assert loaded.image_processor is semantic and loaded.geometry_image_processor is geometry


def test_a_folder_without_image_processor_settings_is_refused_clearly(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "G2VLMProcessor"}))
    with pytest.raises(ValueError, match="not a saved G2VLMProcessor"):
        G2VLMProcessor.from_pretrained(tmp_path)


def test_folders_saved_by_the_other_release_load_the_same(processor):
    exchange = os.environ.get(EXCHANGE)
    if not exchange:
        pytest.skip(f"set {EXCHANGE} to a folder shared by two environments (.ci/run does)")
    exchange = Path(exchange)
    own = exchange / f"saved-by-{transformers.__version__}"
    processor.save_pretrained(own)
    others = sorted(folder for folder in exchange.glob("saved-by-*") if folder != own)
    if not others:
        pytest.skip(f"no folder saved by another transformers release in {exchange} yet")
    for folder in others:
        assert_same_processor(AutoProcessor.from_pretrained(folder), processor)
