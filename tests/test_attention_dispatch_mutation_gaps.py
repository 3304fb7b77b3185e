"""What a mutation-testing pass of the attention dispatch (`torch_varlen`, `varlen_attention`, `flex`) found unpinned:
behaviour that a changed line of those modules kept passing every earlier test. The dispatch to CUDA kernels is
checked here without a GPU: fake CUDA tensors (`FakeTensorMode`, which knows devices and dtypes but holds no data) for
the choice of kernel, CPU stand-ins with torch's signatures for the kernels, and plain attention math as the
reference."""

from __future__ import annotations

import sys

import pytest
import torch
import transformers.utils
from conftest import Call, geometry_block, recording, spy_calls, tiny_model
from test_attention_backends import dense_reference, reference_varlen_attention
from test_model import GRID_H, GRID_W, VIEWS, views
from test_no_dense_mask import fake_torch_varlen
from torch._dynamo.exc import FailOnRecompileLimitHit
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from g2vlm_hf.modeling import flex, text_decoder, torch_varlen
from g2vlm_hf.modeling.block_attention import prefix_layout
from g2vlm_hf.modeling.flex import FlexBlocks, attend_flex_blocks, prefix_block_mask
from g2vlm_hf.modeling.token_layout import TEXT_BLOCK_ID
from g2vlm_hf.modeling.torch_varlen import (
    TORCH_VARLEN,
    VarlenKernel,
    flash_package_available,
    local_attention_implementation,
    torch_varlen_attention_forward,
)
from g2vlm_hf.modeling.varlen_attention import attend_packed_runs, pack_runs


def plain_attention(query, key, value, scale: float, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale) v over `(batch, heads, tokens, dim)`, causal aligned top-left (equal lengths here);
    returned as `(batch, tokens, heads, dim)` like transformers' attention functions."""
    scores = query @ key.transpose(-1, -2) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2)


def fake_states(device: str, dtype: torch.dtype) -> torch.Tensor:
    """Hidden states on `device` (CUDA included, without a GPU) in `dtype`: only their device and dtype are real."""
    with FakeTensorMode():
        return torch.empty(1, 6, 128, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------- torch_varlen.py


@pytest.mark.skipif(torch_varlen.TORCH_VARLEN_KERNEL is None, reason="torch < 2.10 has no varlen kernel")
def test_the_default_attention_takes_torch_varlen_for_cuda_half_precision_only(monkeypatch):
    """The decoder's choice for a prompt with image blocks under the default (sdpa): torch's varlen kernel for CUDA
    bfloat16/float16 states, sdpa by query slices (None) for float32, for the CPU, and without the kernel."""
    text = tiny_model().model.language_model
    assert text.config._attn_implementation == "sdpa"
    for dtype in (torch.bfloat16, torch.float16):
        assert text._varlen_implementation(fake_states("cuda", dtype)) == TORCH_VARLEN
    assert text._varlen_implementation(fake_states("cuda", torch.float32)) is None
    assert text._varlen_implementation(fake_states("cpu", torch.bfloat16)) is None
    monkeypatch.setattr(torch_varlen, "TORCH_VARLEN_KERNEL", None)
    assert text._varlen_implementation(fake_states("cuda", torch.bfloat16)) is None


def test_a_torch_without_the_varlen_module_has_no_kernel(monkeypatch):
    """torch < 2.10 (no `torch.nn.attention.varlen`): no kernel, and importing the package does not fail."""
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)  # makes its import raise ImportError
    assert torch_varlen._installed_kernel() is None


def test_calls_without_packed_runs_are_sdpa_with_their_scaling_causality_and_dropout():
    """A decode step or an encoder call (no `cu_seq_lens_q`) is transformers' sdpa with everything it was given."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 5, 8, generator=generator) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = True
    for causal in (True, False):
        actual, _ = torch_varlen_attention_forward(module, query, key, value, None, scaling=0.3, is_causal=causal)
        torch.testing.assert_close(actual, plain_attention(query, key, value, 0.3, causal))
    torch.manual_seed(1)
    dropped, _ = torch_varlen_attention_forward(module, query, key, value, None, dropout=0.5, is_causal=False)
    torch.manual_seed(1)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=0.5).transpose(1, 2)
    torch.testing.assert_close(dropped, expected)
    assert not torch.allclose(dropped, plain_attention(query, key, value, 8**-0.5))  # the dropout did drop


def padded_chunk(past_length: int = 5):
    """A chunk of 12 queries after `past_length` cached tokens, two rows (4 query heads over 2 key/value heads): text,
    two image blocks in row 0, one in row 1, which is left-padded by 3 tokens."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, q_len, dim = 2, 4, 2, 12, 16
    kv_len = past_length + q_len
    query = torch.randn(batch, heads, q_len, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, kv_len, dim, generator=generator) for _ in range(2))
    blocks = torch.full((batch, q_len), TEXT_BLOCK_ID)
    blocks[0, 2:6], blocks[0, 6:9], blocks[1, 4:11] = 0, 1, 0
    attention_mask = torch.ones(batch, kv_len, dtype=torch.long)
    attention_mask[1, :3] = 0
    return query, key, value, attention_mask, blocks


def test_packed_runs_through_the_registered_torch_varlen_function_equal_the_dense_mask(monkeypatch):
    """The packed runs of a padded chunk attended by transformers' registry entry "torch_varlen" (torch's kernel
    replaced by a CPU stand-in of the installed signature), at a scaling that is not the default: eager's output."""
    kernel_calls: list[Call] = []
    monkeypatch.setattr(
        torch_varlen, "TORCH_VARLEN_KERNEL", VarlenKernel.of(recording(fake_torch_varlen, kernel_calls))
    )
    past_length, scaling = 5, 0.3
    query, key, value, attention_mask, blocks = padded_chunk(past_length)
    expected = dense_reference(query, key, value, attention_mask, blocks, past_length, scaling)
    runs = pack_runs(query.shape[2], past_length, attention_mask, blocks, TORCH_VARLEN)
    interface = ALL_ATTENTION_FUNCTIONS[runs.implementation]  # as the decoder looks it up
    actual = attend_packed_runs(None, interface, query, key, value, runs, scaling=scaling)
    valid = attention_mask[:, past_length:].bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert len(kernel_calls) == 2  # one call per kind of run, on torch's kernel


def test_a_packed_call_follows_the_modules_causality_unless_told(monkeypatch):
    """transformers' contract: `is_causal=None` means the module's `is_causal` (causal when it has none, as sdpa
    reads it); packed segments `(1, heads, tokens, dim)` in, `(1, tokens, heads, dim)` out, as the reference varlen
    kernel computes them."""
    monkeypatch.setattr(torch_varlen, "TORCH_VARLEN_KERNEL", VarlenKernel.of(fake_torch_varlen))
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 7, 8, generator=generator) for _ in range(3))
    cu_q = cu_k = torch.tensor([0, 3, 7], dtype=torch.int32)
    module = torch.nn.Module()
    packed = dict(cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=4, max_length_k=4)
    flat = [states[0].transpose(0, 1) for states in (query, key, value)]
    for causal in (True, False):
        module.is_causal = causal
        actual, _ = torch_varlen_attention_forward(module, query, key, value, None, **packed)
        expected = reference_varlen_attention(*flat, cu_q, cu_k, 4, 4, causal=causal)
        torch.testing.assert_close(actual, expected[None])
        told, _ = torch_varlen_attention_forward(module, query, key, value, None, is_causal=not causal, **packed)
        torch.testing.assert_close(told, reference_varlen_attention(*flat, cu_q, cu_k, 4, 4, causal=not causal)[None])
    unmarked, _ = torch_varlen_attention_forward(torch.nn.Module(), query, key, value, None, **packed)
    causal = reference_varlen_attention(*flat, cu_q, cu_k, 4, 4, causal=True)
    torch.testing.assert_close(unmarked, causal[None])  # a module without `is_causal` is causal, as for sdpa


def test_a_packed_call_with_dropout_is_refused(monkeypatch):
    """torch's varlen kernel has no dropout: training with attention dropout on it must say so, not drop nothing."""
    monkeypatch.setattr(torch_varlen, "TORCH_VARLEN_KERNEL", VarlenKernel.of(fake_torch_varlen))
    states = torch.randn(1, 2, 4, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="no dropout"):
        torch_varlen_attention_forward(
            None, states, states, states, None, dropout=0.1, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4,
            max_length_k=4, is_causal=True,
        )  # fmt: skip


def test_each_flash_implementation_looks_for_its_own_package_and_keeps_it_when_installed(monkeypatch):
    """flash_attention_3 is the flash-attn 3 package, flash_attention_2 flash-attn 2; an installed one is used as
    requested (torch's kernel replaces only a missing one)."""
    for fa2, fa3 in ((False, True), (True, False)):
        monkeypatch.setattr(torch_varlen, "is_flash_attn_2_available", lambda fa2=fa2: fa2)
        monkeypatch.setattr(transformers.utils, "is_flash_attn_3_available", lambda fa3=fa3: fa3)
        assert flash_package_available("flash_attention_2") is fa2
        assert flash_package_available("flash_attention_3") is fa3
    monkeypatch.setattr(torch_varlen, "flash_package_available", lambda implementation: True)
    for requested in ("flash_attention_2", "flash_attention_3"):
        assert local_attention_implementation(requested) == requested


# --------------------------------------------------------------------------------------------- varlen_attention.py


def test_the_packed_runs_of_cuda_inputs_are_on_cuda():
    """The indices and cumulative lengths a varlen kernel reads lie on the inputs' device, with or without a padding
    mask (fake CUDA tensors: the operator's registered fake, which is also what `torch.compile` traces)."""
    with FakeTensorMode(shape_env=ShapeEnv()):
        blocks = torch.full((2, 6), TEXT_BLOCK_ID, device="cuda")
        masks = (None, torch.ones(2, 6, dtype=torch.long, device="cuda"))
        packed = [pack_runs(6, 0, mask, blocks, TORCH_VARLEN) for mask in masks]
    for runs in packed:
        for group in runs.groups:
            for indices in (group.query_index, group.key_index, group.cu_seqlens_q, group.cu_seqlens_k):
                assert indices.device.type == "cuda"
            assert group.query_index.dtype == group.key_index.dtype == torch.long  # indices into the tokens
            assert group.cu_seqlens_q.dtype == group.cu_seqlens_k.dtype == torch.int32  # what flash kernels take


def test_the_kernel_gets_maximum_lengths_that_bound_every_segment(monkeypatch):
    """A varlen kernel sizes its work by `max_q`/`max_k` (on the GPU a segment longer than them is cut short), so
    each call gets integers at least as long as its longest query and key segments."""
    kernel_calls: list[Call] = []
    kernel = VarlenKernel.of(recording(fake_torch_varlen, kernel_calls))
    monkeypatch.setattr(torch_varlen, "TORCH_VARLEN_KERNEL", kernel)
    query, key, value, attention_mask, blocks = padded_chunk(past_length=5)
    runs = pack_runs(query.shape[2], 5, attention_mask, blocks, TORCH_VARLEN)
    attend_packed_runs(None, ALL_ATTENTION_FUNCTIONS[runs.implementation], query, key, value, runs, scaling=0.25)
    assert len(kernel_calls) == 2
    for call in kernel_calls:
        cu_q, cu_k, max_q, max_k = call.args[3:7]
        assert isinstance(max_q, int) and isinstance(max_k, int)
        assert max_q >= int(cu_q.diff().max()) and max_k >= int(cu_k.diff().max())


# --------------------------------------------------------------------------------------------------------- flex.py


@pytest.fixture
def flex_on_dynamo(monkeypatch):
    """The package's flex call compiled as it is (`dynamic=False`, its own graphs) by dynamo with the eager backend:
    the same graphs, guards and recompile limit, without inductor's code generation (seconds instead of a minute)."""
    torch._dynamo.reset()
    monkeypatch.setattr(flex, "FLEX_COMPILE", torch.compile(flex._flex_call, backend="eager", dynamic=False))


@pytest.mark.parametrize(("heads", "kv_heads", "batch"), [(4, 2, 2), (6, 3, 1)])
def test_flex_blocks_honour_the_scaling_and_any_grouping_of_the_key_heads(heads, kv_heads, batch, flex_on_dynamo):
    """Against eager with the dense mask, at a scaling that is not the default: 4 query heads over 2 (grouped by
    flex), 6 over 3 (not a power of two: the key heads are repeated, by the group size, whatever the batch)."""
    query, key, value, attention_mask, blocks = padded_chunk(past_length=0)
    query = query[:batch].repeat_interleave(heads // 4 + 1, dim=1)[:, :heads]
    key, value = (states[:batch].repeat_interleave(2, dim=1)[:, :kv_heads] for states in (key, value))
    attention_mask, blocks = attention_mask[:batch], blocks[:batch]
    expected = dense_reference(query, key, value, attention_mask, blocks, 0, 0.3)
    layout = prefix_layout(0, attention_mask, blocks)
    actual = attend_flex_blocks(query, key, value, FlexBlocks(layout), 0.3)
    valid = attention_mask.bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-4, atol=1e-5)


def test_flex_compiled_as_part_of_a_larger_graph_attends_like_eager():
    """Under `torch.compile` of the caller (a user compiling the model) flex is traced in place: same output."""
    query, key, value, attention_mask, blocks = padded_chunk(past_length=0)
    layout = prefix_layout(0, attention_mask, blocks)
    expected = dense_reference(query, key, value, attention_mask, blocks, 0, 16**-0.5)
    blocks_of_chunk = FlexBlocks(layout, prefix_block_mask(layout, 128, 128))
    compiled = torch.compile(attend_flex_blocks, backend="eager", fullgraph=True)
    actual = compiled(query, key, value, blocks_of_chunk, 16**-0.5)
    valid = attention_mask.bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-4, atol=1e-5)


def test_past_its_graph_bound_flex_raises_instead_of_running_uncompiled(monkeypatch, flex_on_dynamo):
    """At `FLEX_GRAPH_LIMIT` graphs a new shape raises dynamo's limit error (which the decoder turns into sdpa by
    query slices) instead of running flex uncompiled, which materialises every score."""
    monkeypatch.setattr(flex, "FLEX_GRAPH_LIMIT", 1)
    query, key, value, attention_mask, blocks = padded_chunk(past_length=0)
    layout = prefix_layout(0, attention_mask, blocks)
    attend_flex_blocks(query, key, value, FlexBlocks(layout), 0.25)  # the one graph
    one_row = prefix_layout(0, attention_mask[:1], blocks[:1])
    with pytest.raises(FailOnRecompileLimitHit):
        attend_flex_blocks(query[:1], key[:1], value[:1], FlexBlocks(one_row), 0.25)  # a new batch size


def test_the_decoder_falls_back_to_query_slices_at_flexs_graph_bound_and_only_then(monkeypatch):
    """dynamo's limit error from the compiled flex call: the chunk is attended by sdpa query slices, eager's output;
    any other error of flex is raised, not hidden behind the fallback."""
    inputs = dict(
        input_ids=torch.tensor([[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]]), geometry_pixel_values=views()
    )
    reference = tiny_model(seed=3)
    reference.set_attn_implementation("eager")
    model = tiny_model(seed=3)
    model.config.text_config._attn_implementation_internal = "flex_attention"  # the decoder's flex alone
    query_slices = spy_calls(monkeypatch, text_decoder, "attend_query_chunks")

    def at_the_bound(*args, **kwargs):
        raise FailOnRecompileLimitHit("recompile limit reached")

    monkeypatch.setattr(flex, "FLEX_COMPILE", at_the_bound)
    with torch.no_grad():
        actual, expected = model.reconstruct(**inputs), reference.reconstruct(**inputs)
    torch.testing.assert_close(actual.world_points, expected.world_points, rtol=1e-4, atol=1e-4)
    assert len(query_slices) == model.config.text_config.num_hidden_layers

    def broken(*args, **kwargs):
        raise RuntimeError("flex failed")

    monkeypatch.setattr(flex, "FLEX_COMPILE", broken)
    with torch.no_grad(), pytest.raises(RuntimeError, match="flex failed"):
        model.reconstruct(**inputs)
