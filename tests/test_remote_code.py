"""Remote code: a pushed repository loads with `trust_remote_code=True` where g2vlm_hf is not installed.

The child process hides g2vlm_hf with a meta-path finder placed first in `sys.meta_path` (see `HIDE_PACKAGE` in
`tests/hub_testing.py`): every `import g2vlm_hf...` raises ModuleNotFoundError, as for a package that is not
installed, whatever way the editable install exposes it (.pth path entry or import hook). The child checks that the
import fails and, at exit, that no g2vlm_hf module was loaded; the classes it gets must come from
`transformers_modules`, i.e. from the files downloaded from the (offline) Hub.

NOT covered offline: the Xet storage path and real-Hub behaviour (see tests/hub_server.py); tests/test_hub_real.py
covers the real Hub when given a token.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import running_hub_server
from hub_testing import TOKEN, fast_tiny_copy, model_outputs, run_without_package, sources_changed_since_collection

from g2vlm_hf import modeling, processing
from g2vlm_hf.conversion import build_reconstruction_only, push_to_hub, remote_code_files
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
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
from hub_testing import model_outputs

full = AutoModelForImageTextToText.from_pretrained("user/remote-full", dtype=torch.float32, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("user/remote-full", trust_remote_code=True)
recon = AutoModel.from_pretrained("user/remote-recon", dtype=torch.float32, trust_remote_code=True).eval()
classes = {
    "full": type(full), "recon": type(recon), "processor": type(processor),
    "geometry_processor": type(processor.geometry_image_processor),
}
for name, cls in classes.items():
    assert cls.__module__.startswith("transformers_modules."), (name, cls.__module__)
assert type(full).__name__ == "G2VLMForConditionalGeneration" and type(recon).__name__ == "G2VLMForReconstruction"
assert not hasattr(recon.model, "visual") or recon.model.visual is None
save_file(model_outputs(processor, full, recon), "outputs.safetensors")
"""


@pytest.fixture(scope="module")
def repos(converted_tiny, tmp_path_factory):
    folder = fast_tiny_copy(converted_tiny, tmp_path_factory.mktemp("remote") / "g2vlm-tiny")
    with running_hub_server() as hub:
        push_to_hub(folder, "user/remote-full", token=TOKEN, verify=False)
        push_to_hub(folder, "user/remote-recon", token=TOKEN, reconstruction_only=True, verify=False)
        yield hub, folder


def test_trust_remote_code_without_the_package_reproduces_the_package(repos, tmp_path):
    hub, folder = repos
    changed = sources_changed_since_collection()
    if changed:
        pytest.skip(f"g2vlm_hf sources were edited during this test session ({changed}): rerun to compare")
    run_without_package(CHILD, tmp_path, hub.subprocess_env(token=TOKEN))
    remote = load_file(tmp_path / "outputs.safetensors")

    full = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    recon = AutoModel.from_pretrained(build_reconstruction_only(folder, tmp_path / "recon"), dtype=torch.float32).eval()
    local = model_outputs(AutoProcessor.from_pretrained(folder), full, recon)
    assert sorted(remote) == sorted(local)
    for key, value in local.items():  # inputs from the processor, logits, greedy tokens, both reconstructions
        assert remote[key].dtype == value.dtype and torch.equal(remote[key], value), key
    for field in ("camera_poses", "world_points", "depth"):
        assert torch.equal(local[f"recon_only.{field}"], local[f"full.{field}"])
