"""`attn_implementation="torch_varlen"` (torch's own varlen flash kernel): the one adapter over the kernel's torch
signatures (2.10 / 2.11 / 2.12+, checked with CPU stand-ins computing plain attention), its registration, and
`flash_attention_2` without the flash-attn package resolving to it with nothing downloaded."""

from __future__ import annotations

import socket

import pytest
import torch
from conftest import spy_calls, tiny_config, tiny_model
from test_attention_backends import padded_chat_inputs, reference_varlen_attention
from transformers import modeling_flash_attention_utils, modeling_utils
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from g2vlm_hf import G2VLMForConditionalGeneration
from g2vlm_hf.modeling import text_decoder, torch_varlen
from g2vlm_hf.modeling.torch_varlen import VarlenKernel, local_attention_implementation, varlen_attention

CALLS: list[dict] = []


def _reference(query, key, value, cu_q, cu_k, max_q, max_k, causal, scale):
    return reference_varlen_attention(query, key, value, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal)


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
    CALLS.append(dict(is_causal=is_causal, kv_heads=key.shape[1]))
    assert query.shape[1] == key.shape[1], "2.10 has no enable_gqa: the kv heads must come repeated"
    return _reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None)


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):  # fmt: skip
    CALLS.append(dict(window_size=window_size, scale=scale, kv_heads=key.shape[1]))
    assert query.shape[1] == key.shape[1]
    return _reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), scale)


def varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False):  # fmt: skip
    CALLS.append(dict(window_size=window_size, scale=scale, enable_gqa=enable_gqa, kv_heads=key.shape[1]))
    return _reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), scale)


def plain_attention(query, key, value, cu_q, cu_k, causal, scale):
    """Per segment softmax(q k^T * scale) v with repeated kv heads, causal aligned bottom-right: plain math."""
    output = torch.empty_like(query)
    groups = query.shape[1] // key.shape[1]
    for index in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[index]), int(cu_q[index + 1]), int(cu_k[index]), int(cu_k[index + 1])
        q = query[q0:q1].transpose(0, 1)
        k = key[k0:k1].repeat_interleave(groups, 1).transpose(0, 1)
        v = value[k0:k1].repeat_interleave(groups, 1).transpose(0, 1)
        scores = q @ k.transpose(-1, -2) * scale
        if causal:
            rows, cols = torch.arange(q1 - q0)[:, None], torch.arange(k1 - k0)[None, :]
            scores = scores.masked_fill(cols > rows + (k1 - k0) - (q1 - q0), float("-inf"))
        output[q0:q1] = (scores.softmax(-1) @ v).transpose(0, 1)
    return output


@pytest.mark.parametrize("function", [varlen_2_10, varlen_2_11, varlen_2_12])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_each_torch_signature_gets_what_it_takes(function, causal, scale):
    torch.manual_seed(0)
    query, key, value = torch.randn(9, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32)
    CALLS.clear()
    actual = varlen_attention(
        query, key, value, cu_q, cu_k, 5, 7, causal=causal, scale=scale, kernel=VarlenKernel.of(function)
    )
    torch.testing.assert_close(actual, plain_attention(query, key, value, cu_q, cu_k, causal, scale or 8**-0.5))
    (call,) = CALLS
    if function is varlen_2_10:
        assert call == dict(is_causal=causal, kv_heads=4)
    else:
        assert call["window_size"] == ((-1, 0) if causal else (-1, -1)) and call["scale"] == scale
    if function is varlen_2_12:
        assert call["enable_gqa"] and call["kv_heads"] == 2  # the kv heads are not copied


def test_the_installed_torch_kernel_is_found():
    kernel = torch_varlen.TORCH_VARLEN_KERNEL
    if not hasattr(torch.nn.attention, "varlen"):
        assert kernel is None
    else:
        assert kernel.function is torch.nn.attention.varlen.varlen_attn
        assert kernel.takes_window_size and kernel.takes_scale  # torch >= 2.11, as installed here


def eager_logits(inputs: dict) -> torch.Tensor:
    """The reference: the logits of the same tiny model (seed 2) on eager attention."""
    reference = tiny_model(seed=2)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        return reference(**inputs).logits


def test_torch_varlen_is_a_registered_backend_and_equals_eager_off_cuda(tmp_path, monkeypatch):
    """On the CPU (and in float32) the packed runs cannot use torch's kernel: sdpa by query slices, eager's outputs
    (a padded batch: the padding keys stay unseen)."""
    inputs = padded_chat_inputs()
    tiny_model(seed=2).save_pretrained(tmp_path)
    model = G2VLMForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="torch_varlen").eval()
    assert model.config.text_config._attn_implementation == "torch_varlen"
    query_slices = spy_calls(monkeypatch, text_decoder, "attend_query_chunks")
    with torch.no_grad():
        actual = model(**inputs).logits
    assert len(query_slices) == model.config.text_config.num_hidden_layers
    valid = inputs["attention_mask"].bool()
    assert not valid.all()
    torch.testing.assert_close(actual[valid], eager_logits(inputs)[valid], rtol=1e-4, atol=1e-5)


def test_torch_varlen_off_cuda_says_once_what_it_falls_back_to_and_sdpa_says_nothing():
    """The one-line note of issue 31: asked for torch's varlen kernel where it cannot run (CPU, float32), the model
    says so once, naming the device and dtype and what runs instead; the default sdpa, which chose nothing, is quiet."""
    inputs = padded_chat_inputs()
    logger = transformers_logging.get_logger(text_decoder.__name__)
    for implementation, expected_notes in (("torch_varlen", 1), ("sdpa", 0)):
        model = tiny_model(seed=2)
        model.set_attn_implementation(implementation)
        transformers_logging.warning_once.cache_clear()
        with CaptureLogger(logger) as captured, torch.no_grad():
            for _ in range(2):
                model(**inputs)
        assert (
            captured.out.count("attn_implementation='torch_varlen' needs CUDA and bfloat16/float16") == expected_notes
        )
        if expected_notes:
            assert "(got cpu, torch.float32): prompts with images use sdpa by query slices instead." in captured.out


@pytest.fixture
def offline(monkeypatch):
    """No network at all, the Hub offline, flash-attn absent and transformers' kernels route enabled (as on 5.25 with
    `kernels` installed): any attempt to fetch `kernels-community/flash-attn2` fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(modeling_utils, "is_kernels_available", lambda: True, raising=False)
    monkeypatch.setattr(torch_varlen, "flash_package_available", lambda implementation: False)
    loads = []
    real_import = modeling_flash_attention_utils.lazy_import_flash_attention

    def spy_import(implementation, *args, **kwargs):
        loads.append(implementation)
        return real_import(implementation, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "lazy_import_flash_attention", spy_import, raising=False)
    return loads


@pytest.mark.skipif(torch_varlen.TORCH_VARLEN_KERNEL is None, reason="torch < 2.10 has no varlen kernel")
def test_flash_attention_2_without_the_package_uses_torch_varlen_and_downloads_nothing(offline, tmp_path, monkeypatch):
    tiny_model(seed=2).save_pretrained(tmp_path)
    loaded = G2VLMForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="flash_attention_2")
    switched = tiny_model(seed=2)
    switched.set_attn_implementation("flash_attention_2")
    built = G2VLMForConditionalGeneration(tiny_config(attn_implementation="flash_attention_2"))
    for model in (loaded, switched, built):
        configs = [model.config, model.config.text_config, model.config.vision_config, model.config.geometry_config]
        assert {config._attn_implementation for config in configs} == {"torch_varlen"}
    assert not any("/" in implementation for implementation in offline)  # no Hub kernel was even looked up
    inputs = padded_chat_inputs()
    query_slices = spy_calls(monkeypatch, text_decoder, "attend_query_chunks")  # torch_varlen on the CPU
    with torch.no_grad():
        actual = loaded.eval()(**inputs).logits
    assert len(query_slices) == loaded.config.text_config.num_hidden_layers
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], eager_logits(inputs)[valid], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch_varlen.TORCH_VARLEN_KERNEL is None, reason="torch < 2.10 has no varlen kernel")
def test_flash_attention_2_for_the_text_alone_leaves_the_encoders_choices(offline, tmp_path):
    tiny_model(seed=2).save_pretrained(tmp_path)
    per_part = {"": "flash_attention_2", "text_config": "flash_attention_2", "vision_config": "sdpa"}
    loaded = G2VLMForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation={**per_part, "geometry_config": "eager"}
    )
    switched = tiny_model(seed=2)
    switched.set_attn_implementation({"text_config": "flash_attention_2", "geometry_config": "eager"})
    for model in (loaded, switched):
        config = model.config
        assert config.text_config._attn_implementation == "torch_varlen"
        assert (config.vision_config._attn_implementation, config.geometry_config._attn_implementation) == (
            "sdpa",
            "eager",
        )
    assert not any("/" in implementation for implementation in offline)


def test_without_any_flash_kernel_the_error_names_the_alternatives(offline, monkeypatch):
    monkeypatch.setattr(torch_varlen, "TORCH_VARLEN_KERNEL", None)
    with pytest.raises(ImportError, match="attn_implementation='sdpa'"):
        tiny_model().set_attn_implementation("flash_attention_2")
    assert local_attention_implementation("sdpa") == "sdpa"
