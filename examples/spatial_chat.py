"""Spatial question answering about one image, streamed token by token.

python examples/spatial_chat.py --model outputs/g2vlm-2b --image room.jpg "Which is closer, the chair or the lamp?"
python examples/spatial_chat.py --tiny                  # offline: a small random model, a synthetic room
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from example_models import add_model_arguments, example_views, load, model_folder
from transformers import TextStreamer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default="How far is the red box from the blue wall? Answer in meters.")
    add_model_arguments(parser)
    parser.add_argument("--image", type=Path, default=None, help="the image (default: a synthetic room)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    model, processor = load(model_folder(args))
    image = str(args.image) if args.image is not None else example_views(1)[0]
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.question}]}
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)


if __name__ == "__main__":
    main()
