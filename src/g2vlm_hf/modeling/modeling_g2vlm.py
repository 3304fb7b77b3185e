"""G²VLM: a Qwen2-VL semantic encoder, a DINOv2 geometry encoder, a two-expert decoder and Pi3-style geometry heads."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.utils import can_return_tuple, logging, torch_compilable_check

from .compat import accepts_cache_alias, cache_kwargs, output_cache
from .configuration_g2vlm import G2VLMConfig, G2VLMReconstructionConfig
from .generation_defaults import default_cache_implementation, let_cache_length_vary
from .geometry_encoder import G2VLMGeometryEncoder
from .geometry_heads import G2VLMGeometryHeads
from .geometry_losses import G2VLMGeometryLossWeights, check_geometry_targets, geometry_losses
from .intrinsics import estimate_intrinsics
from .layers import ExpertSplit
from .outputs import G2VLMCausalLMOutputWithPast, G2VLMModelOutputWithPast, G2VLMReconstructionOutput
from .pretrained import FULL_PRECISION_MODULES, G2VLMPreTrainedModel
from .text_decoder import G2VLMTextModel
from .token_layout import check_placeholders_are_wrapped, get_block_ids, get_rope_index

logger = logging.get_logger(__name__)


class G2VLMVisionEncoder(Qwen2VisionTransformerPretrainedModel):
    """transformers' Qwen2-VL vision tower, also allowed to run with flex attention: without flash-attention it
    attends per image through the attention interface with no mask, which flex attention computes as well (tested
    against eager); transformers' class only lacks the flag."""

    _supports_flex_attn = True


class G2VLMModel(G2VLMPreTrainedModel):
    """The encoders and the two-expert decoder, without LM head or geometry heads."""

    _keep_in_fp32_modules = ["geometry_encoder", "geometry_projector"]  # see FULL_PRECISION_MODULES

    def __init__(self, config: G2VLMConfig, with_semantic_encoder: bool = True):
        """`with_semantic_encoder=False` leaves the semantic vision encoder out (depth estimation); the
        reconstruction-only config (G2VLMForReconstruction) has none either."""
        super().__init__(config)
        self.visual = None
        if config.vision_config is not None and with_semantic_encoder:
            self.visual = G2VLMVisionEncoder._from_config(config.vision_config)
        self.geometry_encoder = G2VLMGeometryEncoder._from_config(
            config.geometry_config, packed_windows=config.geometry_encoder_attention == "official_packed_windows"
        )
        self.geometry_projector = nn.Linear(config.geometry_config.hidden_size, config.text_config.hidden_size)
        self.language_model = G2VLMTextModel._from_config(config.text_config)
        self.post_init()

    @property
    def spatial_merge_size(self) -> int:
        return self.config.vision_config.spatial_merge_size if self.config.vision_config is not None else 1

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.embed_tokens = value

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """Semantic image features, as transformers' Qwen2-VL returns them.

        Args:
            pixel_values: `(total patches, channels * temporal_patch * patch * patch)` from the Qwen2-VL image processor.
            image_grid_thw: `(num_images, 3)` patch grid of each image.

        Returns:
            [`~transformers.modeling_outputs.BaseModelOutputWithPooling`]: `pooler_output` is a tuple with one
            `(merged patches, hidden_size)` tensor per image (after the 2x2 merger, in the decoder width);
            `last_hidden_state` holds the vision tower's states before the merger.
        """
        if self.visual is None:
            raise ValueError(
                "This model has no semantic image encoder (it is reconstruction-only): pass no pixel_values."
            )
        if image_grid_thw is None:
            raise ValueError("`pixel_values` need their `image_grid_thw` (the processor returns both).")
        torch_compilable_check(
            torch.isfinite(pixel_values).all(),
            "pixel_values holds NaN or infinite values; check the images and their preprocessing.",
        )
        outputs = self.visual(pixel_values.to(self.visual.dtype), grid_thw=image_grid_thw, **kwargs)
        split_sizes = (image_grid_thw.prod(-1) // self.spatial_merge_size**2).tolist()
        outputs.pooler_output = torch.split(outputs.pooler_output, split_sizes)
        return outputs

    def get_geometry_features(self, geometry_pixel_values: torch.Tensor) -> torch.Tensor:
        """Geometry features in the decoder width.

        Args:
            geometry_pixel_values: `(batch, views, 3, H, W)` ImageNet-normalised, H and W multiples of the patch.

        Returns:
            `(batch, views, H / patch * W / patch, hidden)`.
        """
        batch, views = geometry_pixel_values.shape[:2]
        patch_tokens = self.geometry_encoder(geometry_pixel_values.flatten(0, 1), views_per_scene=views)
        return self.geometry_projector(patch_tokens).view(batch, views, patch_tokens.shape[1], -1)

    def geometry_grid_thw(self, geometry_pixel_values: torch.Tensor) -> torch.LongTensor:
        """`(batch * views, 3)` token grids `(1, H / patch, W / patch)` of the geometry views, in prompt order."""
        batch, views, _, height, width = geometry_pixel_values.shape
        patch = self.config.geometry_patch_size
        grid = torch.tensor([1, height // patch, width // patch], device=geometry_pixel_values.device)
        return grid.expand(batch * views, 3)

    def compute_position_ids(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        image_grid_thw: torch.LongTensor | None,
        geometry_grid_thw: torch.LongTensor | None,
    ) -> torch.LongTensor:
        """3D positions of `input_ids`, continuing after the cache from the rope deltas the cache carries (see
        `cached_rope_deltas`); nothing is kept on the model, so requests with their own caches never mix."""
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        has_media = image_grid_thw is not None or geometry_grid_thw is not None
        previous_deltas = cached_rope_deltas(past_key_values) if past_length else None
        if past_length and not has_media:
            deltas = previous_deltas if previous_deltas is not None else torch.zeros(1, 1, dtype=torch.long)
            positions = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
            return (positions.view(1, 1, -1) + deltas.to(input_ids.device).view(1, -1, 1)).expand(
                3, input_ids.shape[0], -1
            )
        start_positions = None
        if past_length:
            deltas = (
                previous_deltas if previous_deltas is not None else torch.zeros(input_ids.shape[0], 1, dtype=torch.long)
            )
            start_positions = past_length + deltas.view(-1).to(input_ids.device).expand(input_ids.shape[0])
        chunk_mask = attention_mask[:, -input_ids.shape[1] :] if is_padding_mask(attention_mask) else None
        position_ids, _ = get_rope_index(
            input_ids,
            image_grid_thw,
            geometry_grid_thw,
            chunk_mask,
            image_token_id=self.config.image_token_id,
            geometry_token_id=self.config.geometry_token_id,
            spatial_merge_size=self.spatial_merge_size,
            start_positions=start_positions,
            past_length=past_length,
        )
        return position_ids

    def layout_ids_from_embeds(self, inputs_embeds: torch.Tensor) -> torch.LongTensor:
        """Stand-in `input_ids` for a prompt given only as embeddings: the image placeholders and vision markers,
        found by comparing with their embeddings (as transformers' Qwen2-VL finds its placeholders), -1 elsewhere."""
        embedding = self.get_input_embeddings()
        layout_ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        special = (
            self.config.image_token_id,
            self.config.geometry_token_id,
            self.config.vision_start_token_id,
            self.config.vision_end_token_id,
        )
        for token_id in special:
            if token_id < embedding.num_embeddings:
                row = embedding.weight[token_id].to(inputs_embeds.device, inputs_embeds.dtype)
                layout_ids = layout_ids.masked_fill((inputs_embeds == row).all(-1), token_id)
        return layout_ids

    def _check_placeholders_have_media(self, input_ids, past_key_values, pixel_values, geometry_pixel_values) -> None:
        """Before anything is cached, placeholders without their images are a forgotten input: say so (a runtime
        assertion under `torch.compile`). A decode step is not checked: it reads nothing back from the device and,
        compiled, stays one graph."""
        if input_ids.shape[1] == 1 and not cache_is_empty(past_key_values):
            return
        # a tensor for a static cache (which may have been reset for a new prompt): no branch on it
        cached = past_key_values is not None and past_key_values.get_seq_length() > 0
        if cached is True:  # a later turn on a dynamic cache: its placeholders are ordinary tokens
            return
        for name, token_id, media in (
            ("pixel_values", self.config.image_token_id, pixel_values),
            ("geometry_pixel_values", self.config.geometry_token_id, geometry_pixel_values),
        ):
            if media is None:
                torch_compilable_check(
                    ~(input_ids == token_id).any() | cached,
                    f"`input_ids` holds {name.split('_')[0]} placeholders but no `{name}` were given.",
                )

    @accepts_cache_alias
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        geometry_pixel_values: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> G2VLMModelOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids, with the processor's placeholder tokens where the images go. With `inputs_embeds` instead,
            the placeholders and vision markers are found by comparing embeddings (as in Qwen2-VL); pass both when a
            placeholder lies outside the embedding matrix (the converted tiny checkpoints' `<|geo_pad|>`).
        past_key_values (`Cache`, *optional*):
            The key/value cache of the shared attention (also accepted as `cache`, transformers 5.24's name).
        pixel_values (`torch.FloatTensor` of shape `(total_patches, channels * temporal_patch * patch * patch)`):
            Flattened Qwen2-VL patches of the semantic images (from the Qwen2-VL image processor).
        image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`):
            Patch grid of each semantic image.
        geometry_pixel_values (`torch.FloatTensor` of shape `(batch_size, num_views, 3, height, width)`):
            ImageNet-normalised geometry views; height and width multiples of the geometry patch size (14).
        """
        if input_ids is None and inputs_embeds is None:
            raise ValueError("Pass `input_ids` (from the processor) or `inputs_embeds`.")
        if input_ids is not None:
            check_input_ids(input_ids)
        if geometry_pixel_values is not None:
            geometry_pixel_values = as_geometry_pixel_values(geometry_pixel_values, self.config.geometry_patch_size)
        if input_ids is None:
            if (
                geometry_pixel_values is not None
                and self.config.geometry_token_id >= self.config.text_config.vocab_size
            ):
                raise ValueError(
                    "The geometry placeholder id lies outside the embedding matrix, so it cannot be found in "
                    "`inputs_embeds`: pass the prompt's `input_ids` together with `inputs_embeds`."
                )
            input_ids = self.layout_ids_from_embeds(inputs_embeds)
        # Placeholders stand for media only when the media come with this call: after prefill (with a cache) a
        # placeholder id is an ordinary token.
        image_token_id = self.config.image_token_id if pixel_values is not None else None
        geometry_token_id = self.config.geometry_token_id if geometry_pixel_values is not None else None
        image_mask = input_ids == image_token_id if image_token_id is not None else None
        geometry_mask = input_ids == geometry_token_id if geometry_token_id is not None else None
        self._check_placeholders_have_media(input_ids, past_key_values, pixel_values, geometry_pixel_values)
        chunk_mask = attention_mask[:, -input_ids.shape[1] :] if is_padding_mask(attention_mask) else None
        layout = dict(
            image_token_id=image_token_id,
            geometry_token_id=geometry_token_id,
            vision_start_token_id=self.config.vision_start_token_id,
            vision_end_token_id=self.config.vision_end_token_id,
        )
        if image_mask is not None or geometry_mask is not None:
            check_placeholders_are_wrapped(input_ids, chunk_mask, **layout)

        if inputs_embeds is None:
            placeholders = torch.zeros_like(input_ids, dtype=torch.bool)
            for mask in (image_mask, geometry_mask):
                placeholders = placeholders | mask if mask is not None else placeholders
            # Placeholders may lie outside the embedding matrix (`<|geo_pad|>` is added by the conversion).
            inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholders, 0))
        image_outputs, geometry_token_count = None, None
        if image_mask is not None:
            image_outputs = self.get_image_features(pixel_values, image_grid_thw, return_dict=True)
            features = torch.cat(image_outputs.pooler_output)
            inputs_embeds = scatter_features(inputs_embeds, image_mask, features, "semantic image")
        if geometry_mask is not None:
            features = self.get_geometry_features(geometry_pixel_values).flatten(0, 2)
            inputs_embeds = scatter_features(inputs_embeds, geometry_mask, features, "geometry")
            geometry_token_count = features.shape[0]

        if position_ids is None:
            geometry_grid_thw = (
                self.geometry_grid_thw(geometry_pixel_values) if geometry_pixel_values is not None else None
            )
            position_ids = self.compute_position_ids(
                input_ids, attention_mask, past_key_values, image_grid_thw if image_mask is not None else None,
                geometry_grid_thw,
            )  # fmt: skip
        block_ids = get_block_ids(input_ids, chunk_mask, **layout)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            geometry_mask=geometry_mask,
            attention_mask=attention_mask,
            block_ids=block_ids,
            use_cache=use_cache,
            geometry_token_count=geometry_token_count,
            return_dict=True,
            **cache_kwargs(past_key_values),
            **kwargs,
        )
        cache = output_cache(outputs)
        rope_deltas = cached_rope_deltas(cache)
        if rope_deltas is None or image_mask is not None or geometry_mask is not None:
            # a prompt, or a chunk with images: the deltas change; text after them keeps them (no work per step)
            rope_deltas = rope_deltas_of(
                position_ids, chunk_mask, cache.get_seq_length() if cache is not None else None
            )
            if cache is not None:
                setattr(cache, ROPE_DELTAS_ATTRIBUTE, rope_deltas)
        return G2VLMModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            rope_deltas=rope_deltas,
            image_outputs=image_outputs,
            **cache_kwargs(cache),
        )


ROPE_DELTAS_ATTRIBUTE = "g2vlm_rope_deltas"
"""The attribute of a key/value cache holding its request's rope deltas `(batch, 1)`: per request, not per model."""


def cache_is_empty(cache: Cache | None) -> bool:
    """Whether `cache` holds no token yet, known without reading the device. A static cache reports its length as a
    tensor on the cache's device only once its layers were written (before, as 0), so such a cache counts as holding
    tokens, also after a reset."""
    if cache is None:
        return True
    length = cache.get_seq_length()
    return not isinstance(length, torch.Tensor) and length == 0


def cached_rope_deltas(cache: Cache | None) -> torch.LongTensor | None:
    """The rope deltas a cache filled by G2VLM carries (None for no cache, or one G2VLM did not fill)."""
    return getattr(cache, ROPE_DELTAS_ATTRIBUTE, None) if cache is not None else None


def rope_deltas_of(
    position_ids: torch.LongTensor, chunk_mask: torch.Tensor | None, total_length: int | torch.Tensor | None
) -> torch.LongTensor:
    """`(batch, 1)` offsets such that the text token at absolute index i after this chunk gets position
    `i + deltas`: the next position (one past the largest position of the chunk's real tokens) minus the index of the
    next token (`total_length`, cache included; the chunk's length without a cache)."""
    positions = position_ids.amax(dim=0)  # (batch, seq): the largest of the three axes
    if chunk_mask is not None:
        positions = positions.masked_fill(~chunk_mask.to(positions.device).bool(), -1)
    if total_length is None:
        total_length = position_ids.shape[-1]
    return positions.amax(dim=-1, keepdim=True) + 1 - total_length


def is_padding_mask(attention_mask) -> bool:
    """Whether `attention_mask` is a 2D padding mask (generation may pass prepared 4D masks instead)."""
    return isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2


def check_input_ids(input_ids: object) -> None:
    """Raise a ValueError unless `input_ids` is a `(batch_size, sequence_length)` tensor."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        got = f"shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(
            f"input_ids must be a (batch_size, sequence_length) tensor, got {got}; call the processor with "
            "return_tensors='pt' (and add a batch dimension to a single sequence)."
        )


def as_geometry_pixel_values(geometry_pixel_values: torch.Tensor | list[torch.Tensor], patch_size: int) -> torch.Tensor:
    """Validate geometry views and return them as one `(batch, views, 3, H, W)` tensor.

    A list of `(3, H, W)` views is taken as one scene. Raises a ValueError naming the problem otherwise.
    """
    views = geometry_pixel_values if isinstance(geometry_pixel_values, (list, tuple)) else [geometry_pixel_values]
    not_tensors = sorted({type(view).__name__ for view in views if not isinstance(view, torch.Tensor)})
    if not_tensors:
        raise ValueError(
            f"geometry_pixel_values must be torch tensors, got {', '.join(not_tensors)}; call the processor with "
            "return_tensors='pt'."
        )
    not_floats = sorted({str(view.dtype) for view in views if not view.is_floating_point()})
    if not_floats:
        raise ValueError(
            f"geometry_pixel_values must be normalised floating-point views, got {', '.join(not_floats)}; pass the "
            "images through the G2VLM processor (geometry_images=...), which scales and normalises them."
        )
    if isinstance(geometry_pixel_values, (list, tuple)):
        sizes = sorted({tuple(view.shape) for view in geometry_pixel_values})
        if len(sizes) != 1:
            raise ValueError(
                f"All views of one scene must have the same size, got {sizes}; resize them to one size first."
            )
        geometry_pixel_values = torch.stack(list(geometry_pixel_values))[None]
    if geometry_pixel_values.ndim != 5 or geometry_pixel_values.shape[2] != 3:
        raise ValueError(
            "geometry_pixel_values must have shape (batch_size, num_views, 3, height, width), got "
            f"{tuple(geometry_pixel_values.shape)}; all views of one scene must have the same size."
        )
    height, width = geometry_pixel_values.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"Geometry images must have sides that are multiples of the patch size {patch_size}, got {height}x{width}; "
            "resize them (the G2VLM processor resizes to width 518 and a height multiple of 14)."
        )
    torch_compilable_check(
        torch.isfinite(geometry_pixel_values).all(),
        "geometry_pixel_values holds NaN or infinite values; check the views and their preprocessing.",
    )
    return geometry_pixel_values


def scatter_features(
    inputs_embeds: torch.Tensor, placeholder_mask: torch.BoolTensor, features: torch.Tensor, kind: str
) -> torch.Tensor:
    """Put `features` (one row per placeholder token, in order) in place of the placeholders."""
    torch_compilable_check(
        placeholder_mask.sum() == features.shape[0],
        lambda: (
            f"The prompt has {int(placeholder_mask.sum())} {kind} placeholder tokens but the {kind} inputs give "
            f"{features.shape[0]} features: build `input_ids` with the processor so that both agree."
        ),
    )
    features = features.to(inputs_embeds.device, inputs_embeds.dtype)
    return inputs_embeds.masked_scatter(placeholder_mask.unsqueeze(-1), features)


def geometry_token_grid(
    hidden_states: torch.Tensor, geometry_mask: torch.BoolTensor, geometry_pixel_values: torch.Tensor, patch: int
) -> torch.Tensor:
    """The hidden states of the geometry tokens as `(batch, views, H / patch, W / patch, hidden)`."""
    batch, views, _, height, width = geometry_pixel_values.shape
    grid_h, grid_w = height // patch, width // patch
    geometry = ExpertSplit.from_mask(geometry_mask, batch * views * grid_h * grid_w).geometry
    return hidden_states.flatten(0, 1).index_select(0, geometry).view(batch, views, grid_h, grid_w, -1)


def warn_if_padded_without_mask(
    config: G2VLMConfig, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None
) -> None:
    """transformers' `warn_if_padding_and_no_attention_mask` with the text config's pad token: without the mask of a
    padded batch every token attends to the padding, which changes the reconstruction without an error."""
    pad_token_id = config.text_config.pad_token_id
    if attention_mask is not None or pad_token_id is None or not torch.is_tensor(input_ids) or input_ids.ndim != 2:
        return
    if torch.compiler.is_compiling():  # a data-dependent branch; transformers skips its check under tracing too
        return
    if bool((input_ids[:, [0, -1]] == pad_token_id).any()):
        logger.warning_once(
            "The prompts start or end with the pad token but no `attention_mask` was given: pass the processor's "
            "`attention_mask` with a padded batch, or the padding is attended to and changes the reconstruction."
        )


def reconstruct_scenes(
    model: G2VLMModel,
    geometry_heads: G2VLMGeometryHeads,
    input_ids: torch.LongTensor,
    geometry_pixel_values: torch.Tensor | list[torch.Tensor] | None,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.LongTensor | None = None,
    **kwargs,
) -> G2VLMReconstructionOutput:
    """Run the encoders and the decoder over the prompt, then the geometry heads over the geometry tokens."""
    if geometry_pixel_values is None:
        raise ValueError("Reconstruction needs geometry_pixel_values: at least one view per scene.")
    warn_if_padded_without_mask(model.config, input_ids, attention_mask)
    patch = model.config.geometry_patch_size
    geometry_pixel_values = as_geometry_pixel_values(geometry_pixel_values, patch)
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        geometry_pixel_values=geometry_pixel_values,
        use_cache=False,
        **kwargs,
    )
    geometry_mask = input_ids == model.config.geometry_token_id
    tokens = geometry_token_grid(outputs.last_hidden_state, geometry_mask, geometry_pixel_values, patch)
    reconstruction = geometry_heads(tokens)
    reconstruction["intrinsics"] = estimate_intrinsics(reconstruction.local_points, reconstruction.confidence)
    return reconstruction


class G2VLMForConditionalGeneration(G2VLMPreTrainedModel, GenerationMixin):
    """G²VLM with a language-modelling head (spatial-reasoning chat) and geometry heads (3D reconstruction)."""

    _keep_in_fp32_modules = FULL_PRECISION_MODULES
    _keep_in_fp32_modules_strict = ["geometry_heads"]
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # transformers' Trainer would pass `num_items_in_batch` and then neither divide the loss by the gradient
    # accumulation steps nor leave it per process: right for the language loss, which it normalises, but the geometry
    # loss is a per-batch mean and came out that many times too large. Both are per-batch means instead (as Qwen3-VL).
    accepts_loss_kwargs = False
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: G2VLMConfig):
        super().__init__(config)
        self.model = G2VLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.geometry_heads = G2VLMGeometryHeads(config).float()  # float32 whatever the default dtype
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @accepts_cache_alias
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        geometry_pixel_values: torch.Tensor | None = None,
        geometry_targets: dict[str, torch.Tensor] | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> G2VLMCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids for the causal language-modelling loss; -100 is ignored, and so are the image and geometry
            placeholders (so `labels = input_ids.clone()` works). A batch with no supervised token gives a zero
            language loss. The processor's `assistant_labels` builds labels that train on the assistant replies only.
        geometry_targets (`dict[str, torch.Tensor]`, *optional*):
            Known geometry of the views, for the reconstruction losses: `world_points` `(batch, views, H, W, 3)`,
            `valid_mask` `(batch, views, H, W)` and `camera_poses` `(batch, views, 4, 4)` (camera-to-world), in any
            common world frame and scale. The loss terms are weighted by `config.geometry_loss_weights`.
        """
        if (
            self.training
            and geometry_targets is None
            and geometry_pixel_values is not None
            and any(parameter.requires_grad for parameter in self.geometry_heads.parameters())
        ):
            logger.warning_once(
                "The geometry heads only run with `geometry_targets`: without them they get no gradient in this "
                "step. Under DistributedDataParallel freeze them (`model.geometry_heads.requires_grad_(False)` or "
                "`g2vlm_hf.training.freeze_for_stage`) or set `find_unused_parameters=True`."
            )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **cache_kwargs(past_key_values),
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            geometry_pixel_values=geometry_pixel_values,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        lm_loss = self.language_modeling_loss(logits, labels, **kwargs) if labels is not None else None
        losses, reconstruction = None, None
        if geometry_targets is not None:
            if geometry_pixel_values is None:
                raise ValueError("geometry_targets need the geometry_pixel_values of the same views.")
            views = as_geometry_pixel_values(geometry_pixel_values, self.config.geometry_patch_size)
            check_geometry_targets(geometry_targets, *views.shape[:2], *views.shape[-2:])
            layout_ids = input_ids if input_ids is not None else self.model.layout_ids_from_embeds(inputs_embeds)
            geometry_mask = layout_ids == self.config.geometry_token_id
            tokens = geometry_token_grid(hidden_states, geometry_mask, views, self.config.geometry_patch_size)
            reconstruction = self.geometry_heads(tokens)
            losses = geometry_losses(
                reconstruction,
                geometry_targets["world_points"],
                geometry_targets["valid_mask"],
                geometry_targets["camera_poses"],
                G2VLMGeometryLossWeights(**self.config.geometry_loss_weights),
            )
        total = [term for term in (lm_loss, losses and losses["total"]) if term is not None]
        return G2VLMCausalLMOutputWithPast(
            loss=sum(total) if total else None,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            rope_deltas=outputs.rope_deltas,
            image_outputs=outputs.image_outputs,
            lm_loss=lm_loss,
            geometry_losses=losses,
            reconstruction=reconstruction,
            **cache_kwargs(output_cache(outputs)),
        )

    def language_modeling_loss(self, logits: torch.Tensor, labels: torch.LongTensor, **kwargs) -> torch.Tensor:
        """transformers' causal LM loss, with the image and geometry placeholders never taken as targets and a zero
        loss (still in the graph) for a batch that supervises no token, as happens in mixed reconstruction/chat
        batches."""
        placeholder_ids = torch.tensor(
            [self.config.image_token_id, self.config.geometry_token_id], device=labels.device
        )
        labels = labels.masked_fill(torch.isin(labels, placeholder_ids), -100)
        vocab_size = self.config.text_config.vocab_size
        out_of_range = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
        if bool(out_of_range.any()):
            raise ValueError(
                f"`labels` hold ids outside the vocabulary [0, {vocab_size}), e.g. {int(labels[out_of_range][0])}: "
                "use -100 for the positions to ignore."
            )
        if not bool((labels[..., 1:] != -100).any()):
            return logits.sum() * 0.0
        return self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)

    def reconstruct(
        self,
        input_ids: torch.LongTensor,
        geometry_pixel_values: torch.Tensor | list[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        **kwargs,
    ) -> G2VLMReconstructionOutput:
        """Reconstruct each scene of the batch from its geometry views.

        Args:
            input_ids: `(batch, seq)` prompt holding one geometry block per row (the processor builds it; the official
                prompt is `<|im_start|>Reconstruct the 3D scene.` followed by the views). A chat prompt works too: the
                result is the geometry its answer is grounded in.
            geometry_pixel_values: `(batch, views, 3, H, W)` ImageNet-normalised views, H and W multiples of 14
                (or a list of `(3, H, W)` views of one scene).

        Returns:
            [`G2VLMReconstructionOutput`] with camera poses, point maps and depth in float32.
        """
        return reconstruct_scenes(
            self.model, self.geometry_heads, input_ids, geometry_pixel_values, attention_mask, pixel_values,
            image_grid_thw, **kwargs,
        )  # fmt: skip

    def prepare_inputs_for_generation(
        self,
        input_ids,
        past_key_values=None,
        attention_mask=None,
        inputs_embeds=None,
        is_first_iteration=False,
        **kwargs,
    ):
        cache = kwargs.pop("cache", None) if past_key_values is None else past_key_values
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **cache_kwargs(cache),
            **kwargs,
        )
        # The media go with the first step of a `generate()` call (also one continuing from a cache, whose new
        # tokens may hold new images), with an assistant model's first call (for which `generate()` says
        # `is_first_iteration=False`) and with every step without a cache.
        prefill = is_first_iteration or cache_is_empty(cache)
        if not prefill:
            let_cache_length_vary(cache, model_inputs.get("attention_mask"))
        embeds = model_inputs.get("inputs_embeds")
        if embeds is not None and input_ids is not None and input_ids.shape[1] == embeds.shape[1]:
            model_inputs["input_ids"] = input_ids  # the layout of the images is read from the ids
        for key in ("pixel_values", "image_grid_thw", "geometry_pixel_values"):
            if not prefill:  # the images live in the cache; `generate()` only drops the inputs it knows
                model_inputs.pop(key, None)
            elif kwargs.get(key) is not None:  # `generate()` drops them for an assistant's prefill too
                model_inputs[key] = kwargs[key]
        if (
            prefill
            and model_inputs.get("attention_mask") is not None
            and not is_padding_mask(model_inputs["attention_mask"])
        ):
            # With a static cache `generate()` prepares plain causal 4D masks; the prompt needs its image blocks,
            # which the model builds from the 2D padding mask (or none) and the placeholders.
            model_inputs["attention_mask"] = attention_mask
            if attention_mask is None:
                del model_inputs["attention_mask"]
        return model_inputs

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    ):  # fmt: skip
        # Overridden: on CUDA a static cache (so that generate() compiles the decode step) unless the user chose.
        default = default_cache_implementation(self, generation_config, model_kwargs, generation_mode)
        if default is not None:
            generation_config.cache_implementation = default
        return super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # Overridden: the semantic images are flattened over the batch (patches and grids), so each sample's own
        # images are repeated (`generate()` would repeat every patch row). The geometry views are per sample already.
        images = {key: model_kwargs.pop(key, None) for key in ("pixel_values", "image_grid_thw")}
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if images["pixel_values"] is not None and expand_size > 1:
            if input_ids is None or input_ids.shape[1] == 0:  # a prompt given as embeddings only
                rows = self.model.layout_ids_from_embeds(model_kwargs["inputs_embeds"][::expand_size])
            else:
                rows = input_ids[::expand_size]
            is_image = rows == self.config.image_token_id
            starts = is_image & ~F.pad(is_image[:, :-1], (1, 0), value=False)  # one run of placeholders per image
            images_per_sample = starts.sum(-1).tolist()
            grids = images["image_grid_thw"]
            grids_per_sample = grids.split(images_per_sample)
            patches_per_sample = images["pixel_values"].split([int(g.prod(-1).sum()) for g in grids_per_sample])
            images = {
                "pixel_values": torch.cat([chunk for chunk in patches_per_sample for _ in range(expand_size)]),
                "image_grid_thw": torch.cat([chunk for chunk in grids_per_sample for _ in range(expand_size)]),
            }
        model_kwargs.update({key: value for key, value in images.items() if value is not None})
        return input_ids, model_kwargs

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # Overridden: the prompt needs 3D multimodal positions; generation then extends them by one per step.
        input_ids = model_kwargs.get("input_ids")
        if input_ids is None or input_ids.shape[1] == 0:
            if not inputs_tensor.is_floating_point():
                check_input_ids(inputs_tensor)
            is_ids = inputs_tensor.ndim == 2 and not inputs_tensor.is_floating_point()
            input_ids = inputs_tensor if is_ids else self.model.layout_ids_from_embeds(model_kwargs["inputs_embeds"])
        image_grid_thw = model_kwargs.get("image_grid_thw") if model_kwargs.get("pixel_values") is not None else None
        geometry_pixel_values = model_kwargs.get("geometry_pixel_values")
        geometry_grid_thw = None
        if geometry_pixel_values is not None:
            geometry_pixel_values = as_geometry_pixel_values(geometry_pixel_values, self.config.geometry_patch_size)
            geometry_grid_thw = self.model.geometry_grid_thw(geometry_pixel_values)
        cache = output_cache(model_kwargs)
        past_length = cache.get_seq_length() if cache is not None else 0
        if past_length:
            # Continuing from a cache (a later chat turn): the earlier turns and their images live in the cache, so
            # only the new tokens get positions, continuing the cached ones; the cached part is never fed again.
            new_positions = self.model.compute_position_ids(
                input_ids[:, past_length:],
                model_kwargs.get("attention_mask"),
                cache,
                image_grid_thw,
                geometry_grid_thw,
            )
            return F.pad(new_positions, (past_length, 0))
        position_ids, _ = get_rope_index(
            input_ids,
            image_grid_thw,
            geometry_grid_thw,
            model_kwargs.get("attention_mask"),
            image_token_id=self.config.image_token_id,
            geometry_token_id=self.config.geometry_token_id,
            spatial_merge_size=self.model.spatial_merge_size,
        )
        return position_ids


class G2VLMForReconstruction(G2VLMPreTrainedModel):
    """G²VLM for 3D reconstruction only: the geometry encoder, the two-expert decoder and the geometry heads, without
    the semantic vision encoder and the LM head. Loads with `AutoModel` from a reconstruction-only export."""

    config: G2VLMReconstructionConfig
    _keep_in_fp32_modules = FULL_PRECISION_MODULES
    _keep_in_fp32_modules_strict = ["geometry_heads"]

    def __init__(self, config: G2VLMReconstructionConfig):
        super().__init__(config)
        self.model = G2VLMModel(config)
        self.geometry_heads = G2VLMGeometryHeads(config).float()  # float32 whatever the default dtype
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor,
        geometry_pixel_values: torch.Tensor | list[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> G2VLMReconstructionOutput:
        """Same as [`G2VLMForConditionalGeneration.reconstruct`]."""
        return reconstruct_scenes(
            self.model, self.geometry_heads, input_ids, geometry_pixel_values, attention_mask, **kwargs
        )

    reconstruct = forward


__all__ = ["G2VLMForConditionalGeneration", "G2VLMForReconstruction", "G2VLMModel"]
