"""Remote code: a pushed repository loads with `trust_remote_code=True` where g2vlm_hf is not installed.

The repositories are pushed by a child process with g2vlm_hf, and loaded by another one where g2vlm_hf does not
exist (`HubClient(..., without_package=True)`, tests/hub_testing.py: an isolated Python on a site-packages without
g2vlm_hf, no `.pth` files): both reach the offline Hub through their environment only. The classes the second one gets
must come from `transformers_modules`, i.e. from the files downloaded from the Hub, and no g2vlm_hf module may load.

NOT covered offline: the Xet storage path and real-Hub behaviour (see tests/hub_server.py); tests/test_hub_real.py
covers the real Hub when given a token.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import HubServer
from hub_testing import HubClient, fast_tiny_copy, hub_env, model_outputs, sources_changed_since_collection

import g2vlm_hf
from g2vlm_hf import modeling, processing
from g2vlm_hf.conversion import build_reconstruction_only, remote_code_files
from g2vlm_hf.conversion.remote_code import check_remote_code


def test_remote_code_is_the_package_source_with_flat_imports():
    files = remote_code_files()
    root = Path(g2vlm_hf.__file__).parent
    sources = {
        path.name: path
        for package in (modeling, processing)
        for path in Path(package.__file__).parent.glob("*.py")
        if path.name != "__init__.py"
    }
    sources.update({path.name: path for path in [root / "integers.py"]})  # a shared top-level module
    assert sorted(files) == sorted(sources)
    for name, text in files.items():
        header, body = text.split("\n", 1)
        source = sources[name].read_text()
        expected = re.sub(r"^(\s*)from \.\.integers import", r"\1from .integers import", source, flags=re.MULTILINE)
        how = "verbatim" if expected == source else "with its `from ..` imports made `from .`"
        assert header.startswith(f"# Copied {how} from g2vlm_hf") and body == expected, name


def write_package(root: Path, modules: dict[str, str]) -> Path:
    for name, text in modules.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


# A package laid out like g2vlm_hf whose modeling and processing modules import a shared top-level module.
FLAT_PACKAGE = {
    "integers.py": """
        import transformers
        FLAVOUR = "shared module of transformers " + transformers.__version__
        """,
    "modeling/configuration_flat.py": """
        from transformers import PretrainedConfig
        from ..integers import FLAVOUR

        class FlatConfig(PretrainedConfig):
            model_type = "flat_test"

            def __init__(self, flavour=FLAVOUR, **kwargs):
                self.flavour = flavour
                super().__init__(**kwargs)
        """,
    "processing/processing_flat.py": """
        if True:
            from ..integers import (
                FLAVOUR,
            )
        from .configuration_flat import FlatConfig
        """,
    "export.py": "import trimesh\n",
}


def test_parent_imports_of_shared_modules_are_flattened(tmp_path):
    root = write_package(tmp_path / "pkg", FLAT_PACKAGE)
    files = remote_code_files(root)
    assert sorted(files) == ["configuration_flat.py", "integers.py", "processing_flat.py"]  # no export.py
    assert "\nfrom .integers import FLAVOUR\n" in files["configuration_flat.py"]
    assert "\n    from .integers import (\n        FLAVOUR,\n    )\n" in files["processing_flat.py"]
    assert files["integers.py"].split("\n", 1)[1] == (root / "integers.py").read_text()

    (root / "modeling" / "modeling_flat.py").write_text("from ..export import trimesh\n")
    with pytest.raises(ValueError, match=r"do not travel: modeling_flat.py: from \.\.export import"):
        remote_code_files(root)


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
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
from hub_testing import model_outputs

full = AutoModelForImageTextToText.from_pretrained("user/remote-full", dtype=torch.float32, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("user/remote-full", trust_remote_code=True)
recon = AutoModel.from_pretrained("user/remote-recon", dtype=torch.float32, trust_remote_code=True).eval()
flat = AutoConfig.from_pretrained("user/flat-shared", trust_remote_code=True)
classes = {
    "full": type(full), "recon": type(recon), "processor": type(processor),
    "geometry_processor": type(processor.geometry_image_processor), "flat": type(flat),
}
{
    "classes": {name: f"{cls.__module__}.{cls.__name__}" for name, cls in classes.items()},
    "recon has a ViT": getattr(recon.model, "visual", None) is not None,
    "flat flavour": (flat.flavour, "shared module of transformers " + transformers.__version__),
    "outputs": model_outputs(processor, full, recon),
    "g2vlm_hf findable": importlib.util.find_spec("g2vlm_hf") is not None,
    "g2vlm_hf modules": sorted(name for name in sys.modules if name.split(".")[0] == "g2vlm_hf"),
}
"""


def flat_repo(folder: Path) -> Path:
    """A config-only repository whose remote code imports a shared module (`FLAT_PACKAGE`), flattened."""
    for name, text in remote_code_files(write_package(folder / "pkg", FLAT_PACKAGE)).items():
        (folder / name).write_text(text)
    config = {"model_type": "flat_test", "auto_map": {"AutoConfig": "configuration_flat.FlatConfig"}}
    (folder / "config.json").write_text(json.dumps(config))
    shutil.rmtree(folder / "pkg")
    return folder


@pytest.fixture(scope="module")
def repos(converted_tiny, tmp_path_factory):
    folder = fast_tiny_copy(converted_tiny, tmp_path_factory.mktemp("remote") / "g2vlm-tiny")
    work = tmp_path_factory.mktemp("remote-clients")
    with HubServer() as hub:
        with HubClient(hub_env(hub.url, work / "home"), work / "publisher") as publisher:
            publisher.run(
                """
                from huggingface_hub import HfApi
                from g2vlm_hf.conversion import push_to_hub
                push_to_hub(folder, "user/remote-full", verify=False)
                push_to_hub(folder, "user/remote-recon", reconstruction_only=True, verify=False)
                HfApi().create_repo("user/flat-shared")
                HfApi().upload_folder(repo_id="user/flat-shared", folder_path=flat)
                """,
                folder=folder,
                flat=flat_repo(tmp_path_factory.mktemp("flat")),
            )
        yield hub, folder
        unknown = [(r.method, r.path) for r in hub.requests if r.kind == "unknown"]
        assert not unknown, f"endpoints the test server does not implement: {unknown}"


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
    flavour, expected_flavour = remote["flat flavour"]  # `from ..integers` flattened: the loader found integers.py
    assert remote["classes"]["flat"].endswith(".FlatConfig") and flavour == expected_flavour

    full = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    recon = AutoModel.from_pretrained(build_reconstruction_only(folder, tmp_path / "recon"), dtype=torch.float32).eval()
    local = model_outputs(AutoProcessor.from_pretrained(folder), full, recon)
    outputs = remote["outputs"]
    assert sorted(outputs) == sorted(local)
    for key, value in local.items():  # inputs from the processor, logits, greedy tokens, both reconstructions
        assert outputs[key].dtype == value.dtype and torch.equal(outputs[key], value), key
    for field in ("camera_poses", "world_points", "depth"):
        assert torch.equal(local[f"recon_only.{field}"], local[f"full.{field}"])
