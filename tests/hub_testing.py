"""Helpers of the Hub-export tests: a fast tiny checkpoint, Python without g2vlm_hf, folder digests, reference outputs.

This module imports neither g2vlm_hf nor pytest at module level, so the child processes of the remote-code and
model-card tests (which must not see g2vlm_hf) can import `model_outputs` from it and compute exactly what the parent
computes with the package.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
IMAGES_DIR = TESTS_DIR.parent.parent / "shared" / "fixtures" / "official-tiny" / "images"
VIEWS = sorted(IMAGES_DIR.glob("view_*.png"))
TOKEN = "hf_g2vlm_offline_token"
SOURCE_DIR = TESTS_DIR.parent / "src" / "g2vlm_hf"
COLLECTED_AT = time.time()  # g2vlm_hf is imported by conftest.py just before the test modules import this one
QUESTION = "How far is the red box from the blue wall?"

# Prepended to every child script that must run without g2vlm_hf. The package is installed in editable mode, which
# puts it on sys.path through a .pth entry or an import hook; a meta-path finder placed first in `sys.meta_path`
# answers every `g2vlm_hf` import with ModuleNotFoundError whatever the mechanism, exactly as for a missing package.
# The script then checks that the import really fails, and at exit that no g2vlm_hf module was ever loaded.
HIDE_PACKAGE = textwrap.dedent(
    """
    import atexit, importlib.abc, sys

    class _HideG2VLM(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "g2vlm_hf" or name.startswith("g2vlm_hf."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
            return None

    sys.meta_path.insert(0, _HideG2VLM())
    try:
        import g2vlm_hf
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("g2vlm_hf is still importable")

    @atexit.register
    def _check_not_loaded():
        loaded = [name for name in sys.modules if name.split(".")[0] == "g2vlm_hf"]
        if loaded:
            print(f"g2vlm_hf modules were loaded: {loaded}", file=sys.stderr)
            sys.stderr.flush()
            import os
            os._exit(3)
    """
)


def run_without_package(
    code: str, workdir: Path, env: dict[str, str], timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter in which g2vlm_hf cannot be imported; raise with its output if it fails."""
    script = workdir / "child.py"
    script.write_text(
        HIDE_PACKAGE + f"sys.path.insert(0, {str(TESTS_DIR)!r})\n" + textwrap.dedent(code), encoding="utf-8"
    )
    env = {**env, "HF_MODULES_CACHE": str(workdir / "modules"), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"child failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def sources_changed_since_collection() -> list[str]:
    """Package modules edited on disk after this test session imported them (the remote code copied from disk would
    then differ from the code running in this process)."""
    return sorted(
        str(path.relative_to(SOURCE_DIR)) for path in SOURCE_DIR.rglob("*.py") if path.stat().st_mtime > COLLECTED_AT
    )


def fast_tiny_copy(converted: Path, destination: Path) -> Path:
    """A copy of the converted tiny checkpoint whose processor makes small inputs (geometry views 112 pixels wide,
    semantic images 112x112), so that every forward pass of the tests takes a fraction of a second."""
    shutil.copytree(converted, destination)
    config_file = destination / "processor_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    # the geometry settings: "image_processor" in the current layout, "geometry_image_processor" in the older one
    config.get("geometry_image_processor", config["image_processor"])["target_width"] = 112
    config["semantic_image_size"] = 112
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return destination


def folder_digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Relative path -> (sha256, mode) of every file under `folder`, to show it was not modified."""
    return {
        path.relative_to(folder).as_posix(): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def model_outputs(processor, full_model, recon_model=None, views=VIEWS, question: str = QUESTION) -> dict:
    """Inputs and outputs (tensors) of a chat forward pass, a short greedy generation and reconstructions.

    `recon_model` may be None. The same function runs in the parent (package installed) and in the children.
    """
    import torch

    messages = [
        {
            "role": "user",
            "content": [*({"type": "image", "image": str(v)} for v in views), {"type": "text", "text": question}],
        }
    ]
    chat = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    recon = processor(geometry_images=[str(v) for v in views], return_tensors="pt")
    out = {f"chat.{key}": value for key, value in chat.items()}
    out.update({f"recon_inputs.{key}": value for key, value in recon.items()})
    with torch.inference_mode():
        out["logits"] = full_model(**chat).logits
        out["generated"] = full_model.generate(**chat, max_new_tokens=4, do_sample=False)
        models = {"full": full_model, "recon_only": recon_model}
        for name, model in models.items():
            if model is None:
                continue
            scene = model.reconstruct(**recon)
            for field in ("camera_poses", "local_points", "world_points", "global_points", "depth", "confidence"):
                value = getattr(scene, field)
                if value is not None:
                    out[f"{name}.{field}"] = value
    return {key: value.contiguous() for key, value in out.items()}


__all__ = ["HIDE_PACKAGE", "TOKEN", "VIEWS", "fast_tiny_copy", "folder_digest", "model_outputs", "run_without_package"]
