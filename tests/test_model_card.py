"""The model card of a pushed checkpoint: metadata, conversion record, and runnable ```python snippets.

The snippets are taken from the README.md the (offline) Hub serves and run as written, each in a fresh namespace, in
a child process where g2vlm_hf cannot be imported (see `HIDE_PACKAGE` in tests/hub_testing.py): what a Hub user
without the package would copy and run. NOT covered offline: the Xet storage path and real-Hub behaviour, including
the Hub's own README/YAML validation (the test server accepts any metadata).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, hf_hub_download

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import running_hub_server
from hub_testing import TOKEN, VIEWS, fast_tiny_copy, run_without_package

import g2vlm_hf
from g2vlm_hf.conversion import push_to_hub

FULL, RECON = "user/card-full", "user/card-recon"
PARITY = {"camera poses, fp32 (max. relative error)": "1.1e-6", "greedy tokens": "identical"}


@pytest.fixture(scope="module")
def hub(converted_tiny, tmp_path_factory):
    folder = fast_tiny_copy(converted_tiny, tmp_path_factory.mktemp("card") / "g2vlm-tiny")
    common = {
        "token": TOKEN,
        "example_images": VIEWS,
        "source": "InternRobotics/G2VLM-2B-MoT",
        "source_revision": "abc1234",
    }
    with running_hub_server() as server:
        push_to_hub(folder, FULL, parity=PARITY, **common)
        push_to_hub(folder, RECON, reconstruction_only=True, **common)
        yield server


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.DOTALL | re.MULTILINE)


def test_card_metadata_and_conversion_record(hub):
    card = ModelCard.load(FULL)
    data = card.data
    assert data.pipeline_tag == "image-text-to-text" and data.library_name == "transformers"
    assert data.license == "apache-2.0" and data.base_model == "InternRobotics/G2VLM-2B-MoT"
    assert {"3d-reconstruction", "spatial-reasoning", "custom_code"} <= set(data.tags)
    text = card.text
    assert f"g2vlm-hf {g2vlm_hf.__version__}" in text and "`InternRobotics/G2VLM-2B-MoT` (revision `abc1234`)" in text
    for name, value in PARITY.items():
        assert f"| {name} | {value} |" in text
    assert "`model-geometry-expert.safetensors`" in text and "`model-semantic-expert.safetensors`" in text
    assert "downloading every file back" in text

    recon = ModelCard.load(RECON)
    assert recon.data.pipeline_tag == "image-to-3d" and "3d-reconstruction" in recon.data.tags
    assert "model-lm-head" not in recon.text and "AutoModel.from_pretrained" in recon.text


CHILD = """
import re, sys
from huggingface_hub import hf_hub_download

for repo_id in sys.argv[1:]:
    card = open(hf_hub_download(repo_id, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```python\\n(.*?)^```$", card, flags=re.DOTALL | re.MULTILINE)
    for number, block in enumerate(blocks):
        print(f"--- {repo_id} block {number}", flush=True)
        exec(compile(block, f"<{repo_id} README block {number}>", "exec"), {"__name__": "__main__"})
"""


def test_every_python_block_of_the_pushed_cards_runs(hub, tmp_path):
    full_blocks = python_blocks(ModelCard.load(FULL).content)
    recon_blocks = python_blocks(ModelCard.load(RECON).content)
    assert len(full_blocks) == 3 and len(recon_blocks) == 2  # chat, reconstruction, LoRA / reconstruction, LoRA
    assert all(f'repo_id = "{FULL}"' in block for block in full_blocks)
    assert any('target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]' in block for block in full_blocks)

    script = CHILD.replace("sys.argv[1:]", repr([FULL, RECON]))
    result = run_without_package(script, tmp_path, hub.subprocess_env(token=TOKEN))
    assert result.stdout.count("--- ") == 5
    assert "torch.Size([1, 3, 4, 4])" in result.stdout  # camera poses of the three example views
    assert "trainable params" in result.stdout  # the LoRA recipes ran
    assert Path(hf_hub_download(FULL, "examples/view_0.png")).read_bytes() == VIEWS[0].read_bytes()
