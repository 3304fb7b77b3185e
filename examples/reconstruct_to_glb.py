"""Reconstruct a scene from its views and save it as scene.glb (points + camera frustums), points.ply,
cameras.json and 16-bit depth PNGs.

    python examples/reconstruct_to_glb.py --model outputs/g2vlm-2b --output outputs/scene view_0.png view_1.png ...
    python examples/reconstruct_to_glb.py --tiny            # offline: a small random model made locally

Without views it renders three views of a synthetic room; --model takes a converted folder or a Hub id.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from example_models import add_model_arguments, example_views, load, model_folder

from g2vlm_hf.export import export_model_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("views", nargs="*", type=Path)
    add_model_arguments(parser)
    parser.add_argument("--output", type=Path, default=Path("outputs/scene"))
    parser.add_argument("--confidence-percentile", type=float, default=None)
    args = parser.parse_args()
    model, processor = load(model_folder(args))
    views = [str(view) for view in args.views] or example_views()
    inputs = processor(geometry_images=views, return_tensors="pt")
    with torch.inference_mode():
        scene = model.reconstruct(**inputs)
    # coloured by the views as the processor resized them
    written = export_model_scene(
        args.output,
        scene,
        inputs["geometry_pixel_values"],
        processor.geometry_image_processor,
        confidence_percentile=args.confidence_percentile,
        view_names=[view.name for view in args.views] or None,  # each camera of cameras.json names its file
    )
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
