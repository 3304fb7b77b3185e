"""Spatial question answering about one image, streamed token by token.

    python examples/spatial_chat.py --model outputs/g2vlm-tiny --image room.jpg "Which is closer, the chair or the lamp?"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TextStreamer

import g2vlm_hf  # noqa: F401

EXAMPLE_IMAGE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official-tiny" / "images" / "chat.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default="How far is the red box from the blue wall? Answer in meters.")
    parser.add_argument("--model", default="outputs/g2vlm-tiny")
    parser.add_argument("--image", type=Path, default=EXAMPLE_IMAGE)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto").eval()
    processor = AutoProcessor.from_pretrained(args.model)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": str(args.image)}, {"type": "text", "text": args.question}]}
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)


if __name__ == "__main__":
    main()
