"""What a mutation pass over text_decoder.py found unpinned: the norms' epsilon (every test model used the default
1e-6, which the norms also take when the config's value is not passed), attention dropout (every test model had none),
and the decoder's own cache and position handling when no multimodal model drives it. Each expert alone is checked
against transformers' Qwen3 decoder (Qwen2 attention with per-head QK-norm) given that expert's weights: with all three
M-RoPE sections on the same text positions, multimodal RoPE is plain RoPE, and the geometry expert's LayerScale vectors
fold into the rows of its output projections."""

from __future__ import annotations

import pytest
import torch
from test_attention_backends import flash_attention_stand_in
from transformers import Qwen3Config, Qwen3Model
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from g2vlm_hf.modeling.compat import cache_kwargs, output_cache
from g2vlm_hf.modeling.configuration_g2vlm import G2VLMTextConfig
from g2vlm_hf.modeling.text_decoder import G2VLMTextModel

HIDDEN, HEADS, KV_HEADS, LAYERS = 64, 4, 2, 2
SIZES = dict(
    hidden_size=HIDDEN,
    intermediate_size=96,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    rms_norm_eps=0.1,  # far from the norms' default 1e-6, so that a norm built without the config's value shows
    vocab_size=32,
    hidden_act="silu",
)
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
ATTENTION = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")
ATTENTION += ("o_proj.weight", "q_norm.weight", "k_norm.weight")


def decoder_and_qwen3(implementation: str, expert: str = "semantic", **overrides) -> tuple[G2VLMTextModel, Qwen3Model]:
    """A random two-expert decoder (every weight, bias and norm scale away from its initial value) and a Qwen3
    decoder holding the weights of its `expert`, the geometry LayerScale vectors folded into the output projections
    (`gamma * (W x) == (gamma[:, None] * W) x`); Qwen3's output projections have zero biases."""
    torch.manual_seed(0)
    config = G2VLMTextConfig(**SIZES, rope_parameters={**ROPE, "mrope_section": [2, 3, 3]}, **overrides)
    ours = G2VLMTextModel(config).eval()
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            if parameter.ndim > 1 or name.endswith("bias"):
                parameter.normal_(0, 0.3)
            else:  # norm scales and LayerScale vectors
                parameter.uniform_(0.5, 1.5)
    reference = Qwen3Model(
        Qwen3Config(**SIZES, head_dim=HIDDEN // HEADS, attention_bias=True, rope_parameters=ROPE, **overrides)
    ).eval()
    state, geo = ours.state_dict(), "geo_" if expert == "geometry" else ""
    weights = {"embed_tokens.weight": state["embed_tokens.weight"], "norm.weight": state[f"{geo}norm.weight"]}
    for i in range(LAYERS):
        ours_layer, layer = f"layers.{i}.{geo}", f"layers.{i}."
        for leaf in ATTENTION:
            weights[f"{layer}self_attn.{leaf}"] = state[f"layers.{i}.self_attn.{geo}{leaf}"]
        weights[f"{layer}self_attn.o_proj.bias"] = torch.zeros(HIDDEN)
        for leaf in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            weights[layer + leaf] = state[ours_layer + leaf]
        for leaf in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
            weights[f"{layer}mlp.{leaf}"] = state[f"{ours_layer}mlp.{geo}{leaf}"]
        if expert == "geometry":
            for leaf, scale in (
                ("self_attn.o_proj.weight", "attn_layer_scale"),
                ("mlp.down_proj.weight", "mlp_layer_scale"),
            ):
                weights[layer + leaf] = state[f"{ours_layer}{scale}.gamma"][:, None] * weights[layer + leaf]
    reference.load_state_dict(weights, strict=True)
    ours.set_attn_implementation(implementation)
    reference.set_attn_implementation(implementation)
    return ours, reference


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("expert", ["semantic", "geometry"])
def test_each_expert_alone_equals_transformers_qwen3_with_its_weights(implementation, expert):
    """A left-padded batch of one expert's tokens: every real token's final hidden state equals Qwen3's, with a
    non-default epsilon in every norm, biased q/k/v projections and two query heads per key head."""
    ours, reference = decoder_and_qwen3(implementation, expert)
    embeds = torch.randn(2, 7, HIDDEN)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        actual = ours(inputs_embeds=embeds, attention_mask=mask, geometry_mask=torch.full((2, 7), expert == "geometry"))
        expected = reference(inputs_embeds=embeds, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(actual.last_hidden_state[real], expected.last_hidden_state[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_cached_decoding_equals_qwen3_step_by_step(cache_kind):
    """A prompt, then one token at a time and once three tokens, without an attention mask (the positions continue
    from the cache): each step equals Qwen3 decoding under the same kind of cache."""
    ours, reference = decoder_and_qwen3("sdpa")

    def new_cache(model):
        if cache_kind == "dynamic":
            return DynamicCache(config=model.config)
        return StaticCache(config=model.config, max_cache_len=12)

    caches = new_cache(ours), new_cache(reference)
    embeds = torch.randn(1, 10, HIDDEN)
    for start, stop in ((0, 5), (5, 6), (6, 9), (9, 10)):
        with torch.no_grad():
            actual = ours(inputs_embeds=embeds[:, start:stop], use_cache=True, **cache_kwargs(caches[0]))
            expected = reference(inputs_embeds=embeds[:, start:stop], use_cache=True, **cache_kwargs(caches[1]))
        torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_a_cache_is_made_and_returned_only_when_asked_for():
    """Like Qwen3: `use_cache=True` without a cache returns a new one holding the prompt, `use_cache=False` none."""
    ours, reference = decoder_and_qwen3("sdpa")
    embeds = torch.randn(1, 5, HIDDEN)
    for model in (ours, reference):
        with torch.no_grad():
            assert output_cache(model(inputs_embeds=embeds, use_cache=False)) is None
            cache = output_cache(model(inputs_embeds=embeds, use_cache=True))
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 5


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_dropout_applies_in_training_only_as_in_qwen3(implementation):
    """With `attention_dropout=0.5`: in evaluation no dropout (equal to Qwen3, the same on every call); in training
    the same dropout as Qwen3 from the same random state, which changes the output."""
    ours, reference = decoder_and_qwen3(implementation, attention_dropout=0.5)
    embeds = torch.randn(2, 6, HIDDEN)
    with torch.no_grad():
        evaluated = ours(inputs_embeds=embeds).last_hidden_state
        torch.testing.assert_close(evaluated, reference(inputs_embeds=embeds).last_hidden_state, rtol=1e-5, atol=1e-5)
        ours.train(), reference.train()
        torch.manual_seed(1)
        trained = ours(inputs_embeds=embeds).last_hidden_state
        torch.manual_seed(1)
        expected = reference(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(trained, evaluated, atol=1e-3)


@pytest.mark.parametrize("attention_dropout", [0.0, 0.5])
def test_attention_dropout_reaches_sdpas_query_slices_of_an_image_block(attention_dropout):
    """A prompt with a bidirectional block of geometry tokens, which sdpa attends by slices of queries: in training
    its output differs from evaluation exactly when the config has attention dropout."""
    ours, _ = decoder_and_qwen3("sdpa", attention_dropout=attention_dropout)
    embeds = torch.randn(1, 9, HIDDEN)
    block_ids = torch.tensor([[-1, -1, 0, 0, 0, 0, -1, -1, -1]])
    inputs = dict(inputs_embeds=embeds, block_ids=block_ids, geometry_mask=block_ids == 0, use_cache=False)
    with torch.no_grad():
        evaluated = ours(**inputs).last_hidden_state
        ours.train()
        torch.manual_seed(1)
        trained = ours(**inputs).last_hidden_state
    assert torch.allclose(trained, evaluated, atol=1e-5) == (attention_dropout == 0.0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flex_attention", "flash_attention_2"])
def test_an_image_block_after_cached_text_equals_qwen3_under_the_same_mask(implementation, monkeypatch):
    """A text prompt is cached, then a chunk holding a bidirectional block follows: each token of the chunk equals
    Qwen3 run once on the whole sequence with the mask written out (causal, plus the block's tokens seeing each other),
    so the block's position in that mask counts the cached tokens on every backend (flash-attention's packed runs
    through the PyTorch stand-in of test_attention_backends, flash_attn being absent on CPUs)."""
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", flash_attention_stand_in())
    ours, reference = decoder_and_qwen3("eager")
    ours.config._attn_implementation_internal = implementation
    reference.set_attn_implementation("eager")
    embeds = torch.randn(1, 9, HIDDEN)
    block_ids = torch.tensor([[-1, -1, -1, -1, 0, 0, 0, -1, -1]])
    allowed = torch.ones(9, 9).tril().bool()
    allowed[4:7, 4:7] = True
    mask = torch.zeros(1, 1, 9, 9).masked_fill(~allowed, torch.finfo(torch.float32).min)
    cache = DynamicCache(config=ours.config)
    with torch.no_grad():
        ours(inputs_embeds=embeds[:, :3], use_cache=True, **cache_kwargs(cache))
        actual = ours(inputs_embeds=embeds[:, 3:], block_ids=block_ids[:, 3:], use_cache=True, **cache_kwargs(cache))
        expected = reference(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(actual.last_hidden_state, expected[:, 3:], rtol=1e-5, atol=1e-5)


def test_decoding_a_left_padded_batch_equals_qwen3_step_by_step():
    """A left-padded batch decoded one token at a time with its padding mask growing by one each step (as generate()
    passes it): the padded keys stay masked in every step, as in Qwen3 under the same cache."""
    ours, reference = decoder_and_qwen3("sdpa")
    caches = DynamicCache(config=ours.config), DynamicCache(config=reference.config)
    embeds = torch.randn(2, 8, HIDDEN)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # text positions of the real tokens, as generate() makes them
    for start, stop in ((0, 5), (5, 6), (6, 7), (7, 8)):
        step = dict(inputs_embeds=embeds[:, start:stop], attention_mask=mask[:, :stop], use_cache=True)
        with torch.no_grad():
            text_positions = positions[:, start:stop]
            actual = ours(**step, position_ids=text_positions.expand(3, -1, -1), **cache_kwargs(caches[0]))
            expected = reference(**step, position_ids=text_positions, **cache_kwargs(caches[1]))
        real = mask[:, start:stop].bool()
        torch.testing.assert_close(
            actual.last_hidden_state[real], expected.last_hidden_state[real], rtol=1e-5, atol=1e-5
        )
