"""Fine-tuning helpers: parameter groups, expert freezing, LoRA recipes, synthetic data with exact geometry."""

from .experts import (
    PARAMETER_GROUPS,
    TRAINING_STAGES,
    TrainableReport,
    freeze_for_stage,
    lora_target_modules,
    parameter_group,
    set_trainable,
    trainable_report,
)
from .synthetic import SyntheticScene, render_room, spatial_questions, yaw_pose

__all__ = [
    "PARAMETER_GROUPS",
    "TRAINING_STAGES",
    "SyntheticScene",
    "TrainableReport",
    "freeze_for_stage",
    "lora_target_modules",
    "parameter_group",
    "render_room",
    "set_trainable",
    "spatial_questions",
    "trainable_report",
    "yaw_pose",
]
