"""A reconstruction-only checkpoint: a converted G²VLM folder without the semantic ViT and the LM head.

It holds what 3D reconstruction runs through (DINOv2, projector, the two-expert decoder, geometry heads) and loads with
`AutoModel.from_pretrained(folder)` as [`G2VLMForReconstruction`]. Its reconstructions equal the full model's
(`model.reconstruct`) for the same inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers.utils import logging

from ..modeling import G2VLMConfig, G2VLMForReconstruction, G2VLMReconstructionConfig
from ..output_manifest import MANIFEST_NAME
from ..safe_output import check_output_dir, staged_outputs
from .sharding import is_weight_file, save_component_shards

logger = logging.get_logger(__name__)

OUTPUT_KIND = "converted-model"  # the kind `g2vlm-convert` gives both its outputs (full and reconstruction-only)
DROPPED_COMPONENTS = ("semantic-encoder", "lm-head")
# Files of a full folder that a reconstruction-only folder does not keep (it does not generate text).
DROPPED_FILES = ("config.json", "generation_config.json", "README.md", MANIFEST_NAME)


def read_model_type(folder: str | Path) -> str:
    """The `model_type` of the `config.json` in `folder` (a ValueError if there is none)."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} is not a converted G2VLM folder: it has no config.json.")
    return json.loads(config_file.read_text(encoding="utf-8")).get("model_type", "")


def reconstruction_config(config: G2VLMConfig) -> G2VLMReconstructionConfig:
    """The [`G2VLMReconstructionConfig`] of a full config: same fields, no `vision_config`."""
    values = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map"):
        values.pop(key, None)
    values["vision_config"] = None
    recon = G2VLMReconstructionConfig(**values)
    recon.architectures = [G2VLMForReconstruction.__name__]
    return recon


def build_reconstruction_only(
    full_dir: str | Path,
    output_dir: str | Path,
    *,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Turn the converted full folder `full_dir` into a reconstruction-only folder at `output_dir`.

    Drops the `model.visual.*` and `lm_head.*` weights and the generation config, writes a
    [`G2VLMReconstructionConfig`] (`vision_config=None`, `architectures=["G2VLMForReconstruction"]`), keeps the
    processor and tokenizer files, and shards the weights by component; `full_dir` is only read. `output_dir` is an
    output of the converter, written as `g2vlm-convert` writes its own (README "Safety of outputs"): a new or empty
    folder, or with `overwrite` an unchanged earlier converter output (anything else is refused before any work and
    left as it is); the result is staged beside it, checked to load with no missing or unexpected weight, and swapped
    in with its manifest.

    Returns:
        `output_dir`, loadable with `AutoModel.from_pretrained` (after `import g2vlm_hf`).
    """
    full_dir = Path(full_dir)
    check_model_type(full_dir)
    check_output_dir(output_dir, kind=OUTPUT_KIND, inputs=[full_dir], overwrite=overwrite)
    with staged_outputs([output_dir], kinds=[OUTPUT_KIND], overwrite=overwrite) as (staging,):
        write_reconstruction_only(full_dir, staging, max_shard_size=max_shard_size)
    logger.info(f"Wrote the reconstruction-only checkpoint of {full_dir} into {output_dir}.")
    return Path(output_dir)


def check_model_type(full_dir: Path) -> None:
    """A ValueError unless `full_dir` holds a full (not reconstruction-only) converted checkpoint."""
    model_type = read_model_type(full_dir)
    if model_type != G2VLMConfig.model_type:
        raise ValueError(
            f"{full_dir} holds a {model_type!r} checkpoint; a reconstruction-only folder is built from a full "
            f"{G2VLMConfig.model_type!r} one (the output of g2vlm-convert)."
        )


def write_reconstruction_only(full_dir: str | Path, folder: str | Path, *, max_shard_size: str = "5GB") -> None:
    """Write the files of [`build_reconstruction_only`] into the existing `folder` (no manifest; other entries of it
    are left alone) and check that they load cleanly; for callers that own `folder` (a staging folder)."""
    full_dir, folder = Path(full_dir), Path(folder)
    check_model_type(full_dir)
    reconstruction_config(G2VLMConfig.from_pretrained(full_dir)).save_pretrained(folder)
    for source in sorted(full_dir.iterdir()):
        if source.is_file() and not is_weight_file(source.name) and source.name not in DROPPED_FILES:
            shutil.copy2(source, folder / source.name)
    save_component_shards(full_dir, folder, max_shard_size=max_shard_size, exclude=DROPPED_COMPONENTS)
    check_loads_cleanly(folder)


def check_loads_cleanly(folder: str | Path) -> None:
    """Load a reconstruction-only folder on the meta device; a ValueError naming any missing/unexpected weight."""
    _, info = G2VLMForReconstruction.from_pretrained(folder, output_loading_info=True, device_map="meta")
    problems = {name: sorted(keys) for name, keys in info.items() if keys and name != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise ValueError(f"The reconstruction-only checkpoint does not load cleanly: {problems or info['error_msgs']}")


__all__ = [
    "build_reconstruction_only",
    "check_loads_cleanly",
    "read_model_type",
    "reconstruction_config",
    "write_reconstruction_only",
]
