"""Quickstart: a G²VLM model reconstructs a scene and answers a question about it, from any checkout.

    python examples/quickstart.py --tiny                    # offline: a small random model made locally, in seconds
    python examples/quickstart.py                           # the real model: downloads InternRobotics/G2VLM-2B-MoT
                                                            # (~9 GB in bf16) once, converts it to outputs/g2vlm-2b
    python examples/quickstart.py --official-dir DIR        # converts an official folder you downloaded
    python examples/quickstart.py --model FOLDER_OR_HUB_ID --images a.png b.png ...

Without --images it uses three views of a synthetic room rendered on the spot. With --tiny the weights are random:
the answer is gibberish and the geometry arbitrary but well-formed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from example_models import CONVERTED_DIR, OFFICIAL_HUB_ID, example_views, fail, load, model_folder

DEFAULT_QUESTION = "How far is the first camera from the second one? Answer in meters."


def official_model(official_dir: Path | None, output: Path) -> str:
    """The converted official model in `output`: converted from `official_dir`, or from the Hub download, once."""
    from g2vlm_hf.conversion import convert_official_checkpoint

    if (output / "config.json").is_file():
        print(f"using the converted model in {output.resolve()}")
        return str(output)
    if official_dir is None:
        from huggingface_hub import snapshot_download

        try:
            official_dir = Path(snapshot_download(OFFICIAL_HUB_ID))
        except Exception as error:  # offline, proxy, no disk: all end the same way for the user
            fail(
                f"cannot download {OFFICIAL_HUB_ID} ({type(error).__name__}); offline, run with --tiny (a small random "
                "model made locally), --official-dir DIR (a downloaded official folder) or --model FOLDER."
            )
    convert_official_checkpoint(official_dir, output)
    print(f"converted model written to {output.resolve()}")
    return str(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a converted folder or Hub id (default: the official model)")
    parser.add_argument("--tiny", action="store_true", help="a small random model made locally (no download)")
    parser.add_argument("--official-dir", type=Path, default=None, help="an official checkpoint folder to convert")
    parser.add_argument("--output", type=Path, default=CONVERTED_DIR, help="where the converted model goes")
    parser.add_argument("--images", nargs="+", type=Path, default=None, help="views of one scene (default: synthetic)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    args = parser.parse_args()

    if args.tiny or args.model is not None:
        args.model = args.model or str(args.output)
        folder = model_folder(args)
    else:
        folder = official_model(args.official_dir, args.output)
    model, processor = load(folder)
    images = [str(path) for path in args.images] if args.images else example_views()

    # 3D reconstruction: camera poses, point maps and depth for every view
    with torch.inference_mode():
        scene = model.reconstruct(**processor(geometry_images=images, return_tensors="pt"))
    print(f"camera poses {tuple(scene.camera_poses.shape)}, world points {tuple(scene.world_points.shape)}")
    print("camera positions (world frame):", [pose[:3, 3].tolist() for pose in scene.camera_poses[0]])
    print(f"depth range {scene.depth.min().item():.3f} .. {scene.depth.max().item():.3f}")

    # Spatial chat: the views' geometry tokens sit in the context while the model answers
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": args.question}]
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
