"""The model card of a pushed checkpoint: metadata, conversion record, and runnable ```python snippets.

The checkpoints are pushed by a child process with g2vlm_hf (tests/hub_testing.py `HubClient`); the snippets are
taken from the README.md the (offline) Hub serves and run as written, each in a fresh namespace, in a child process
where g2vlm_hf does not exist (`without_package=True`): what a Hub user without the package would copy and run. NOT covered offline: the Xet storage path and real-Hub behaviour, including
the Hub's own README/YAML validation (the test server accepts any metadata).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import HubServer
from hub_testing import VIEWS, HubClient, fast_tiny_copy, hub_env

import g2vlm_hf

FULL, RECON = "user/card-full", "user/card-recon"
# Requests that come from other packages, not from G2VLM's code: on a CPU with AVX512-BF16, bitsandbytes (which peft
# imports in the LoRA snippet) asks the Hub for a kernels-community CPU kernel when `kernels` is installed (a hard
# dependency of transformers 5.25), and logs a warning when the publisher check fails.
NOT_OURS = {("GET", "/api/organizations/kernels-community/overview")}
PARITY = {"camera poses, fp32 (max. relative error)": "1.1e-6", "greedy tokens": "identical"}


@pytest.fixture(scope="module")
def hub(converted_tiny, tmp_path_factory):
    folder = fast_tiny_copy(converted_tiny, tmp_path_factory.mktemp("card") / "g2vlm-tiny")
    common = {"example_images": VIEWS, "source": "InternRobotics/G2VLM-2B-MoT", "source_revision": "abc1234"}
    work = tmp_path_factory.mktemp("card-clients")
    with HubServer() as server:
        with HubClient(hub_env(server.url, work / "home"), work / "publisher") as publisher:
            publisher.run(
                """
                from g2vlm_hf.conversion import push_to_hub
                push_to_hub(folder, full, parity=parity, **common)
                push_to_hub(folder, recon, reconstruction_only=True, **common)
                """,
                folder=folder, full=FULL, recon=RECON, parity=PARITY, common=common,
            )  # fmt: skip
        yield server
        unknown = [(r.method, r.path) for r in server.requests if r.kind == "unknown"]
        unknown = [request for request in unknown if request not in NOT_OURS]
        assert not unknown, f"endpoints the test server does not implement: {unknown}"


def card(hub, repo_id: str) -> ModelCard:
    """The model card the Hub serves for `repo_id` (parsed here: no request)."""
    return ModelCard(hub.files(repo_id)["README.md"].decode())


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.DOTALL | re.MULTILINE)


def test_card_metadata_and_conversion_record(hub):
    full = card(hub, FULL)
    data = full.data
    assert data.pipeline_tag == "image-text-to-text" and data.library_name == "transformers"
    assert data.license == "apache-2.0" and data.base_model == "InternRobotics/G2VLM-2B-MoT"
    assert {"3d-reconstruction", "spatial-reasoning", "custom_code"} <= set(data.tags)
    text = full.text
    assert f"g2vlm-hf {g2vlm_hf.__version__}" in text and "`InternRobotics/G2VLM-2B-MoT` (revision `abc1234`)" in text
    for name, value in PARITY.items():
        assert f"| {name} | {value} |" in text
    assert "`model-geometry-expert.safetensors`" in text and "`model-semantic-expert.safetensors`" in text
    assert "downloading every file back" in text

    recon = card(hub, RECON)
    assert recon.data.pipeline_tag == "image-to-3d" and "3d-reconstruction" in recon.data.tags
    assert "model-lm-head" not in recon.text and "AutoModel.from_pretrained" in recon.text


CHILD = """
import re
from pathlib import Path
from huggingface_hub import hf_hub_download

for repo_id in repo_ids:
    card = open(hf_hub_download(repo_id, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```python\\n(.*?)^```$", card, flags=re.DOTALL | re.MULTILINE)
    for number, block in enumerate(blocks):
        print(f"--- {repo_id} block {number}", flush=True)
        exec(compile(block, f"<{repo_id} README block {number}>", "exec"), {"__name__": "__main__"})
Path(hf_hub_download(repo_ids[0], "examples/view_0.png")).read_bytes()
"""


def test_every_python_block_of_the_pushed_cards_runs(hub, tmp_path):
    full_blocks = python_blocks(card(hub, FULL).content)
    recon_blocks = python_blocks(card(hub, RECON).content)
    assert len(full_blocks) == 3 and len(recon_blocks) == 2  # chat, reconstruction, LoRA / reconstruction, LoRA
    assert all(f'repo_id = "{FULL}"' in block for block in full_blocks)
    assert any('target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]' in block for block in full_blocks)

    with HubClient(hub_env(hub.url, tmp_path / "home"), tmp_path / "user", without_package=True) as user:
        example = user.run(CHILD, repo_ids=[FULL, RECON])
        output = user.stdout
        loaded = user.run("import sys; [name for name in sys.modules if name.split('.')[0] == 'g2vlm_hf']")
    assert loaded == [] and output.count("--- ") == 5
    assert "torch.Size([1, 3, 4, 4])" in output  # camera poses of the three example views
    assert "trainable params" in output  # the LoRA recipes ran
    assert example == VIEWS[0].read_bytes()
