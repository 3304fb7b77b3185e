"""Issue 30, point 6: the examples run from a checkout anywhere (no ../shared), offline with --tiny and with a
one-line message otherwise; `g2vlm-convert --help` imports no torch; written weights get the usual file mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixture_paths import REPO_ROOT

from g2vlm_hf.conversion import save_component_shards


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=environment)


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> Path:
    """A copy of the repository's examples in a folder with no ../shared beside it."""
    root = tmp_path_factory.mktemp("elsewhere") / "clone"
    shutil.copytree(REPO_ROOT / "examples", root / "examples")
    assert not (root.parent / "shared").exists()
    return root


def test_the_quickstart_runs_offline_with_tiny_from_a_copy_elsewhere(elsewhere):
    result = run([sys.executable, "examples/quickstart.py", "--tiny"], elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "camera poses (1, 3, 4, 4)" in result.stdout and "answer:" in result.stdout
    assert (elsewhere / "outputs" / "g2vlm-tiny" / "config.json").is_file()
    # the other examples use the same tiny model, and what they write goes where asked
    scene = run([sys.executable, "examples/reconstruct_to_glb.py", "--tiny", "--output", "scene"], elsewhere)
    assert scene.returncode == 0, scene.stderr[-3000:]
    assert {Path(line).name for line in scene.stdout.split()} >= {"scene.glb", "points.ply", "cameras.json"}


def test_offline_the_quickstart_says_what_to_pass_in_one_line(elsewhere, tmp_path):
    result = run([sys.executable, str(elsewhere / "examples" / "quickstart.py")], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("quickstart.py: error: cannot download InternRobotics/G2VLM-2B-MoT")
    assert "--tiny" in message and "--model" in message


def test_an_example_without_a_model_says_what_to_pass(elsewhere, tmp_path):
    result = run([sys.executable, str(elsewhere / "examples" / "spatial_chat.py")], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no converted model in outputs/g2vlm-2b" in result.stderr and "--tiny" in result.stderr


HELP_THROUGH_THE_LAUNCHER = """
import sys
import g2vlm_hf_launcher

sys.argv = [sys.argv[1], "--help"]
try:
    getattr(g2vlm_hf_launcher, sys.argv[0].replace("-", "_"))()
except SystemExit as done:
    heavy = sorted(name for name in ("torch", "transformers", "g2vlm_hf") if name in sys.modules)
    print("imported:", heavy, "exit:", done.code)
"""


@pytest.mark.parametrize("script", ["g2vlm", "g2vlm-convert", "g2vlm-eval"])
def test_help_of_every_console_script_imports_no_torch(script, tmp_path):
    """`--help` of each console script ([project.scripts] -> g2vlm_hf_launcher) is answered before the package, torch
    and transformers are imported, and prints no warning."""
    result = run([sys.executable, "-c", HELP_THROUGH_THE_LAUNCHER, script], tmp_path)
    assert f"usage: {script}" in result.stdout, result.stderr[-2000:]
    assert "imported: [] exit: 0" in result.stdout
    assert result.stderr == ""  # no torchao / pytree warnings


@pytest.mark.parametrize(
    "argv",
    [
        ["g2vlm", "chat", "--model", "./typo-model", "--image", "a.png", "Where?"],
        ["g2vlm-convert", "missing-official", "converted"],
        ["g2vlm-eval", "depth", "--model", "m", "--data", "missing-data", "--output", "r.json"],
    ],
    ids=["g2vlm", "g2vlm-convert", "g2vlm-eval"],
)
def test_an_error_of_every_console_script_is_one_line_without_import_noise(argv, tmp_path):
    """An error found once the package is imported is the command's one line: nothing that torchao (a test extra,
    imported by transformers' quantizers) or torch's pytree log at import (g2vlm-convert printed four such lines)."""
    script = Path(sys.executable).with_name(argv[0])  # the console script pip installed
    result = run([str(script), *argv[1:]], tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() and all(
        line.startswith(f"{argv[0]}: error: ") for line in result.stderr.splitlines()
    ), result.stderr


def test_component_shards_get_the_usual_file_mode(tmp_path):
    source, output = tmp_path / "source", tmp_path / "output"
    source.mkdir()
    output.mkdir()
    from safetensors.torch import save_file

    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(source / "model.safetensors"))
    components = save_component_shards(source, output)
    mask = os.umask(0o022)
    os.umask(mask)
    written = sorted(path.name for path in output.iterdir())
    assert written == sorted(
        [*(name for names in components.values() for name in names), "model.safetensors.index.json"]
    )
    for path in output.iterdir():
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~mask), path.name
