"""Shared fixtures: the official tiny checkpoint converted once per session, and tiny random models.

The fixtures folder (holding `official-tiny/` and `official-2b-keys.json`) is found through the environment variable
`G2VLM_FIXTURES`, else at `../shared/fixtures` beside the checkout. Without it, the tests that need it are skipped,
saying why (`pytest_collection_modifyitems`); the others run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fixture_paths import FIXTURE_DIR, FIXTURES_ENV, fixtures_root
from safetensors.torch import load_file
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import g2vlm_hf  # noqa: F401  (registers the Auto classes)
from g2vlm_hf import G2VLMConfig, G2VLMForConditionalGeneration, G2VLMForReconstruction
from g2vlm_hf.conversion import convert_official_checkpoint, reconstruction_config

KEYS_2B_FILE = fixtures_root() / "official-2b-keys.json"
MISSING_FIXTURES = (
    f"needs the official tiny fixture, not found at {FIXTURE_DIR}: set {FIXTURES_ENV} to the folder holding "
    "official-tiny/"
)


def needs_fixtures(item: pytest.Item) -> bool:
    """Whether a test reads the fixtures: its module uses FIXTURE_DIR, KEYS_2B_FILE or load_golden (imported from
    here), or it asks for the converted checkpoint."""
    module = getattr(item, "module", None)
    uses_paths = any(
        getattr(module, name, None) in (FIXTURE_DIR, KEYS_2B_FILE) for name in ("FIXTURE_DIR", "KEYS_2B_FILE")
    )
    return uses_paths or "converted_tiny" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if FIXTURE_DIR.is_dir():
        return
    skip = pytest.mark.skip(reason=MISSING_FIXTURES)
    for item in items:
        if needs_fixtures(item):
            item.add_marker(skip)


NEWLINE_TOKEN_ID = 198  # "\n" in the fixture tokenizer; the official decode loop starts by feeding it

# Tiny random model: hidden 128 with 4 query heads and 2 KV heads (grouped-query), head_dim 32.
TINY_IMAGE_TOKEN, TINY_GEO_TOKEN, TINY_START, TINY_END = 96, 97, 98, 99


def write_video(path: Path, frames, rate: int = 10) -> Path:
    """Encode RGB PIL `frames` (one size, even sides) as an MPEG-4 video at `rate` frames per second, with PyAV (the
    test is skipped without it: the video extra is part of the test extras)."""
    av = pytest.importorskip("av", reason="the video extra (PyAV) is part of the test extras")
    frames = list(frames)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return path


def default_ctrl_c() -> None:
    """In a child process (`preexec_fn`): Ctrl-C as in a terminal, even when the tests run as a background job (which
    ignores SIGINT, a setting its children inherit: Python would then never raise KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tiny_config(**overrides) -> G2VLMConfig:
    """A small random G2VLM configuration exercising every part (GQA, both encoders, all heads)."""
    values = dict(
        text_config=dict(
            vocab_size=100,
            hidden_size=128,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=128, num_heads=2, patch_size=14),
        geometry_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=14,
            image_size=56,
            num_register_tokens=4,
        ),
        image_token_id=TINY_IMAGE_TOKEN,
        geometry_token_id=TINY_GEO_TOKEN,
        vision_start_token_id=TINY_START,
        vision_end_token_id=TINY_END,
        head_depth=1,
        head_num_attention_heads=4,
        point_head_hidden_size=48,
        camera_head_hidden_size=32,
        use_confidence_head=True,
    )
    values.update(overrides)
    return G2VLMConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> G2VLMForConditionalGeneration:
    torch.manual_seed(seed)
    return G2VLMForConditionalGeneration(tiny_config(**overrides)).eval()


def tiny_reconstruction_model(seed: int = 0) -> G2VLMForReconstruction:
    """The reconstruction-only class over the tiny config (no semantic vision tower, no language head)."""
    torch.manual_seed(seed)
    return G2VLMForReconstruction(reconstruction_config(tiny_config())).eval()


def greedy_answer(model, processor, images: list, question: str, max_new_tokens: int) -> str:
    """The model's greedy answer about `images`, from the chat template and `generate()` alone: the reference for the
    package's own chat paths (CLI, demo), which must not compute it themselves."""
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": question}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    ).to(model.device)  # fmt: skip
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@dataclass
class Call:
    """One call of a spied function: its positional and keyword arguments."""

    args: tuple
    kwargs: dict


def recording(function: Callable, calls: list[Call], context: Callable = contextlib.nullcontext) -> Callable:
    """`function`, appending each call to `calls` and running it inside `context()`; its signature is kept (for the
    callers that inspect it)."""

    @functools.wraps(function)
    def spy(*args, **kwargs):
        calls.append(Call(args, kwargs))
        with context():
            return function(*args, **kwargs)

    return spy


def spy_calls(monkeypatch: pytest.MonkeyPatch, owner, name: str) -> list[Call]:
    """Record every call of `owner.<name>` (a module's function, looked up there by its callers) for this test."""
    calls: list[Call] = []
    monkeypatch.setattr(owner, name, recording(getattr(owner, name), calls))
    return calls


def geometry_block(num_views: int, grid_h: int, grid_w: int) -> list[int]:
    """Token ids of a geometry block: each view wrapped in its own start/end markers."""
    return [TINY_START, *[TINY_GEO_TOKEN] * (grid_h * grid_w), TINY_END] * num_views


def image_block(grid_h: int, grid_w: int, merge: int = 2) -> list[int]:
    return [TINY_START, *[TINY_IMAGE_TOKEN] * (grid_h * grid_w // merge**2), TINY_END]


def image_patches(grid_h: int, grid_w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Qwen2-VL patches of one image and its grid."""
    generator = torch.Generator().manual_seed(seed)
    patches = torch.randn(grid_h * grid_w, 3 * 2 * 14 * 14, generator=generator)
    return patches, torch.tensor([[1, grid_h, grid_w]])


@dataclass
class Golden:
    """The official outputs stored in the fixture for one precision."""

    tensors: dict[str, torch.Tensor]
    meta: dict

    def phase_ids(self, phase: str, media_index_key: str, placeholder_id: int) -> torch.Tensor:
        """Rebuild one official inference phase as token ids with our placeholder tokens."""
        length = int(self.tensors[f"{phase}.packed_seqlens"].sum())
        ids = torch.full((length,), -1, dtype=torch.long)
        ids[self.tensors[f"{phase}.packed_text_indexes"]] = self.tensors[f"{phase}.packed_text_ids"]
        ids[self.tensors[f"{phase}.{media_index_key}"]] = placeholder_id
        assert bool((ids >= 0).all()), f"{phase} leaves tokens unassigned"
        return ids


def load_golden(precision: str) -> Golden:
    """Golden tensors of `precision`; the inputs (stored in the fp32 file only) are shared by both runs."""
    tensors = load_file(FIXTURE_DIR / "golden_fp32.safetensors")
    tensors.update(load_file(FIXTURE_DIR / f"golden_{precision}.safetensors"))
    meta = json.loads((FIXTURE_DIR / f"golden_{precision}.json").read_text())
    return Golden(tensors, meta)


@pytest.fixture(autouse=True)
def _attention_registrations_kept():
    """Loading the Hub copy of the modeling code in a test (test_serving) registers that copy's "torch_varlen"
    functions over the package's in transformers' global registries; give each entry a test found back its earlier
    function afterwards (entries registered for the first time stay: a first import registers them once)."""
    registries = (AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping)
    saved = [dict(registry) for registry in registries]
    yield
    for registry, before in zip(registries, saved):
        registry.update(before)


@pytest.fixture(scope="session")
def converted_tiny(tmp_path_factory) -> Path:
    """The official tiny checkpoint converted by the package, once per test session."""
    if not FIXTURE_DIR.is_dir():
        pytest.skip(MISSING_FIXTURES)
    return convert_official_checkpoint(FIXTURE_DIR / "checkpoint", tmp_path_factory.mktemp("converted") / "g2vlm-tiny")


@pytest.fixture(scope="session")
def small_views_model(converted_tiny, tmp_path_factory):
    """The converted tiny checkpoint with its processor set to 56-pixel-wide geometry views, to keep runs short."""
    folder = tmp_path_factory.mktemp("small") / "g2vlm-tiny"
    shutil.copytree(converted_tiny, folder)
    config = json.loads((folder / "processor_config.json").read_text())
    config["image_processor"]["target_width"] = 56
    (folder / "processor_config.json").write_text(json.dumps(config))
    return folder
