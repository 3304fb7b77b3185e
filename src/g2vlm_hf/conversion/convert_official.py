"""Convert an official G²VLM checkpoint folder into a transformers `save_pretrained` folder.

The official folder (e.g. `InternRobotics/G2VLM-2B-MoT`) holds `text_config.json`, `vit_config.json`,
`dino_config.json`, `model.safetensors` and tokenizer files. The conversion renames every weight through
`OFFICIAL_KEY_RENAMES`, fails naming any key it cannot place (or any parameter left without a weight), adds the
`<|geo_pad|>` placeholder token, writes everything to a temporary folder, checks that the result loads with no
missing or unexpected keys and runs once on a synthetic input (finite outputs of the expected shapes), and only then
moves it into place.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import SafetensorError, safe_open
from transformers import AddedToken, AutoImageProcessor, GenerationConfig, PreTrainedTokenizerFast
from transformers.utils import logging

from ..modeling import G2VLMConfig, G2VLMForConditionalGeneration
from ..processing import RECONSTRUCTION_PROMPT, G2VLMProcessor
from ..safe_output import check_output_dir, staged_outputs
from .synthetic_check import check_runs_on_synthetic_input

logger = logging.get_logger(__name__)

GEOMETRY_PLACEHOLDER = "<|geo_pad|>"
# The official attention ignores the config's mrope_section and always uses these sections.
OFFICIAL_MROPE_SECTION = [16, 24, 24]
OFFICIAL_FILES = ("text_config.json", "vit_config.json", "dino_config.json", "model.safetensors")

# Applied in order, each to the result of the previous ones.
OFFICIAL_KEY_RENAMES: list[tuple[str, str]] = [
    # two-expert decoder
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.norm_moe_geo\.", "model.language_model.geo_norm."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"\.self_attn\.([qkvo])_proj_moe_geo\.", r".self_attn.geo_\1_proj."),
    (r"\.self_attn\.([qk])_norm_moe_geo\.", r".self_attn.geo_\1_norm."),
    (r"\.mlp_moe_geo\.(gate|up|down)_proj\.", r".geo_mlp.geo_\1_proj."),
    (r"\.(input|post_attention)_layernorm_moe_geo\.", r".geo_\1_layernorm."),
    (r"\.ls1\.gamma$", ".geo_attn_layer_scale.gamma"),
    (r"\.ls2\.gamma$", ".geo_mlp_layer_scale.gamma"),
    # semantic encoder (same layout as transformers' Qwen2-VL vision tower)
    (r"^vit_model\.", "model.visual."),
    # geometry encoder (its attention keeps the original DINOv2 leaf names query/key/value/dense)
    (r"\.attention\.attention\.(query|key|value)\.", r".attention.\1."),
    (r"\.attention\.output\.dense\.", ".attention.dense."),
    (r"^dino_model\.", "model.geometry_encoder."),
    (r"^dino2llm\.", "model.geometry_projector."),
    # geometry heads
    (r"^conf_decoder\.", "confidence_decoder."),
    (r"^conf_head\.", "confidence_head."),
    (
        r"^(point_decoder|point_head|camera_decoder|camera_head|global_points_decoder|global_point_head|"
        r"confidence_decoder|confidence_head)\.",
        r"geometry_heads.\1.",
    ),
    (r"\.camera_head\.more_mlps\.", ".camera_head.pose_mlp."),
    (r"\.cross_attn\.q_proj\.", ".cross_attn.query."),
    (r"\.cross_attn\.k_proj\.", ".cross_attn.key."),
    (r"\.cross_attn\.v_proj\.", ".cross_attn.value."),
]


def rename_official_key(key: str) -> str:
    """The name in this package of an official state-dict key."""
    for pattern, replacement in OFFICIAL_KEY_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def config_from_official(
    text_config: dict,
    vit_config: dict,
    dino_config: dict,
    *,
    token_ids: dict[str, int],
    use_confidence_head: bool,
) -> G2VLMConfig:
    """Build the G2VLMConfig of an official checkpoint from its three config dicts.

    `token_ids` maps `image`, `geometry`, `vision_start`, `vision_end`, `bos`, `eos`, `pad` to token ids.
    """
    rope_scaling = text_config.get("rope_scaling") or {}
    if rope_scaling.get("mrope_section", OFFICIAL_MROPE_SECTION) != OFFICIAL_MROPE_SECTION:
        logger.warning(
            f"text_config.json sets mrope_section={rope_scaling['mrope_section']}, but the official attention always "
            f"uses {OFFICIAL_MROPE_SECTION}; the converted model uses {OFFICIAL_MROPE_SECTION}."
        )
    text_keys = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
        "attention_dropout",
    )  # fmt: skip
    text = {key: text_config[key] for key in text_keys if key in text_config}
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": text_config.get("rope_theta", 1000000.0),
        "mrope_section": list(OFFICIAL_MROPE_SECTION),
    }
    text.update(bos_token_id=token_ids["bos"], eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"])
    vision_keys = (
        "depth", "embed_dim", "hidden_size", "hidden_act", "mlp_ratio", "num_heads", "in_channels",
        "spatial_merge_size", "temporal_patch_size", "initializer_range",
    )  # fmt: skip
    vision = {key: vit_config[key] for key in vision_keys if key in vit_config}
    vision["patch_size"] = 14  # the official loader overrides the file's value with 14
    geometry_keys = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "hidden_act", "hidden_dropout_prob",
        "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps", "image_size", "patch_size",
        "num_channels", "qkv_bias", "layerscale_value", "drop_path_rate", "use_swiglu_ffn", "num_register_tokens",
    )  # fmt: skip
    geometry = {key: dino_config[key] for key in geometry_keys if key in dino_config}
    return G2VLMConfig(
        text_config=text,
        vision_config=vision,
        geometry_config=geometry,
        image_token_id=token_ids["image"],
        geometry_token_id=token_ids["geometry"],
        vision_start_token_id=token_ids["vision_start"],
        vision_end_token_id=token_ids["vision_end"],
        geometry_encoder_attention="official_packed_windows",
        use_confidence_head=use_confidence_head,
        tie_word_embeddings=False,
    )


def expected_state_dict_shapes(config: G2VLMConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every weight of the port for `config`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = G2VLMForConditionalGeneration(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def map_official_keys(
    official_shapes: dict[str, tuple[int, ...]], expected_shapes: dict[str, tuple[int, ...]]
) -> dict[str, str]:
    """Map every official key to a port key, or raise a ValueError naming what does not fit."""
    mapping = {key: rename_official_key(key) for key in official_shapes}
    unexpected = sorted(key for key, new in mapping.items() if new not in expected_shapes)
    missing = sorted(set(expected_shapes) - set(mapping.values()))
    mismatched = sorted(
        f"{key} {official_shapes[key]} -> {new} {expected_shapes[new]}"
        for key, new in mapping.items()
        if new in expected_shapes and tuple(official_shapes[key]) != expected_shapes[new]
    )
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} official key(s) with no place in the port: {_preview(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} port weight(s) with no official key: {_preview(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_preview(mismatched)}")
    if problems:
        raise ValueError("The official checkpoint does not match the G2VLM layout. " + " ".join(problems))
    return mapping


def _preview(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}).") from error


def _load_tokenizer(input_dir: Path) -> PreTrainedTokenizerFast:
    """The official tokenizer as its tokenizer.json defines it, plus the geometry placeholder token."""
    # batched generation pads on the left
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(input_dir), padding_side="left")
    if GEOMETRY_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(GEOMETRY_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    names = {
        "image": "<|image_pad|>",
        "geometry": GEOMETRY_PLACEHOLDER,
        "vision_start": "<|vision_start|>",
        "vision_end": "<|vision_end|>",
        "bos": "<|im_start|>",
        "eos": "<|im_end|>",
    }
    vocab = tokenizer.get_vocab()
    absent = [token for token in names.values() if token not in vocab]
    if absent:
        raise ValueError(f"The official tokenizer lacks the special token(s) {absent}.")
    ids = {name: vocab[token] for name, token in names.items()}
    ids["pad"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids["eos"]
    return ids


def convert_official_checkpoint(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Convert the official checkpoint folder `input_dir` into a transformers folder at `output_dir`.

    Args:
        input_dir: folder with `text_config.json`, `vit_config.json`, `dino_config.json`, `model.safetensors` and
            the tokenizer files.
        output_dir: where the converted folder goes: a new or empty folder, or with `overwrite` an earlier
            output of the converter (checked by its manifest, see README "Safety of outputs").
        max_shard_size: largest safetensors shard.
        overwrite: replace an earlier converter output at `output_dir`.

    Returns:
        The output folder, loadable with `AutoModelForImageTextToText.from_pretrained`.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    missing_files = [name for name in OFFICIAL_FILES if not (input_dir / name).is_file()]
    if missing_files:
        raise FileNotFoundError(f"{input_dir} is not an official G2VLM checkpoint folder: missing {missing_files}.")
    check_output_dir(output_dir, inputs=[input_dir], overwrite=overwrite, kind="converted-model")
    try:
        with safe_open(input_dir / "model.safetensors", framework="pt"):
            pass
    except SafetensorError as error:
        raise ValueError(
            f"{input_dir / 'model.safetensors'} is damaged or incomplete ({error}); download it again."
        ) from error

    tokenizer = _load_tokenizer(input_dir)
    with safe_open(input_dir / "model.safetensors", framework="pt") as checkpoint:
        official_shapes = {key: tuple(checkpoint.get_slice(key).get_shape()) for key in checkpoint.keys()}  # noqa: SIM118 (safe_open is not iterable)
        dtypes = {checkpoint.get_slice(key).get_dtype() for key in checkpoint.keys()}  # noqa: SIM118 (safe_open is not iterable)
        config = config_from_official(
            _read_json(input_dir / "text_config.json"),
            _read_json(input_dir / "vit_config.json"),
            _read_json(input_dir / "dino_config.json"),
            token_ids=_token_ids(tokenizer),
            use_confidence_head=any(key.startswith("conf_head.") for key in official_shapes),
        )
        config.reconstruction_prompt_ids = tokenizer.encode(RECONSTRUCTION_PROMPT, add_special_tokens=False)
        mapping = map_official_keys(official_shapes, expected_state_dict_shapes(config))
        state_dict = {
            new: checkpoint.get_tensor(old)
            for old, new in logging.tqdm(
                mapping.items(), desc="Renaming weights", disable=not logging.is_progress_bar_enabled()
            )
        }
    config.dtype = (
        {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtypes.pop(), torch.float32)
        if len(dtypes) == 1
        else torch.float32
    )
    config.architectures = [G2VLMForConditionalGeneration.__name__]

    # the previous output is replaced only once the new one is complete; one writer at a time
    with staged_outputs([output_dir], kinds=["converted-model"], overwrite=overwrite) as (staging,):
        config.save_pretrained(staging)
        _generation_config(config).save_pretrained(staging)
        _build_processor(input_dir, tokenizer).save_pretrained(staging)
        save_torch_state_dict(state_dict, staging, max_shard_size=max_shard_size)
        del state_dict  # the check below loads the saved copy
        _check_loads_and_runs(staging)
    logger.info(f"Converted {len(mapping)} weights from {input_dir} into {output_dir}.")
    return output_dir


def _build_processor(input_dir: Path, tokenizer: PreTrainedTokenizerFast) -> G2VLMProcessor:
    """The processor of the converted model: the official Qwen2-VL image settings, the default geometry settings."""
    if not (input_dir / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"{input_dir} has no preprocessor_config.json (the Qwen2-VL image processor settings of the checkpoint)."
        )
    return G2VLMProcessor(image_processor=AutoImageProcessor.from_pretrained(str(input_dir)), tokenizer=tokenizer)


def _generation_config(config: G2VLMConfig) -> GenerationConfig:
    text = config.text_config
    return GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id, do_sample=False
    )


def _check_loads_and_runs(folder: Path) -> None:
    """Load the converted folder, fail if any weight is missing, unexpected or mismatched, then run it once on a
    synthetic input (as transformers' conversion scripts run the converted model before saving)."""
    model, info = G2VLMForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    problems = {name: sorted(keys) for name, keys in info.items() if keys and name != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise ValueError(f"The converted checkpoint does not load cleanly: {problems or info['error_msgs']}")
    check_runs_on_synthetic_input(model.eval())


__all__ = [
    "OFFICIAL_KEY_RENAMES",
    "config_from_official",
    "convert_official_checkpoint",
    "expected_state_dict_shapes",
    "map_official_keys",
    "rename_official_key",
]
