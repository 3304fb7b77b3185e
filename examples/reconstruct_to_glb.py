"""Reconstruct a scene from its views and save it as scene.glb (points + camera frustums), points.ply,
cameras.json and 16-bit depth PNGs.

    python examples/reconstruct_to_glb.py --model outputs/g2vlm-tiny --output outputs/scene view_0.png view_1.png ...

Without views it uses the fixture's example views; --model takes a converted folder or a Hub id.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import g2vlm_hf  # noqa: F401
from g2vlm_hf.export import export_model_scene

EXAMPLE_VIEWS = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official-tiny" / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("views", nargs="*", type=Path)
    parser.add_argument("--model", default="outputs/g2vlm-tiny")
    parser.add_argument("--output", type=Path, default=Path("outputs/scene"))
    parser.add_argument("--confidence-percentile", type=float, default=None)
    args = parser.parse_args()
    views = args.views or sorted(EXAMPLE_VIEWS.glob("view_*.png"))

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto").eval()
    processor = AutoProcessor.from_pretrained(args.model)
    inputs = processor(geometry_images=[str(v) for v in views], return_tensors="pt")
    with torch.inference_mode():
        scene = model.reconstruct(**inputs)
    # coloured by the views as the processor resized them
    written = export_model_scene(
        args.output,
        scene,
        inputs["geometry_pixel_values"],
        processor.geometry_image_processor,
        confidence_percentile=args.confidence_percentile,
    )
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
