"""What the examples share: which model they run on and which views they use, from any checkout, online or not.

- `--model MODEL`: a converted checkpoint folder or the Hub id of a converted model. The quickstart's default is
  the official checkpoint on the Hub (`OFFICIAL_HUB_ID`), downloaded and converted once into `outputs/g2vlm-2b`; the
  other examples default to that folder.
- `--tiny`: a small random G2VLM made here from a config and a processor built in code (a byte-level tokenizer with
  the G2VLM special tokens, the Qwen2-VL and geometry image processors), saved to `TINY_DIR`: no download, no
  fixture, seconds on a CPU. Its answers are random text and its geometry random but well-formed.
- views: the user's image files, or (by default) a few views of a synthetic textured room rendered here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

OFFICIAL_HUB_ID = "InternRobotics/G2VLM-2B-MoT"
CONVERTED_DIR = Path("outputs/g2vlm-2b")
TINY_DIR = Path("outputs/g2vlm-tiny")


def add_model_arguments(parser: argparse.ArgumentParser, default: str = str(CONVERTED_DIR)) -> None:
    parser.add_argument("--model", default=default, help=f"converted folder or Hub id (default {default})")
    parser.add_argument("--tiny", action="store_true", help=f"a small random model made locally into {TINY_DIR}")


def fail(message: str) -> None:
    """One line on stderr, exit status 2 (no traceback)."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(2)


def model_folder(args: argparse.Namespace) -> str:
    """The folder (or Hub id) to load: the tiny model (made if missing) with --tiny, else --model, which must exist
    when it looks like a local path."""
    if args.tiny:
        if not (TINY_DIR / "config.json").is_file():
            build_tiny_model(TINY_DIR)
            print(f"tiny random model written to {TINY_DIR.resolve()}")
        return str(TINY_DIR)
    local = args.model == str(CONVERTED_DIR) or args.model.startswith((".", "/", "~")) or args.model.count("/") != 1
    if local and not (Path(args.model).expanduser() / "config.json").is_file():
        fail(
            f"no converted model in {args.model}: run examples/quickstart.py (downloads and converts "
            f"{OFFICIAL_HUB_ID}), pass --model FOLDER_OR_HUB_ID, or --tiny for a small random model made locally."
        )
    return args.model


def load(folder: str):
    """Model (eval mode) and processor of a converted folder or Hub id; one line naming what to pass when offline."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import g2vlm_hf  # noqa: F401  (registers G2VLM with the Auto classes)

    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype="auto").eval()
        return model, AutoProcessor.from_pretrained(folder)
    except OSError as error:
        fail(
            f"cannot load {folder} ({str(error).splitlines()[0][:160]}); offline, pass --model FOLDER (a converted "
            "checkpoint) or --tiny (a small random model made locally, no download)."
        )


def example_views(count: int = 3, height: int = 240, width: int = 320) -> list[Image.Image]:
    """`count` views of a synthetic textured room from cameras turning and moving a little (no files needed)."""
    from g2vlm_hf.training import render_room, yaw_pose

    poses = np.stack([yaw_pose(0.15 * index, 0.0, 8.0 * index) for index in range(count)])
    return [Image.fromarray(image) for image in render_room(poses, height, width).images]


def build_tiny_model(folder: Path) -> Path:
    """Save a small random G2VLM (every part, GQA, confidence head) and its processor into `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2VLImageProcessor

    from g2vlm_hf import G2VLMConfig, G2VLMForConditionalGeneration, G2VLMGeometryImageProcessor, G2VLMProcessor
    from g2vlm_hf.processing.chat_template import RECONSTRUCTION_PROMPT

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: index for index, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    specials += ["<|image_pad|>", "<|geo_pad|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, padding_side="left", pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = tokenizer.get_vocab()
    config = G2VLMConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            bos_token_id=ids["<|im_start|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
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
        image_token_id=ids["<|image_pad|>"],
        geometry_token_id=ids["<|geo_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        head_depth=1,
        head_num_attention_heads=4,
        point_head_hidden_size=48,
        camera_head_hidden_size=32,
        use_confidence_head=True,
    )
    config.reconstruction_prompt_ids = tokenizer.encode(RECONSTRUCTION_PROMPT, add_special_tokens=False)
    config.architectures = [G2VLMForConditionalGeneration.__name__]
    torch.manual_seed(0)
    model = G2VLMForConditionalGeneration(config).eval()
    processor = G2VLMProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2),
        geometry_image_processor=G2VLMGeometryImageProcessor(target_width=112),
        tokenizer=tokenizer,
        semantic_image_size=112,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    ).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
