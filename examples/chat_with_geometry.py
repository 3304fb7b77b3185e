"""Chat about a scene seen from several views: all views enter the context as ONE geometry block (their DINOv2
tokens attend to each other across views), then each view as a semantic image, then the question. The same call
also returns the reconstruction the answer is grounded in.

    python examples/chat_with_geometry.py --model outputs/g2vlm-2b view_0.png view_1.png view_2.png
    python examples/chat_with_geometry.py --tiny            # offline: a small random model, a synthetic room
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from example_models import add_model_arguments, example_views, load, model_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("views", nargs="*", type=Path)
    add_model_arguments(parser)
    parser.add_argument("--question", default="Did the camera move to the left or to the right between the views?")
    args = parser.parse_args()
    model, processor = load(model_folder(args))
    views = [str(view) for view in args.views] or example_views()
    content = [{"type": "image", "image": view} for view in views] + [{"type": "text", "text": args.question}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )  # fmt: skip
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        scene = model.reconstruct(**inputs)  # the geometry the answer is grounded in
    print("answer:", processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    print("camera positions:", [pose[:3, 3].tolist() for pose in scene.camera_poses[0]])


if __name__ == "__main__":
    main()
