"""Which parameters belong to which part of G²VLM, expert freezing for the paper's two training stages, and
PEFT/LoRA target recipes per expert."""

import re
from dataclasses import dataclass, field

from torch import nn
from transformers.utils import logging

from ..modeling.geometry_encoder import UNUSED_PARAMETERS

logger = logging.get_logger(__name__)

PARAMETER_GROUPS = (
    "semantic_expert",  # decoder weights serving text and semantic image tokens
    "geometry_expert",  # decoder weights serving geometry tokens (`geo_*` leaves, LayerScales, `geo_norm`)
    "embeddings",  # input embeddings and LM head
    "semantic_encoder",  # Qwen2-VL ViT
    "geometry_encoder",  # DINOv2
    "geometry_projector",  # DINOv2 width -> decoder width
    "geometry_heads",  # point, camera, global-point (and confidence) heads
)
# parameters no forward pass of G²VLM uses (see geometry_encoder.UNUSED_PARAMETERS): never made trainable
NEVER_USED = tuple(f"geometry_encoder.{name}" for name in UNUSED_PARAMETERS)

# Paper, section on training: stage 1 learns geometry with the semantic expert frozen; stage 2 trains both experts.
TRAINING_STAGES = {
    1: ("geometry_expert", "geometry_projector", "geometry_heads"),
    2: ("semantic_expert", "geometry_expert", "geometry_projector", "geometry_heads"),
}


def parameter_group(name: str) -> str:
    """The part of G²VLM a parameter (or module) name belongs to (PEFT prefixes are ignored)."""
    if ".visual." in f".{name}":
        return "semantic_encoder"
    if ".geometry_encoder." in f".{name}":
        return "geometry_encoder"
    if ".geometry_projector." in f".{name}":
        return "geometry_projector"
    if ".geometry_heads." in f".{name}":
        return "geometry_heads"
    if ".embed_tokens." in f".{name}" or re.search(r"(^|\.)lm_head\.", name):
        return "embeddings"
    if ".language_model." in f".{name}":
        decoder_path = name.split(".language_model.", 1)[-1]
        return "geometry_expert" if re.search(r"(^|\.)geo_", decoder_path) else "semantic_expert"
    raise ValueError(f"Parameter {name!r} belongs to no known part of G2VLM.")


@dataclass
class TrainableReport:
    """Trainable and total parameter counts, overall and per part."""

    trainable: int = 0
    total: int = 0
    per_group: dict[str, tuple[int, int]] = field(default_factory=dict)  # group -> (trainable, total)

    def __str__(self) -> str:
        lines = [f"trainable {self.trainable:,} / {self.total:,} parameters ({100 * self.trainable / max(self.total, 1):.2f}%)"]
        lines += [f"  {group}: {t:,} / {n:,}" for group, (t, n) in self.per_group.items()]
        return "\n".join(lines)


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count trainable parameters per part of G²VLM."""
    report = TrainableReport(per_group={group: (0, 0) for group in PARAMETER_GROUPS})
    for name, parameter in model.named_parameters():
        group = "adapters" if "lora_" in name else parameter_group(name)
        trainable, total = report.per_group.get(group, (0, 0))
        count = parameter.numel()
        report.per_group[group] = (trainable + count * parameter.requires_grad, total + count)
        report.total += count
        report.trainable += count * parameter.requires_grad
    return report


def set_trainable(model: nn.Module, groups: tuple[str, ...] | list[str]) -> TrainableReport:
    """Make exactly the parameters of `groups` trainable (see `PARAMETER_GROUPS`) and report the counts."""
    unknown = set(groups) - set(PARAMETER_GROUPS)
    if unknown:
        raise ValueError(f"Unknown parameter group(s) {sorted(unknown)}; choose from {PARAMETER_GROUPS}.")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(parameter_group(name) in groups and not name.endswith(NEVER_USED))
    report = trainable_report(model)
    logger.info(f"Trainable parts {sorted(groups)}: {report}")
    return report


def freeze_for_stage(model: nn.Module, stage: int) -> TrainableReport:
    """Set `requires_grad` for training stage 1 (geometry expert, projector and heads; semantic expert frozen) or
    stage 2 (both experts, projector and heads). The encoders, embeddings and LM head stay frozen in both."""
    if stage not in TRAINING_STAGES:
        raise ValueError(f"stage must be one of {sorted(TRAINING_STAGES)}, got {stage!r}.")
    return set_trainable(model, TRAINING_STAGES[stage])


_LORA_PATTERNS = {
    "semantic_attention": r"language_model\.layers\.\d+\.self_attn\.[qkvo]_proj",
    "semantic_mlp": r"language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
    "geometry_attention": r"language_model\.layers\.\d+\.self_attn\.geo_[qkvo]_proj",
    "geometry_mlp": r"language_model\.layers\.\d+\.geo_mlp\.geo_(gate|up|down)_proj",
    "semantic_encoder": r"visual\.blocks\.\d+\.attn\.(qkv|proj)",
    "geometry_encoder": r"geometry_encoder\.encoder\.layer\.\d+\.attention\.(query|key|value|dense)",
}


def lora_target_modules(
    semantic: bool = True,
    geometry: bool = False,
    mlp: bool = True,
    semantic_encoder: bool = False,
    geometry_encoder: bool = False,
) -> str:
    """A PEFT `target_modules` regex selecting the attention (and MLP) projections of the chosen experts.

    The plain list `["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]` also selects the
    semantic expert only (the geometry expert's leaves are `geo_`-prefixed); use this function for the geometry
    expert, both experts, or the vision towers.
    """
    parts = []
    if semantic:
        parts += ["semantic_attention"] + (["semantic_mlp"] if mlp else [])
    if geometry:
        parts += ["geometry_attention"] + (["geometry_mlp"] if mlp else [])
    parts += ["semantic_encoder"] * semantic_encoder + ["geometry_encoder"] * geometry_encoder
    if not parts:
        raise ValueError("Choose at least one part to adapt (semantic, geometry, semantic_encoder, geometry_encoder).")
    return r".*\.(?:" + "|".join(_LORA_PATTERNS[part] for part in parts) + ")"
