"""Remote code: a pushed repository loads with `trust_remote_code=True` where g2vlm_hf is not installed.

The repositories are pushed by a child process with g2vlm_hf, and loaded by another one where g2vlm_hf does not
exist (`HubClient(..., without_package=True)`, tests/hub_testing.py: an isolated Python on a site-packages without
g2vlm_hf, no `.pth` files): both reach the offline Hub through their environment only. The classes the second one gets
must come from `transformers_modules`, i.e. from the files downloaded from the Hub, and no g2vlm_hf module may load.

NOT covered offline: the Xet storage path and real-Hub behaviour (see tests/hub_server.py); tests/test_hub_real.py
covers the real Hub when given a token.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import HubServer
from hub_testing import HubClient, fast_tiny_copy, hub_env, model_outputs, sources_changed_since_collection

from g2vlm_hf import modeling, processing
from g2vlm_hf.conversion import build_reconstruction_only, remote_code_files
from g2vlm_hf.conversion.remote_code import check_remote_code


def test_remote_code_is_the_package_source_verbatim():
    files = remote_code_files()
    sources = {
        path.name: path
        for package in (modeling, processing)
        for path in Path(package.__file__).parent.glob("*.py")
        if path.name != "__init__.py"
    }
    assert sorted(files) == sorted(sources)
    for name, text in files.items():
        header, body = text.split("\n", 1)
        assert header.startswith("# Copied verbatim from g2vlm_hf") and body == sources[name].read_text(), name


@pytest.mark.parametrize(
    "line",
    ["from ..export import export_reconstruction", "import g2vlm_hf", "from .missing_module import x", "import scipy"],
)
def test_imports_that_would_not_travel_are_refused(line):
    with pytest.raises(ValueError, match="do not travel"):
        check_remote_code({"modeling_g2vlm.py": f"import torch\n{line}\n"})


def test_optional_third_party_imports_are_allowed():
    check_remote_code(
        {"modeling_g2vlm.py": "try:\n    import flash_attn\nexcept ImportError:\n    flash_attn = None\n"}
    )


CHILD = """
import importlib.util, sys
import torch
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
from hub_testing import model_outputs

full = AutoModelForImageTextToText.from_pretrained("user/remote-full", dtype=torch.float32, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("user/remote-full", trust_remote_code=True)
recon = AutoModel.from_pretrained("user/remote-recon", dtype=torch.float32, trust_remote_code=True).eval()
classes = {
    "full": type(full), "recon": type(recon), "processor": type(processor),
    "geometry_processor": type(processor.geometry_image_processor),
}
{
    "classes": {name: f"{cls.__module__}.{cls.__name__}" for name, cls in classes.items()},
    "recon has a ViT": getattr(recon.model, "visual", None) is not None,
    "outputs": model_outputs(processor, full, recon),
    "g2vlm_hf findable": importlib.util.find_spec("g2vlm_hf") is not None,
    "g2vlm_hf modules": sorted(name for name in sys.modules if name.split(".")[0] == "g2vlm_hf"),
}
"""


@pytest.fixture(scope="module")
def repos(converted_tiny, tmp_path_factory):
    folder = fast_tiny_copy(converted_tiny, tmp_path_factory.mktemp("remote") / "g2vlm-tiny")
    work = tmp_path_factory.mktemp("remote-clients")
    with HubServer() as hub:
        with HubClient(hub_env(hub.url, work / "home"), work / "publisher") as publisher:
            publisher.run(
                """
                from g2vlm_hf.conversion import push_to_hub
                push_to_hub(folder, "user/remote-full", verify=False)
                push_to_hub(folder, "user/remote-recon", reconstruction_only=True, verify=False)
                """,
                folder=folder,
            )
        yield hub, folder


def test_trust_remote_code_without_the_package_reproduces_the_package(repos, tmp_path):
    hub, folder = repos
    changed = sources_changed_since_collection()
    if changed:
        pytest.skip(f"g2vlm_hf sources were edited during this test session ({changed}): rerun to compare")
    with HubClient(hub_env(hub.url, tmp_path / "home"), tmp_path / "user", without_package=True) as user:
        remote = user.run(CHILD)
    assert not remote["g2vlm_hf findable"] and remote["g2vlm_hf modules"] == []
    for name, qualified in remote["classes"].items():
        assert qualified.startswith("transformers_modules."), (name, qualified)
    assert remote["classes"]["full"].endswith(".G2VLMForConditionalGeneration")
    assert remote["classes"]["recon"].endswith(".G2VLMForReconstruction") and not remote["recon has a ViT"]

    full = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    recon = AutoModel.from_pretrained(build_reconstruction_only(folder, tmp_path / "recon"), dtype=torch.float32).eval()
    local = model_outputs(AutoProcessor.from_pretrained(folder), full, recon)
    outputs = remote["outputs"]
    assert sorted(outputs) == sorted(local)
    for key, value in local.items():  # inputs from the processor, logits, greedy tokens, both reconstructions
        assert outputs[key].dtype == value.dtype and torch.equal(outputs[key], value), key
    for field in ("camera_poses", "world_points", "depth"):
        assert torch.equal(local[f"recon_only.{field}"], local[f"full.{field}"])
