"""benchmarks/attention_kernels.py times the kernels torch offers on a reconstruction's block of views: the block it
times is the one the model's token layout makes, and each kernel attends it whole and unmasked (torch's varlen kernel
through the model's adapter, here a CPU stand-in with the torch 2.11 signature)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import tiny_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import attention_kernels  # noqa: E402
import bench_gpu  # noqa: E402
import profile_stages  # noqa: E402
from costs import attention_flops, decoder_flops  # noqa: E402

from g2vlm_hf.modeling.token_layout import get_block_ids  # noqa: E402
from g2vlm_hf.modeling.torch_varlen import VarlenKernel  # noqa: E402


def test_the_timed_block_is_the_reconstruction_prompts_block_of_views():
    config = tiny_config()
    for views, side in ((2, 56), (5, 84)):
        ids = bench_gpu.reconstruction_inputs(config, views, side, torch.device("cpu"))["input_ids"]
        blocks = get_block_ids(ids, None, image_token_id=config.image_token_id,
                               geometry_token_id=config.geometry_token_id,
                               vision_start_token_id=config.vision_start_token_id,
                               vision_end_token_id=config.vision_end_token_id)  # fmt: skip
        sizes = torch.unique(blocks[blocks >= 0], return_counts=True)[1]
        assert sizes.tolist() == [attention_kernels.block_tokens(config, views, side, side)]
    # at 16 views of 518x518 (full size) that block's attention is more than half of the trunk's FLOPs
    full = profile_stages.config_for("full")
    tokens = attention_kernels.block_tokens(full, 16, 518, 518)
    text = full.text_config
    share = attention_flops(tokens, tokens, text.hidden_size) * text.num_hidden_layers / decoder_flops(full, tokens)
    assert tokens == 21_936 and 0.5 < share < 0.7


def test_every_kernel_attends_the_whole_block_unmasked():
    calls = []

    def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):  # fmt: skip
        calls.append((tuple(cu_seq_q.tolist()), tuple(cu_seq_k.tolist()), window_size, query.shape[1] == key.shape[1]))
        query, key, value = (states.transpose(0, 1)[None].float() for states in (query, key, value))
        output = F.scaled_dot_product_attention(query, key, value, scale=scale, is_causal=window_size == (-1, 0))
        return output[0].transpose(0, 1).to(torch.bfloat16)

    config = tiny_config()
    rows = attention_kernels.attention_kernels(config, torch.device("cpu"), torch.bfloat16, 3, 56, 56, 1e12,
                                               repeats=1, varlen_kernel=VarlenKernel.of(varlen_2_11))  # fmt: skip
    tokens = rows["shape"]["tokens"]
    assert tokens == 3 * (4 * 4 + 2)
    # the varlen call: one segment of the whole block, no causal window, the kv heads repeated for torch 2.11
    assert set(calls) == {((0, tokens), (0, tokens), (-1, -1), True)}
    varlen = rows[attention_kernels.VARLEN]
    assert varlen["reference"] is True and varlen["ms"] > 0
    for name in ("sdpa flash", "sdpa math"):
        assert rows[name]["rel_diff"] < 1e-2, name  # bf16 kernels against the float32 stand-in
    assert "CUDA" in rows["sdpa cuDNN"]["skipped"] and "CUDA" in rows["sdpa memory-efficient"]["skipped"]
