"""Conversion of official G²VLM checkpoints into this package's transformers layout."""

from .convert_official import (
    OFFICIAL_KEY_RENAMES,
    config_from_official,
    convert_official_checkpoint,
    expected_state_dict_shapes,
    map_official_keys,
    rename_official_key,
)

__all__ = [
    "OFFICIAL_KEY_RENAMES",
    "config_from_official",
    "convert_official_checkpoint",
    "expected_state_dict_shapes",
    "map_official_keys",
    "rename_official_key",
]
