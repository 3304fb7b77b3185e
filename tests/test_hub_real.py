"""Opt-in: push the tiny model to the real Hugging Face Hub and load it back (marker `real_hub`).

Everything else about the Hub is tested offline against tests/hub_server.py, which does not cover the Xet storage
path nor real-Hub behaviour (CDN redirects, permissions, rate limits, size rules, README validation). This test does,
when given a token with write access:

    G2VLM_REAL_HUB_TOKEN=hf_... python -m pytest -m real_hub tests/test_hub_real.py

It creates a private repository `<user>/g2vlm-hf-test-<random>`, pushes the converted tiny checkpoint (with remote
code, card and sha256 download-back check), loads it back pinned to the pushed commit, compares outputs with the local
model, and deletes the repository.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from transformers import AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_testing import fast_tiny_copy, model_outputs

from g2vlm_hf.conversion import push_to_hub

TOKEN_VARIABLE = "G2VLM_REAL_HUB_TOKEN"

pytestmark = [
    pytest.mark.real_hub,
    pytest.mark.skipif(
        not os.environ.get(TOKEN_VARIABLE),
        reason=f"pushes to the real Hugging Face Hub: set {TOKEN_VARIABLE} to a token with write access to run it",
    ),
]


def test_push_to_the_real_hub_and_load_back(converted_tiny, tmp_path):
    token = os.environ[TOKEN_VARIABLE]
    api = HfApi(token=token)
    repo_id = f"{api.whoami()['name']}/g2vlm-hf-test-{uuid.uuid4().hex[:8]}"
    folder = fast_tiny_copy(converted_tiny, tmp_path / "g2vlm-tiny")
    try:
        result = push_to_hub(folder, repo_id, token=token, private=True)
        remote = AutoModelForImageTextToText.from_pretrained(
            repo_id, revision=result.commit_oid, token=token, dtype=torch.float32
        ).eval()
        processor = AutoProcessor.from_pretrained(repo_id, revision=result.commit_oid, token=token)
        local = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        expected = model_outputs(AutoProcessor.from_pretrained(folder), local)
        actual = model_outputs(processor, remote)
        for key, value in expected.items():
            assert torch.equal(actual[key], value), key
    finally:
        api.delete_repo(repo_id, missing_ok=True)
