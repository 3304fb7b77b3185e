"""Expert freezing for the paper's two training stages, by the parts of `g2vlm_hf.modeling.parts`, and PEFT/LoRA
target recipes per expert."""

from dataclasses import dataclass, field

from torch import nn
from transformers.utils import logging

from ..modeling.geometry_encoder import UNUSED_PARAMETERS
from ..modeling.parts import PART_NAMES, part_of

logger = logging.get_logger(__name__)

# The groups users freeze and unfreeze are the parts of the model (modeling/parts.py), except that the LM head trains
# with the input embeddings as `embeddings` (tied checkpoints hold them as one matrix).
_GROUP_OF_PART = {part: part for part in PART_NAMES} | {"lm_head": "embeddings"}
PARAMETER_GROUPS: tuple[str, ...] = tuple(dict.fromkeys(_GROUP_OF_PART[part] for part in PART_NAMES))
# parameters no forward pass of G²VLM uses (see geometry_encoder.UNUSED_PARAMETERS): never made trainable
NEVER_USED = tuple(f"geometry_encoder.{name}" for name in UNUSED_PARAMETERS)

# Paper, section on training: stage 1 learns geometry with the semantic expert frozen; stage 2 trains both experts.
TRAINING_STAGES = {
    1: ("geometry_expert", "geometry_projector", "geometry_heads"),
    2: ("semantic_expert", "geometry_expert", "geometry_projector", "geometry_heads"),
}


def parameter_group(name: str) -> str:
    """The group of `PARAMETER_GROUPS` a parameter name belongs to (its part of G²VLM, the LM head in `embeddings`);
    names behind PEFT's `base_model.model.` prefix too. A ValueError for a name of no part."""
    return _GROUP_OF_PART[part_of(name)]


@dataclass
class TrainableReport:
    """Trainable and total parameter counts, overall and per part."""

    trainable: int = 0
    total: int = 0
    per_group: dict[str, tuple[int, int]] = field(default_factory=dict)  # group -> (trainable, total)

    def __str__(self) -> str:
        lines = [
            f"trainable {self.trainable:,} / {self.total:,} parameters ({100 * self.trainable / max(self.total, 1):.2f}%)"
        ]
        lines += [f"  {group}: {t:,} / {n:,}" for group, (t, n) in self.per_group.items()]
        return "\n".join(lines)


def is_adapter(name: str) -> bool:
    """Whether a parameter is a PEFT LoRA adapter's (`lora_A`, `lora_B`, DoRA's `lora_magnitude_vector`, ...)."""
    return "lora_" in name


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count trainable parameters per part of G²VLM (LoRA adapters as `adapters`)."""
    report = TrainableReport(per_group={group: (0, 0) for group in PARAMETER_GROUPS})
    for name, parameter in model.named_parameters():
        group = "adapters" if is_adapter(name) else parameter_group(name)
        trainable, total = report.per_group.get(group, (0, 0))
        count = parameter.numel()
        report.per_group[group] = (trainable + count * parameter.requires_grad, total + count)
        report.total += count
        report.trainable += count * parameter.requires_grad
    return report


def set_trainable(model: nn.Module, groups: str | tuple[str, ...] | list[str]) -> TrainableReport:
    """Make exactly the parameters of `groups` (one group or several, see `PARAMETER_GROUPS`) trainable and report
    the counts. On a PEFT model the LoRA adapters are left as they are (trainable, as PEFT made them): `groups` are
    the parts of G²VLM trained beside them (e.g. `"geometry_heads"`), or none."""
    groups = (groups,) if isinstance(groups, str) else tuple(groups)
    unknown = set(groups) - set(PARAMETER_GROUPS)
    if unknown:
        hint = " (the LM head trains with `embeddings`)" if "lm_head" in unknown else ""
        raise ValueError(f"Unknown parameter group(s) {sorted(unknown)}; choose from {PARAMETER_GROUPS}{hint}.")
    for name, parameter in model.named_parameters():
        if not is_adapter(name):
            parameter.requires_grad_(parameter_group(name) in groups and not name.endswith(NEVER_USED))
    report = trainable_report(model)
    logger.info(f"Trainable parts {sorted(groups)}: {report}")
    return report


def freeze_for_stage(model: nn.Module, stage: int) -> TrainableReport:
    """Set `requires_grad` for training stage 1 (geometry expert, projector and heads; semantic expert frozen) or
    stage 2 (both experts, projector and heads). The encoders, embeddings and LM head stay frozen in both."""
    if isinstance(stage, bool) or stage not in TRAINING_STAGES:  # True == 1 in Python
        raise ValueError(f"stage must be one of {sorted(TRAINING_STAGES)}, got {stage!r}.")
    return set_trainable(model, TRAINING_STAGES[stage])


# LoRA recipe -> (the part of modeling/parts.py its Linear leaves belong to, a regex over their module names);
# tests/test_finetuning.py checks each recipe's modules against its part.
LORA_RECIPES: dict[str, tuple[str, str]] = {
    "semantic_attention": ("semantic_expert", r"language_model\.layers\.\d+\.self_attn\.[qkvo]_proj"),
    "semantic_mlp": ("semantic_expert", r"language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj"),
    "geometry_attention": ("geometry_expert", r"language_model\.layers\.\d+\.self_attn\.geo_[qkvo]_proj"),
    "geometry_mlp": ("geometry_expert", r"language_model\.layers\.\d+\.geo_mlp\.geo_(gate|up|down)_proj"),
    "semantic_encoder": ("semantic_encoder", r"visual\.blocks\.\d+\.attn\.(qkv|proj)"),
    "geometry_encoder": (
        "geometry_encoder",
        r"geometry_encoder\.encoder\.layer\.\d+\.attention\.(query|key|value|dense)",
    ),
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
    recipes = []
    if semantic:
        recipes += ["semantic_attention"] + (["semantic_mlp"] if mlp else [])
    if geometry:
        recipes += ["geometry_attention"] + (["geometry_mlp"] if mlp else [])
    recipes += ["semantic_encoder"] * semantic_encoder + ["geometry_encoder"] * geometry_encoder
    if not recipes:
        raise ValueError("Choose at least one part to adapt (semantic, geometry, semantic_encoder, geometry_encoder).")
    return r".*\.(?:" + "|".join(LORA_RECIPES[recipe][1] for recipe in recipes) + ")"
