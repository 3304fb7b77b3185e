"""Safetensors shards grouped by model component, so that a checkpoint's file list shows its parts.

A converted G²VLM folder is re-sharded into one file per component (split further only past `max_shard_size`). The
components are the parts of `g2vlm_hf.modeling.parts.MODEL_PARTS` (README, "Parts of the model") spelled in
kebab-case, except that the geometry projector is stored with the geometry encoder (`SHARD_OF_PART`): `semantic-encoder`,
`geometry-encoder` (DINOv2 and the projector), `embeddings`, `semantic-expert`, `geometry-expert`, `geometry-heads`,
`lm-head`.

Shards are read and written one at a time (memory stays below one shard), and their bytes depend only on the
tensors: writing the same checkpoint twice gives identical files, which lets a Hub upload skip what it already has.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging
from transformers.utils.hub import convert_file_size_to_int

from ..export.atomic import file_mode
from ..modeling.parts import MODEL_PARTS, PART_NAMES, part_of

logger = logging.get_logger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Part of the model -> the component (shard name) holding its weights. The projector joins the encoder whose output
# it maps (a one-matrix shard of its own would only lengthen the file list); this also keeps the file names that
# conversions had before the parts table.
SHARD_OF_PART: dict[str, str] = {part: part.replace("_", "-") for part in PART_NAMES} | {
    "geometry_projector": "geometry-encoder"
}
# Shard order: the parts' order (encoders, the decoder's parts, the heads).
COMPONENTS: tuple[str, ...] = tuple(dict.fromkeys(SHARD_OF_PART.values()))

_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def component_of(name: str) -> str:
    """The component (one of `COMPONENTS`) a weight belongs to; a ValueError for a name outside the G²VLM layout."""
    return SHARD_OF_PART[part_of(name)]


def component_description(component: str) -> str:
    """What the component holds: the descriptions of its parts."""
    return "; ".join(part.description for part in MODEL_PARTS if SHARD_OF_PART[part.name] == component)


def checkpoint_files(folder: str | Path) -> dict[str, Path]:
    """Map every weight name of a `save_pretrained` folder to the safetensors file holding it."""
    folder = Path(folder)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SAFE_WEIGHTS_NAME
    if single.is_file():
        with safe_open(single, framework="pt") as handle:
            return {name: single for name in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    raise FileNotFoundError(f"{folder} holds no {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}.")


def is_weight_file(name: str) -> bool:
    """Whether a file name of a checkpoint folder is a weight shard or the shard index."""
    return name.endswith(".safetensors") or name == SAFE_WEIGHTS_INDEX_NAME


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    file: Path
    nbytes: int


def _tensor_infos(files: Mapping[str, Path]) -> list[_TensorInfo]:
    infos = []
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for name in names:
                tensor_slice = handle.get_slice(name)
                count = 1
                for size in tensor_slice.get_shape():
                    count *= size
                infos.append(_TensorInfo(name, file, count * _DTYPE_BYTES.get(tensor_slice.get_dtype(), 1)))
    return infos


def plan_component_shards(
    infos: Iterable[_TensorInfo], max_shard_size: int | str = "5GB"
) -> dict[str, list[_TensorInfo]]:
    """Shard file name -> its tensors: one shard per component, split in name order past `max_shard_size`."""
    limit = convert_file_size_to_int(max_shard_size)
    grouped: dict[str, list[_TensorInfo]] = {component: [] for component in COMPONENTS}
    for info in sorted(infos, key=lambda info: info.name):
        grouped[component_of(info.name)].append(info)
    plan: dict[str, list[_TensorInfo]] = {}
    for component, members in grouped.items():
        if not members:
            continue
        pieces: list[list[_TensorInfo]] = [[]]
        size = 0
        for info in members:
            if pieces[-1] and size + info.nbytes > limit:
                pieces.append([])
                size = 0
            pieces[-1].append(info)
            size += info.nbytes
        for number, piece in enumerate(pieces, start=1):
            suffix = f"-{number:05d}-of-{len(pieces):05d}" if len(pieces) > 1 else ""
            plan[f"model-{component}{suffix}.safetensors"] = piece
    return plan


def _read_tensors(infos: list[_TensorInfo]) -> Iterator[tuple[str, object]]:
    with ExitStack() as stack:
        handles = {}
        for info in infos:
            if info.file not in handles:
                handles[info.file] = stack.enter_context(safe_open(info.file, framework="pt"))
            yield info.name, handles[info.file].get_tensor(info.name)


def save_component_shards(
    source: str | Path,
    output_dir: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    exclude: tuple[str, ...] = (),
) -> dict[str, list[str]]:
    """Write the weights of the checkpoint folder `source` into `output_dir` sharded by component, with the index.

    Args:
        source: a `save_pretrained` folder (single file or sharded).
        output_dir: an existing folder; `model-<component>[-0000i-of-0000n].safetensors` and
            `model.safetensors.index.json` are written there.
        max_shard_size: a component larger than this is split into several shards.
        exclude: components to leave out (e.g. `("semantic-encoder", "lm-head")`).

    Returns:
        Component -> its shard file names.
    """
    unknown = sorted(set(exclude) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"Unknown component(s) {unknown}; choose among {list(COMPONENTS)}.")
    output_dir = Path(output_dir)
    infos = [info for info in _tensor_infos(checkpoint_files(source)) if component_of(info.name) not in exclude]
    plan = plan_component_shards(infos, max_shard_size)
    weight_map: dict[str, str] = {}
    components: dict[str, list[str]] = {}
    for file_name, members in logging.tqdm(
        plan.items(), desc="Writing component shards", disable=not logging.is_progress_bar_enabled()
    ):
        tensors = dict(_read_tensors(members))
        save_file(tensors, str(output_dir / file_name), metadata={"format": "pt"})
        os.chmod(output_dir / file_name, file_mode())  # safetensors makes it 0600; an output gets the usual mode
        del tensors
        for info in members:
            weight_map[info.name] = file_name
        components.setdefault(component_of(members[0].name), []).append(file_name)
    index = {
        "metadata": {"total_size": sum(info.nbytes for info in infos), "components": components},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (output_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    logger.info(f"Wrote {len(infos)} weights into {len(plan)} component shards in {output_dir}.")
    return components


__all__ = [
    "COMPONENTS",
    "SHARD_OF_PART",
    "checkpoint_files",
    "component_description",
    "component_of",
    "is_weight_file",
    "plan_component_shards",
    "save_component_shards",
]
