"""Conversion of official G²VLM checkpoints into this package's transformers layout, and their Hub export."""

from .convert_official import (
    OFFICIAL_KEY_RENAMES,
    config_from_official,
    convert_official_checkpoint,
    expected_state_dict_shapes,
    map_official_keys,
    rename_official_key,
)
from .hub import (
    HubAuthError,
    HubPushError,
    HubVerificationError,
    PushResult,
    push_to_hub,
    stage_for_hub,
    validate_hub_repo_id,
    verify_upload,
)
from .model_card import ModelCardInfo, build_model_card
from .reconstruction_only import build_reconstruction_only, reconstruction_config
from .remote_code import remote_code_files, write_remote_code
from .sharding import COMPONENTS, SHARD_OF_PART, component_of, save_component_shards

__all__ = [
    "COMPONENTS",
    "OFFICIAL_KEY_RENAMES",
    "SHARD_OF_PART",
    "HubAuthError",
    "HubPushError",
    "HubVerificationError",
    "ModelCardInfo",
    "PushResult",
    "build_model_card",
    "build_reconstruction_only",
    "component_of",
    "config_from_official",
    "convert_official_checkpoint",
    "expected_state_dict_shapes",
    "map_official_keys",
    "push_to_hub",
    "reconstruction_config",
    "remote_code_files",
    "rename_official_key",
    "save_component_shards",
    "stage_for_hub",
    "validate_hub_repo_id",
    "verify_upload",
    "write_remote_code",
]
