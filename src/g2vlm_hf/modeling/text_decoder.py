"""The two-expert decoder: every token goes through its own expert's projections, norms and MLP, and ALL tokens
meet in ONE softmax attention (grouped-query, multimodal RoPE).

Leaf names: the semantic expert keeps the Qwen2 names (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `q_norm`, `k_norm`,
`input_layernorm`, `post_attention_layernorm`, `mlp.{gate,up,down}_proj`, final `norm`); the geometry expert uses
`geo_`-prefixed leaves (`geo_q_proj`, ..., `geo_mlp.geo_gate_proj`, `geo_norm`) plus the LayerScale vectors
`geo_attn_layer_scale` and `geo_mlp_layer_scale`.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VLRMSNorm,
    Qwen2VLRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import logging
from transformers.utils.generic import is_flash_attention_requested, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .block_attention import PrefixLayout, attend_query_chunks, prefix_layout
from .compat import accepts_cache_alias, cache_kwargs
from .configuration_g2vlm import G2VLMTextConfig
from .flex import FLEX_GRAPH_LIMIT, FlexBlocks, FlexGraphLimitReached, attend_flex_blocks
from .layers import G2VLMMLP, ExpertSplit, G2VLMGeometryMLP, G2VLMLayerScale, route_tokens
from .pretrained import G2VLMPreTrainedModel
from .token_layout import TEXT_BLOCK_ID
from .torch_varlen import TORCH_VARLEN, can_use_varlen_kernel
from .varlen_attention import PackedRuns, attend_packed_runs, pack_runs

logger = logging.get_logger(__name__)

BlockLayout = PackedRuns | PrefixLayout | FlexBlocks
"""How a chunk with image blocks is attended without a dense mask: packed varlen runs, sdpa by query slices, or flex
attention with a BlockMask made from the prefix layout."""


class G2VLMAttention(nn.Module):
    """Shared attention of the two experts: per-expert q/k/v projections and QK-norm, one attention call through
    the configured backend (`ALL_ATTENTION_FUNCTIONS`, eager as the readable reference), per-expert output
    projection."""

    def __init__(self, config: G2VLMTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        hidden, eps = config.hidden_size, config.rms_norm_eps
        # semantic expert (Qwen2 names)
        self.q_proj = nn.Linear(hidden, q_size, bias=True)
        self.k_proj = nn.Linear(hidden, kv_size, bias=True)
        self.v_proj = nn.Linear(hidden, kv_size, bias=True)
        self.o_proj = nn.Linear(q_size, hidden, bias=False)
        self.q_norm = Qwen2VLRMSNorm(self.head_dim, eps=eps)
        self.k_norm = Qwen2VLRMSNorm(self.head_dim, eps=eps)
        # geometry expert
        self.geo_q_proj = nn.Linear(hidden, q_size, bias=True)
        self.geo_k_proj = nn.Linear(hidden, kv_size, bias=True)
        self.geo_v_proj = nn.Linear(hidden, kv_size, bias=True)
        self.geo_o_proj = nn.Linear(q_size, hidden, bias=False)
        self.geo_q_norm = Qwen2VLRMSNorm(self.head_dim, eps=eps)
        self.geo_k_norm = Qwen2VLRMSNorm(self.head_dim, eps=eps)

    def _expert_qkv(
        self,
        hidden_states: torch.Tensor,
        q_proj: nn.Linear,
        k_proj: nn.Linear,
        v_proj: nn.Linear,
        q_norm: nn.Module,
        k_norm: nn.Module,
    ) -> torch.Tensor:
        """One expert's normed queries, normed keys and values, heads side by side: `(..., q + 2 kv heads,
        head_dim)`."""
        query = q_norm(q_proj(hidden_states).unflatten(-1, (-1, self.head_dim)))
        key = k_norm(k_proj(hidden_states).unflatten(-1, (-1, self.head_dim)))
        value = v_proj(hidden_states).unflatten(-1, (-1, self.head_dim))
        return torch.cat((query, key, value), dim=-2)

    def _semantic_qkv(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._expert_qkv(hidden_states, self.q_proj, self.k_proj, self.v_proj, self.q_norm, self.k_norm)

    def _geometry_qkv(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._expert_qkv(
            hidden_states, self.geo_q_proj, self.geo_k_proj, self.geo_v_proj, self.geo_q_norm, self.geo_k_norm
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        split: ExpertSplit | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        block_layout: BlockLayout | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attention_mask` is the configured backend's mask (dense for eager, a BlockMask, sdpa's mask of a text
        chunk, or the padding mask of flash-attention); `block_layout`, given for a chunk with image blocks on the
        varlen and sdpa paths, replaces it: packed runs go to one varlen call per kind of run, a prefix layout to sdpa
        by slices of queries (block_attention.py)."""
        batch, seq = hidden_states.shape[:2]
        # per expert, in one routing: projections and QK-norm
        qkv = route_tokens(hidden_states, split, self._semantic_qkv, self._geometry_qkv).transpose(1, 2)
        kv_heads = qkv.shape[1] // (self.num_key_value_groups + 2)  # the local count under tensor parallelism
        query, key, value = qkv.split([self.num_key_value_groups * kv_heads, kv_heads, kv_heads], dim=1)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        dropout = 0.0 if not self.training else self.attention_dropout
        attn_weights = None
        if isinstance(block_layout, PackedRuns):
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(block_layout.implementation, None)
            attn_output = attend_packed_runs(
                self, attention_interface, query, key, value, block_layout, dropout=dropout, scaling=self.scaling,
                **kwargs,
            )  # fmt: skip
        elif isinstance(block_layout, FlexBlocks):
            try:
                attn_output = attend_flex_blocks(query, key, value, block_layout, self.scaling)
            except FlexGraphLimitReached:
                logger.warning_once(f"flex attention reached its bound of {FLEX_GRAPH_LIMIT} compiled graphs: prompts "
                                    "with images of new lengths now use sdpa by query slices.")  # fmt: skip
                attn_output = attend_query_chunks(
                    query, key, value, block_layout.layout, scaling=self.scaling, dropout=dropout
                )
        elif isinstance(block_layout, PrefixLayout):
            attn_output = attend_query_chunks(query, key, value, block_layout, scaling=self.scaling, dropout=dropout)
        else:
            attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            attn_output, attn_weights = attention_interface(
                self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
            )
        attn_output = attn_output.reshape(batch, seq, -1).contiguous()
        attn_output = route_tokens(attn_output, split, self.o_proj, self.geo_o_proj)
        return attn_output, attn_weights


class G2VLMDecoderLayer(GradientCheckpointingLayer):
    """Route to the experts, one shared attention, route back; LayerScale on the geometry branches."""

    def __init__(self, config: G2VLMTextConfig, layer_idx: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = G2VLMAttention(config, layer_idx)
        self.input_layernorm = Qwen2VLRMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = Qwen2VLRMSNorm(hidden, eps=eps)
        self.mlp = G2VLMMLP(hidden, config.intermediate_size, config.hidden_act)
        self.geo_input_layernorm = Qwen2VLRMSNorm(hidden, eps=eps)
        self.geo_post_attention_layernorm = Qwen2VLRMSNorm(hidden, eps=eps)
        self.geo_mlp = G2VLMGeometryMLP(hidden, config.intermediate_size, config.hidden_act)
        self.geo_attn_layer_scale = G2VLMLayerScale(hidden, config.geometry_layer_scale_init)
        self.geo_mlp_layer_scale = G2VLMLayerScale(hidden, config.geometry_layer_scale_init)

    def forward(
        self,
        hidden_states: torch.Tensor,
        split: ExpertSplit | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        block_layout: BlockLayout | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = route_tokens(hidden_states, split, self.input_layernorm, self.geo_input_layernorm)
        hidden_states, _ = self.self_attn(
            hidden_states, split, position_embeddings, attention_mask, past_key_values, block_layout, **kwargs
        )
        hidden_states = residual + self._scale_geometry(hidden_states, split, self.geo_attn_layer_scale)

        residual = hidden_states
        hidden_states = route_tokens(
            hidden_states,
            split,
            lambda states: self.mlp(self.post_attention_layernorm(states)),
            lambda states: self.geo_mlp(self.geo_post_attention_layernorm(states)),
        )
        return residual + self._scale_geometry(hidden_states, split, self.geo_mlp_layer_scale)

    @staticmethod
    def _scale_geometry(
        hidden_states: torch.Tensor, split: ExpertSplit | None, layer_scale: G2VLMLayerScale
    ) -> torch.Tensor:
        if split is None:
            return hidden_states
        return torch.where(split.mask.unsqueeze(-1), layer_scale(hidden_states), hidden_states)


class G2VLMTextModel(G2VLMPreTrainedModel):
    """The two-expert decoder without LM head. Returns the final hidden states, each token normed by its expert's
    final norm."""

    config: G2VLMTextConfig
    input_modalities = ("text",)
    _no_split_modules = ["G2VLMDecoderLayer"]
    _can_record_outputs = {"hidden_states": G2VLMDecoderLayer, "attentions": G2VLMAttention}

    def __init__(self, config: G2VLMTextConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(G2VLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2VLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.geo_norm = Qwen2VLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2VLRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @accepts_cache_alias
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.LongTensor | None = None,
        geometry_mask: torch.BoolTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        block_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        geometry_token_count: int | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """
        Args:
            inputs_embeds: `(batch, seq, hidden)`, with the image features already in place.
            position_ids: `(3, batch, seq)` multimodal RoPE positions (None: text positions after the cache).
            geometry_mask: `(batch, seq)`, True on geometry tokens (None: no geometry token).
            attention_mask: `(batch, past + seq)` padding mask, 1 on real tokens (or the masks `generate()` prepares
                for a static cache).
            block_ids: `(batch, seq)` bidirectional block of each token, -1 for causal text (None: all causal).
            geometry_token_count: the number of geometry tokens when known from the inputs' shapes (the multimodal
                model passes it), so that routing the tokens needs no host read.
            use_cache: defaults to the config's value (off while checkpointing activations in training).

        `output_hidden_states` and `output_attentions` (defaults: the config's) are recorded by transformers' output
        capture (`_can_record_outputs`): the embeddings then each layer's output, the last one final-normed.
        """
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        split = ExpertSplit.from_mask(geometry_mask, geometry_token_count)  # routed once, reused by every sublayer
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            positions = torch.arange(past_length, past_length + inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = positions.expand(3, inputs_embeds.shape[0], -1)
        # one description of who attends to whom, for every layer: with image blocks, the packed runs of the varlen
        # calls (flash-attention, torch's varlen kernel) or the prefix layout of sdpa's query slices, so that no
        # backend but eager builds a tokens x tokens mask; otherwise the backend's mask, built by transformers.
        block_layout = None
        padding_only = attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2)
        if isinstance(attention_mask, dict):  # prepared by generate() for a compileable cache (text decoding)
            mask_description = attention_mask["full_attention"]
        elif block_ids is not None and padding_only and self._uses_block_layout():
            mask_description = None
            flex = self.config._attn_implementation == "flex_attention"
            varlen = None if flex else self._varlen_implementation(inputs_embeds)
            if flex:
                block_layout = FlexBlocks(prefix_layout(past_length, attention_mask, block_ids))
            elif varlen is not None:
                block_layout = pack_runs(inputs_embeds.shape[1], past_length, attention_mask, block_ids, varlen)
            else:
                block_layout = prefix_layout(past_length, attention_mask, block_ids)
        elif attention_mask is None and inputs_embeds.shape[1] == 1 and self._attends_all_cached_keys(past_key_values):
            mask_description = None  # one query, no padding, every cached key real: nothing to mask (no work per step)
        else:
            if block_ids is not None and past_length:
                block_ids = F.pad(block_ids, (past_length, 0), value=TEXT_BLOCK_ID)
            mask_description = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                block_sequence_ids=block_ids,
                **cache_kwargs(past_key_values),
            )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                split,
                position_embeddings,
                attention_mask=mask_description,
                past_key_values=past_key_values,
                block_layout=block_layout,
                **kwargs,
            )
        hidden_states = route_tokens(hidden_states, split, self.norm, self.geo_norm)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **cache_kwargs(past_key_values))

    def _attends_all_cached_keys(self, cache: Cache | None) -> bool:
        """Whether a single query without padding may attend every key of `cache` with no mask: a dynamic cache
        (a static one holds unused slots) under sdpa or the varlen backends."""
        implementation = self.config._attn_implementation
        unmasked = implementation in ("sdpa", TORCH_VARLEN) or is_flash_attention_requested(self.config)
        return unmasked and not getattr(cache, "is_compileable", False)

    def _uses_block_layout(self) -> bool:
        """Whether chunks with image blocks avoid the dense mask: every backend but eager."""
        implementation = self.config._attn_implementation
        return implementation in ("sdpa", TORCH_VARLEN, "flex_attention") or is_flash_attention_requested(self.config)

    def _varlen_implementation(self, states: torch.Tensor) -> str | None:
        """The attention function for the packed runs of a chunk like `states`, or None for sdpa by query slices:
        flash-attention when configured; torch's varlen kernel for "torch_varlen" and for the default (sdpa) on CUDA
        in half precision."""
        implementation = self.config._attn_implementation
        if is_flash_attention_requested(self.config):
            return implementation
        if can_use_varlen_kernel(states):
            return TORCH_VARLEN
        if implementation == TORCH_VARLEN:
            logger.warning_once(
                f"attn_implementation='torch_varlen' needs CUDA and bfloat16/float16 (got {states.device.type}, "
                f"{states.dtype}): prompts with images use sdpa by query slices instead."
            )
        return None


__all__ = ["G2VLMTextModel"]
