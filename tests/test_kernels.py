"""Hub kernels: G2VLM loads with its own layers unless the user asks for kernels, offline on CUDA as on the CPU and on
the `meta` device; a user who opts in (`use_kernels=True`) gets layers equal to ours.

transformers 5.25 kernelizes every model in `from_pretrained` by default (`kernels` became a dependency); 5.21 to
5.24 only on `use_kernels=True`, and do not install `kernels` (the tests that need it skip there, saying so).

No GPU here and no Hub: the CUDA path is forced (transformers' device lookup and the CUDA capability are patched) with
the network blocked, and the Hub layers are replaced by local stand-ins that follow the Hub layers' contracts (the
attributes they read from the module they replace, and the function they compute): Liger's RMSNorm
(kernels-community/liger-kernels, "llama" casting) and the element-wise activations of kernels-community/activation.
"""

from __future__ import annotations

import math
import socket
import sys
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn
from transformers import AutoModelForDepthEstimation, AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_testing import fast_tiny_copy, model_outputs

from g2vlm_hf import G2VLMForConditionalGeneration, G2VLMForReconstruction
from g2vlm_hf.conversion import build_reconstruction_only
from g2vlm_hf.conversion.reconstruction_only import check_loads_cleanly

# The layer names of transformers' kernel mapping that G2VLM's modules carry, and where (the official tiny model).
HOOKED_LAYERS = {"RMSNorm", "SiLU", "GeLU", "QuickGELU"}
CALLS: Counter = Counter()  # stand-in layers are stateless (kernels refuses members): they count here


class StandInRMSNorm(nn.Module):
    """Liger's RMSNorm layer as the Hub ships it: reads `weight` and `variance_epsilon` of the replaced module,
    statistics in float32, normalised values cast to the input dtype before the weight ("llama" casting)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        CALLS["RMSNorm"] += 1
        x = hidden_states.float()
        inverse_rms = (x.square().sum(-1, keepdim=True) / x.shape[-1] + self.variance_epsilon).rsqrt()
        return self.weight * (x * inverse_rms).to(hidden_states.dtype)


class StandInSilu(nn.Module):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        CALLS["SiLU"] += 1
        return input / (1 + torch.exp(-input))


class StandInGelu(nn.Module):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        CALLS["GeLU"] += 1
        return 0.5 * input * (1 + torch.erf(input / math.sqrt(2)))


class StandInQuickGelu(nn.Module):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        CALLS["QuickGELU"] += 1
        return input / (1 + torch.exp(-1.702 * input))


class LocalRepository:
    """A kernel repository (kernels' `RepositoryProtocol`) that loads a layer class defined here."""

    def __init__(self, layer: type[nn.Module]):
        self.layer = layer
        self.layer_name = layer.__name__

    def load(self) -> type[nn.Module]:
        return self.layer

    def __repr__(self) -> str:
        return f"LocalRepository({self.layer_name})"


STAND_INS = {
    "RMSNorm": StandInRMSNorm,
    "SiLU": StandInSilu,
    "GeLU": StandInGelu,
    "QuickGELU": StandInQuickGelu,
}


def stand_in_mapping(device: str = "cpu") -> dict:
    return {name: {device: LocalRepository(layer)} for name, layer in STAND_INS.items()}


def hooked_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if hasattr(type(module), "kernel_layer_name")}


def replaced_forwards(model: nn.Module) -> list[str]:
    """Modules whose forward is not their class's own (kernelize replaced it)."""
    return [name for name, module in hooked_modules(model).items() if "forward" in module.__dict__]


def assert_same_outputs(outputs: dict, reference: dict) -> None:
    """Equal up to float32 rounding: the stand-ins compute the same functions as ours, written differently (as the
    Hub kernels are), which moves the last bits; the greedy tokens and the inputs must be identical."""
    assert sorted(outputs) == sorted(reference)
    for key, value in reference.items():
        if value.dtype.is_floating_point and not key.startswith(("chat.", "recon_inputs.")):
            torch.testing.assert_close(
                outputs[key], value, rtol=1e-4, atol=1e-4, msg=lambda message, key=key: f"{key}: {message}"
            )
        else:
            assert torch.equal(outputs[key], value), key


@pytest.fixture(scope="module")
def folder(converted_tiny, tmp_path_factory) -> Path:
    return fast_tiny_copy(converted_tiny, tmp_path_factory.mktemp("kernels") / "model")


@pytest.fixture(scope="module")
def reference(folder) -> dict:
    """The outputs of the model loaded as by default (its own layers)."""
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    assert replaced_forwards(model) == []
    return model_outputs(AutoProcessor.from_pretrained(folder), model)


def test_the_model_carries_the_layers_transformers_maps_to_hub_kernels(folder):
    pytest.importorskip("kernels", reason="without kernels (transformers < 5.25) transformers hooks no layer")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    names = {type(module).kernel_layer_name for module in hooked_modules(model).values()}
    assert names == HOOKED_LAYERS  # a new hooked layer needs a decision (see compat.HubKernelsOnRequest)


@contextmanager
def network_blocked_and_cuda_forced():
    """Every DNS lookup and connection fails (and is recorded); transformers' kernelize sees a CUDA model."""
    hub_kernels = pytest.importorskip(
        "transformers.integrations.hub_kernels", reason="transformers without Hub kernels"
    )
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the test")

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(socket, "getaddrinfo", refuse))
        stack.enter_context(mock.patch.object(socket.socket, "connect", refuse))
        stack.enter_context(mock.patch.object(hub_kernels, "get_device_type", lambda device: "cuda"))
        stack.enter_context(mock.patch("torch.cuda.get_device_capability", lambda device=None: (9, 0)))
        yield attempts


def test_loading_on_cuda_needs_no_network_and_keeps_our_layers(folder):
    kernels = pytest.importorskip("kernels", reason="transformers < 5.25 does not install kernels")
    fetched = []
    load = kernels.LayerRepository.load

    def spy(repository):
        fetched.append(repository.layer_name)
        return load(repository)

    with network_blocked_and_cuda_forced() as attempts, mock.patch.object(kernels.LayerRepository, "load", spy):
        for model_class in (AutoModelForImageTextToText, AutoModelForDepthEstimation):
            model = model_class.from_pretrained(folder)
            assert not model.use_kernels and replaced_forwards(model) == []
        assert fetched == [] and attempts == []

        # the path is the one that needs the Hub: asking for kernels reaches for Hub layers, and fails offline
        with pytest.raises((OSError, ValueError)):
            AutoModelForImageTextToText.from_pretrained(folder, use_kernels=True)
        assert fetched, "use_kernels=True did not reach transformers' CUDA kernel mapping"


def test_meta_device_loads(folder, tmp_path):
    model = G2VLMForConditionalGeneration.from_pretrained(folder, device_map="meta")
    assert {parameter.device.type for parameter in model.parameters()} == {"meta"}
    # what stage_for_hub / push_to_hub run on a reconstruction-only folder
    recon = build_reconstruction_only(folder, tmp_path / "recon")
    check_loads_cleanly(recon)
    recon_model = G2VLMForReconstruction.from_pretrained(recon, device_map="meta")
    assert {parameter.device.type for parameter in recon_model.parameters()} == {"meta"}


def test_kernelize_on_cpu_gives_the_same_outputs(folder, reference):
    """The route of transformers' own kernel tests: `kernels.kernelize` on a loaded model, under a mapping."""
    kernels = pytest.importorskip("kernels", reason="transformers < 5.25 does not install kernels")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    with kernels.use_kernel_mapping(stand_in_mapping("cpu")):
        kernels.kernelize(model, mode=kernels.Mode.INFERENCE, device="cpu")
    assert sorted(replaced_forwards(model)) == sorted(hooked_modules(model))
    CALLS.clear()
    outputs = model_outputs(AutoProcessor.from_pretrained(folder), model)
    assert set(CALLS) == HOOKED_LAYERS  # every stand-in ran
    assert_same_outputs(outputs, reference)


def test_use_kernels_true_gets_layers_equal_to_ours(folder, reference):
    """A user who opts in: `from_pretrained(..., use_kernels=True)` kernelizes with the registered mapping."""
    kernels = pytest.importorskip("kernels", reason="transformers < 5.25 does not install kernels")
    with kernels.use_kernel_mapping(stand_in_mapping("cpu")):
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, use_kernels=True)
    assert model.use_kernels and sorted(replaced_forwards(model)) == sorted(hooked_modules(model))
    CALLS.clear()
    outputs = model_outputs(AutoProcessor.from_pretrained(folder), model)
    assert set(CALLS) == HOOKED_LAYERS
    assert_same_outputs(outputs, reference)
