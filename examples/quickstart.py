"""Quickstart: convert an official G²VLM checkpoint, reconstruct a scene and chat about it.

With no arguments it uses the tiny official-layout checkpoint and example images of the shared fixtures
(../shared/fixtures/official-tiny), so it runs offline in seconds; its answers are random text, its geometry random
but well-formed. Point --official-dir at a real official folder (e.g. a download of InternRobotics/G2VLM-2B-MoT) and
--images at your own views for real results.

    python examples/quickstart.py [--official-dir DIR] [--output outputs/g2vlm-tiny] [--images a.png b.png ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import g2vlm_hf  # noqa: F401  (registers G2VLM with the Auto classes)
from g2vlm_hf.conversion import convert_official_checkpoint

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official-tiny"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dir", type=Path, default=FIXTURE / "checkpoint")
    parser.add_argument("--output", type=Path, default=Path("outputs/g2vlm-tiny"), help="converted model folder")
    parser.add_argument("--images", nargs="+", type=Path, default=[FIXTURE / "images" / f"view_{i}.png" for i in range(3)])
    parser.add_argument("--question", default="How far is the first camera from the second one? Answer in meters.")
    args = parser.parse_args()

    if not (args.output / "config.json").is_file():
        convert_official_checkpoint(args.official_dir, args.output)
        print(f"converted model written to {args.output.resolve()}")
    else:
        print(f"using the converted model in {args.output.resolve()}")
    model = AutoModelForImageTextToText.from_pretrained(args.output, dtype="auto").eval()
    processor = AutoProcessor.from_pretrained(args.output)

    # 3D reconstruction: camera poses, point maps and depth for every view
    with torch.inference_mode():
        scene = model.reconstruct(**processor(geometry_images=[str(p) for p in args.images], return_tensors="pt"))
    print(f"camera poses {tuple(scene.camera_poses.shape)}, world points {tuple(scene.world_points.shape)}")
    print("camera positions (world frame):", [pose[:3, 3].tolist() for pose in scene.camera_poses[0]])
    print(f"depth range {scene.depth.min().item():.3f} .. {scene.depth.max().item():.3f}")

    # Spatial chat: the views' geometry tokens sit in the context while the model answers
    content = [{"type": "image", "image": str(p)} for p in args.images] + [{"type": "text", "text": args.question}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )  # fmt: skip
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print("answer:", answer)


if __name__ == "__main__":
    main()
