"""Quantized loading (bitsandbytes 8-bit and 4-bit, torchao int8 weight-only) and QLoRA, on the CPU.

The geometry heads, the geometry encoder and its projector stay unquantized (`_keep_in_fp32_modules`); the rest of
the model is quantized and still reconstructs and generates. The test model's linear layers have sizes the packed
4-bit CPU kernel of bitsandbytes accepts (used on CPUs with AVX512-BF16): every quantized layer has N (outputs) a
multiple of 32 (its `block_n`) and K (inputs) a multiple of the quantization block (64). The converted official tiny
checkpoint has a vision tower of width 32, which that kernel refuses.
"""

from __future__ import annotations

import copy
from types import ModuleType

import pytest
import torch
from conftest import geometry_block, image_block, image_patches, tiny_config
from torch import nn
from transformers import BitsAndBytesConfig, TorchAoConfig

from g2vlm_hf import G2VLMForConditionalGeneration, G2VLMModel
from g2vlm_hf.training import lora_target_modules

GRID_H, GRID_W, VIEWS = 2, 3, 2
FULL_PRECISION_PARTS = ("geometry_heads", "model.geometry_encoder", "model.geometry_projector")
# relative L2 drift of the first-step logits allowed per method: a tiny random decoder has weak logits, on which
# 4-bit rounding shows more than on a trained model (the benchmark measures a larger model)
LOGITS_DRIFT = {"bnb-8bit": 5e-2, "bnb-nf4": 0.35, "torchao-int8wo": 5e-2}


def quantizable_config():
    """The tiny test config with a vision tower of width 64: every quantized linear layer then has N % 32 == 0 and
    K % 64 == 0 (decoder 128 wide, 64 key-value outputs, MLP 192; vision 64, 192, 256)."""
    return tiny_config(vision_config=dict(depth=1, embed_dim=64, hidden_size=128, num_heads=2, patch_size=14))


def require(module: str) -> ModuleType:
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install 'g2vlm-hf[quantization]')")


def bitsandbytes() -> ModuleType:
    """bitsandbytes with its native CPU kernels, or a skip saying which is missing."""
    bnb = require("bitsandbytes")
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        pytest.skip("bitsandbytes has no native library for this platform (its CPU kernels did not load)")
    return bnb


def bitsandbytes_8bit() -> BitsAndBytesConfig:
    bitsandbytes()
    return BitsAndBytesConfig(load_in_8bit=True)


def bitsandbytes_nf4() -> BitsAndBytesConfig:
    bitsandbytes()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def torchao_int8_weight_only() -> TorchAoConfig:
    torchao = require("torchao")
    return TorchAoConfig(torchao.quantization.Int8WeightOnlyConfig())


METHODS = {"bnb-8bit": bitsandbytes_8bit, "bnb-nf4": bitsandbytes_nf4, "torchao-int8wo": torchao_int8_weight_only}


def quantized_linear_type(method: str) -> tuple[type, type]:
    """(module class, weight class) of a quantized linear layer."""
    if method == "torchao-int8wo":
        return nn.Linear, require("torchao").quantization.Int8Tensor
    bnb = bitsandbytes()
    return (bnb.nn.Linear8bitLt, bnb.nn.Int8Params) if method == "bnb-8bit" else (bnb.nn.Linear4bit, bnb.nn.Params4bit)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A float32 checkpoint of the quantizable tiny model."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("quantizable") / "tiny"
    G2VLMForConditionalGeneration(quantizable_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    return G2VLMForConditionalGeneration.from_pretrained(checkpoint).eval()


def load(checkpoint, method: str, **kwargs) -> G2VLMForConditionalGeneration:
    return G2VLMForConditionalGeneration.from_pretrained(checkpoint, quantization_config=METHODS[method](), **kwargs)


def views(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, VIEWS, 3, GRID_H * 14, GRID_W * 14, generator=generator)


def reconstruction_ids() -> torch.Tensor:
    return torch.tensor([[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]])


def chat_batch() -> dict:
    """A prompt with geometry views, a semantic image and a question, with the question's last tokens as labels."""
    patches, grid = image_patches(4, 4)
    ids = torch.tensor([[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W), *image_block(4, 4), 8, 9, 10, 11, 12, 13]])
    labels = torch.full_like(ids, -100)
    labels[0, -4:] = ids[0, -4:]
    return dict(input_ids=ids, labels=labels, pixel_values=patches, image_grid_thw=grid, geometry_pixel_values=views(1))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def in_part(name: str, parts: tuple[str, ...]) -> bool:
    return any(name == part or name.startswith(f"{part}.") for part in parts)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


@pytest.mark.parametrize("method", METHODS)
def test_geometry_parts_stay_in_full_precision_and_the_rest_is_quantized(checkpoint, method):
    model = load(checkpoint, method)
    module_type, weight_type = quantized_linear_type(method)
    layers = linear_layers(model)
    for name, module in layers.items():
        if in_part(name, FULL_PRECISION_PARTS):
            assert type(module) is nn.Linear and type(module.weight) is nn.Parameter, name
            assert module.weight.dtype == torch.float32, name
        elif name != "lm_head":  # transformers keeps the output embeddings unquantized by default
            assert isinstance(module, module_type) and isinstance(module.weight, weight_type), name
    quantized = [name for name in layers if in_part(name, ("model.language_model", "model.visual"))]
    assert quantized and all(isinstance(layers[name].weight, weight_type) for name in quantized)


@pytest.mark.parametrize("method", METHODS)
def test_quantized_model_reconstructs_and_generates(checkpoint, reference, method):
    model = load(checkpoint, method).eval()
    ids, scene = reconstruction_ids(), views()
    with torch.no_grad():
        expected = reference.reconstruct(input_ids=ids, geometry_pixel_values=scene)
        actual = model.reconstruct(input_ids=ids, geometry_pixel_values=scene)
    assert all(t.dtype == torch.float32 for t in (actual.camera_poses, actual.world_points, actual.depth))
    rotations = actual.camera_poses[..., :3, :3].double()
    torch.testing.assert_close(
        rotations @ rotations.transpose(-1, -2),
        torch.eye(3, dtype=torch.float64).expand_as(rotations),
        rtol=0,
        atol=1e-5,
    )
    assert bool((actual.depth > 0).all())
    # the decoder's weights moved by the quantization error, the geometry path did not: a small drift, not zero
    drift = relative_error(actual.world_points, expected.world_points)
    assert 0 < drift < 5e-2, drift

    batch = chat_batch()
    batch.pop("labels")
    with torch.no_grad():
        expected_logits = reference(**batch).logits[:, -1]
        logits = model(**batch).logits[:, -1]
        generated = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert 0 < relative_error(logits, expected_logits) < LOGITS_DRIFT[method]
    new_tokens = generated[:, batch["input_ids"].shape[1] :]
    assert new_tokens.shape == (1, 4)
    assert new_tokens[0, 0] == logits.argmax(-1)[0]  # greedy from the quantized model's own first-step logits


def test_a_users_skip_list_still_keeps_the_geometry_parts(checkpoint):
    # transformers adds the model's `_keep_in_fp32_modules` to the user's `llm_int8_skip_modules`
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["model.visual"])
    model = G2VLMForConditionalGeneration.from_pretrained(checkpoint, quantization_config=config)
    layers = linear_layers(model)
    assert all(
        type(layers[name]) is nn.Linear for name in layers if in_part(name, (*FULL_PRECISION_PARTS, "model.visual"))
    )
    assert isinstance(layers["model.language_model.layers.0.self_attn.q_proj"], bitsandbytes().nn.Linear8bitLt)


def test_the_backbone_alone_keeps_its_geometry_parts(checkpoint):
    model = G2VLMModel.from_pretrained(checkpoint, quantization_config=bitsandbytes_8bit())
    layers = linear_layers(model)
    assert all(
        type(layers[name]) is nn.Linear for name in layers if in_part(name, ("geometry_encoder", "geometry_projector"))
    )
    assert isinstance(layers["language_model.layers.0.self_attn.q_proj"], bitsandbytes().nn.Linear8bitLt)


@pytest.mark.parametrize(
    "method, dtype, geometry_encoder_dtype",
    [("bnb-nf4", torch.bfloat16, torch.bfloat16), ("bnb-8bit", torch.float16, torch.float32)],
)
def test_half_precision_loading_keeps_heads_in_float32(checkpoint, method, dtype, geometry_encoder_dtype):
    """Unquantized parts take the loading dtype, except the heads (float32 always) and, in float16, the geometry
    encoder and projector (float32 as well)."""
    model = load(checkpoint, method, dtype=dtype).eval()
    assert all(p.dtype == torch.float32 for p in model.geometry_heads.parameters())
    assert model.model.geometry_projector.weight.dtype == geometry_encoder_dtype
    assert all(p.dtype == geometry_encoder_dtype for p in model.model.geometry_encoder.parameters())
    assert model.model.language_model.norm.weight.dtype == dtype
    with torch.no_grad():
        out = model.reconstruct(input_ids=reconstruction_ids(), geometry_pixel_values=views())
    assert out.world_points.dtype == torch.float32 and bool(torch.isfinite(out.world_points).all())


def test_4bit_layers_fit_the_packed_cpu_kernel(checkpoint):
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel on the first inference call; the repacking
    refuses sizes that kernel cannot take ("N must be divisible by block_n"). Repack every 4-bit layer here, whatever
    this CPU has, so that the model above runs on such CPUs too."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model = load(checkpoint, "bnb-nf4")
    layers = [m for m in model.modules() if isinstance(m, bitsandbytes().nn.Linear4bit)]
    assert layers
    for layer in layers:
        _convert_weight_packed_for_cpu(layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state))


# QLoRA: a 4-bit base prepared by peft, LoRA on the semantic expert


def qlora_model(checkpoint, checkpointing: bool, use_reentrant: bool = True, seed: int = 0):
    peft = require("peft")
    base = load(checkpoint, "bnb-nf4")
    base = peft.prepare_model_for_kbit_training(
        base, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
    )
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=lora_target_modules(semantic=True))
    return peft.get_peft_model(base, config)


def test_qlora_trains_saves_and_reloads_on_a_fresh_4bit_base(checkpoint, tmp_path):
    model = qlora_model(checkpoint, checkpointing=True)
    checkpointed = {type(m).__name__ for m in model.modules() if getattr(m, "gradient_checkpointing", False)}
    assert "G2VLMDecoderLayer" in checkpointed
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and ".geo_" not in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = chat_batch()
    model.train()
    history = []
    for _ in range(6):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.8 * history[0], history

    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded = require("peft").PeftModel.from_pretrained(load(checkpoint, "bnb-nf4"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-5)
        plain = load(checkpoint, "bnb-nf4")(**batch).logits
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapters changed the model


def test_qlora_gradient_checkpointing_gives_the_same_loss_and_gradients(checkpoint):
    batch = chat_batch()
    results = []
    for checkpointing in (False, True):
        # reentrant checkpointing (peft's default) is covered by the training test above
        model = qlora_model(checkpoint, checkpointing=checkpointing, use_reentrant=False).train()
        # move LoRA's B away from zero so that every adapter weight gets a gradient
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        layer = next(m for m in model.modules() if type(m).__name__ == "G2VLMDecoderLayer")
        first_linear = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))
        calls = []
        first_linear.register_forward_hook(lambda *_, seen=calls: seen.append(1))
        loss = model(**batch).loss
        loss.backward()
        # a checkpointed layer runs its forward again during the backward pass
        assert len(calls) == (2 if checkpointing else 1)
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss, grads), (checkpointed_loss, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed_loss, loss)
    assert grads.keys() == checkpointed_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and bool(grad.abs().sum() > 0), name
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
