"""The parts of G²VLM and which weights belong to each: the one table that expert freezing (`g2vlm_hf.training`),
the component shards of a converted checkpoint (`g2vlm_hf.conversion.sharding`) and the tests read.

Patterns are over the parameter (and state-dict) names of [`G2VLMForConditionalGeneration`]; the reconstruction and
depth-estimation classes use the same names for the parts they have. A pattern matches at the start of a name or
after a dot, so names behind a wrapper prefix (PEFT's `base_model.model.`, `_orig_mod.` of `torch.compile`) belong
to the same part. No two patterns claim one name.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class ModelPart(NamedTuple):
    """One row of the table: a part's name, the pattern of its weights' names and what it is."""

    name: str
    pattern: re.Pattern[str]
    description: str

    def claims(self, parameter_name: str) -> bool:
        """Whether the weight `parameter_name` belongs to this part."""
        return self.pattern.search(parameter_name) is not None


def _part(name: str, pattern: str, description: str) -> ModelPart:
    return ModelPart(name, re.compile(r"(?:^|\.)" + pattern), description)


# Inside a decoder layer, the geometry expert's weights are the `geo_`-prefixed modules and parameters.
_LAYER = r"layers\.\d+\."
_GEO = r"(?:[\w.]*\.)?geo_"

# In model order: encoders, the decoder's parts, the heads.
MODEL_PARTS: tuple[ModelPart, ...] = (
    _part(
        "semantic_encoder",
        r"model\.visual\.",
        "`model.visual.*`: the Qwen2-VL ViT and its 2x2 merger (semantic images)",
    ),
    _part(
        "geometry_encoder",
        r"model\.geometry_encoder\.",
        "`model.geometry_encoder.*`: DINOv2 with registers (geometry views)",
    ),
    _part(
        "geometry_projector",
        r"model\.geometry_projector\.",
        "`model.geometry_projector.*`: Linear from the DINOv2 width to the decoder width",
    ),
    _part(
        "embeddings",
        r"model\.language_model\.embed_tokens\.",
        "`model.language_model.embed_tokens.*`: the input token embeddings",
    ),
    _part(
        "semantic_expert",
        rf"model\.language_model\.(?:norm\.|{_LAYER}(?!{_GEO}))",
        "the decoder's weights for text and semantic image tokens: the Qwen2 leaves (`self_attn.q_proj`, "
        "`mlp.gate_proj`, ..., the layer norms) and the final `norm`",
    ),
    _part(
        "geometry_expert",
        rf"model\.language_model\.(?:geo_norm\.|{_LAYER}{_GEO})",
        "the decoder's weights for geometry tokens: the `geo_*` leaves, their LayerScales and the final `geo_norm`",
    ),
    _part(
        "geometry_heads",
        r"geometry_heads\.",
        "`geometry_heads.*`: the point, camera, global-point (and confidence) heads, float32",
    ),
    _part("lm_head", r"lm_head\.", "`lm_head.*`: the language-modelling head"),
)
PART_NAMES: tuple[str, ...] = tuple(part.name for part in MODEL_PARTS)


def part_of(parameter_name: str) -> str:
    """The name of the part (one of `PART_NAMES`) the weight `parameter_name` belongs to.

    Raises:
        ValueError: no part claims the name (it is not a weight of a G²VLM model class), or several do.
    """
    claims = [part.name for part in MODEL_PARTS if part.claims(parameter_name)]
    if not claims:
        raise ValueError(
            f"Weight {parameter_name!r} belongs to no part of G2VLM ({', '.join(PART_NAMES)}): pass a parameter name "
            "of a G2VLM model class (e.g. `model.named_parameters()` of G2VLMForConditionalGeneration)."
        )
    if len(claims) > 1:
        raise ValueError(
            f"Weight {parameter_name!r} is claimed by several parts {claims}: fix MODEL_PARTS in {__name__}."
        )
    return claims[0]


__all__ = ["MODEL_PARTS", "PART_NAMES", "ModelPart", "part_of"]
