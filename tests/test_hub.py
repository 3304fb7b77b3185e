"""Pushing converted checkpoints to the Hub (`g2vlm_hf.conversion.push_to_hub`, `g2vlm-convert --push-to-hub`).

Every call goes over HTTP to the offline Hub server of `tests/hub_server.py` through the real huggingface_hub and
transformers clients (nothing of them is mocked). NOT covered offline: the Xet storage path (the server runs with
`HF_HUB_DISABLE_XET=1`, so uploads use the LFS protocol) and real-Hub behaviour (CDN redirects, permissions, rate
limits, size rules); `tests/test_hub_real.py` pushes to the real Hub when a token is given (opt-in marker
`real_hub`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load, load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules, not a package
from conftest import FIXTURE_DIR
from hub_server import running_hub_server
from hub_testing import TOKEN, VIEWS, fast_tiny_copy, folder_digest, model_outputs

from g2vlm_hf import G2VLMForConditionalGeneration, G2VLMForReconstruction
from g2vlm_hf.conversion import (
    COMPONENTS,
    HubAuthError,
    HubPushError,
    HubVerificationError,
    build_reconstruction_only,
    component_of,
    push_to_hub,
    save_component_shards,
    verify_upload,
)
from g2vlm_hf.conversion.cli import main as convert_cli

REPO = "user/g2vlm-tiny"
PARITY = {"camera poses, fp32 (max. relative error)": "1e-6", "greedy tokens": "identical"}


def expected_component(name: str) -> str:
    """An independent statement of the shard layout (see g2vlm_hf/conversion/sharding.py)."""
    if name.startswith("model.visual."):
        return "semantic-encoder"
    if name.startswith(("model.geometry_encoder.", "model.geometry_projector.")):
        return "geometry-encoder"
    if name.startswith("model.language_model.embed_tokens."):
        return "embeddings"
    if name.startswith("model.language_model."):
        return "geometry-expert" if any(part.startswith("geo_") for part in name.split(".")) else "semantic-expert"
    if name.startswith("geometry_heads."):
        return "geometry-heads"
    assert name.startswith("lm_head."), name
    return "lm-head"


def assert_same_tensors(expected: dict, actual: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


def lfs_uploads(hub) -> list[str]:
    """sha256 of the LFS objects PUT to the server since the last `clear_requests()`."""
    return [r.path.rsplit("/", 1)[-1] for r in hub.requests if r.kind == "lfs_upload" and r.status == 200]


@pytest.fixture(scope="module")
def hub():
    with running_hub_server() as server:
        yield server
        unknown = [(r.method, r.path) for r in server.requests if r.kind == "unknown"]
        assert not unknown, f"endpoints the test server does not implement: {unknown}"


@pytest.fixture(scope="module")
def tiny(converted_tiny, tmp_path_factory) -> Path:
    """The converted tiny checkpoint, with a processor that makes small inputs (fast forward passes)."""
    return fast_tiny_copy(converted_tiny, tmp_path_factory.mktemp("hub") / "g2vlm-tiny")


@pytest.fixture(scope="module")
def pushed(hub, tiny):
    before = folder_digest(tiny)
    result = push_to_hub(tiny, REPO, token=TOKEN, example_images=VIEWS, parity=PARITY, source="official-tiny")
    return result, before


@pytest.fixture(scope="module")
def local_full(tiny):
    model = AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny)


def test_push_uploads_component_shards_config_code_and_card(hub, pushed, tiny):
    result, before = pushed
    assert folder_digest(tiny) == before, "the pushed folder was modified"
    files = hub.files(REPO, result.commit_oid)
    served_digests = {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}
    assert {path: digest for path, digest in served_digests.items() if path != ".gitattributes"} == result.files

    shards = sorted(path for path in files if path.endswith(".safetensors"))
    assert shards == sorted(f"model-{component}.safetensors" for component in COMPONENTS)
    index = json.loads(files["model.safetensors.index.json"])
    local = load_file(tiny / "model.safetensors")
    assert sorted(index["weight_map"]) == sorted(local)
    for name, shard in index["weight_map"].items():
        assert shard == f"model-{expected_component(name)}.safetensors", name
    served = {}
    for shard in shards:
        served.update(load(files[shard]))
    assert_same_tensors(local, served)

    for name in ("config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "README.md",
                 *(f"examples/{view.name}" for view in VIEWS)):  # fmt: skip
        assert name in files, name
    config = json.loads(files["config.json"])
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_g2vlm.G2VLMForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_g2vlm.G2VLMConfig"
    for name in ("processor_config.json", "tokenizer_config.json"):
        assert json.loads(files[name])["auto_map"] == {"AutoProcessor": "processing_g2vlm.G2VLMProcessor"}
    for reference in config["auto_map"].values():
        assert f"{reference.split('.')[0]}.py" in files


def test_a_component_past_max_shard_size_is_split_and_still_loads(tiny, tmp_path):
    components = save_component_shards(tiny, tmp_path, max_shard_size="4MB")
    heads = components["geometry-heads"]  # about 14 MB in float32
    assert len(heads) > 1 and heads[0] == f"model-geometry-heads-00001-of-{len(heads):05d}.safetensors"
    assert all(len(files) == 1 for name, files in components.items() if name != "geometry-heads")
    for name in os.listdir(tiny):
        if not name.endswith(".safetensors"):
            shutil.copy(tiny / name, tmp_path / name)
    resharded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32)
    reference = AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.float32)
    assert_same_tensors(reference.state_dict(), resharded.state_dict())
    with pytest.raises(ValueError, match="belongs to no G2VLM component"):
        component_of("model.something_new.weight")


def test_from_pretrained_reproduces_the_local_model(pushed, local_full):
    hub_model = AutoModelForImageTextToText.from_pretrained(REPO, dtype=torch.float32).eval()
    hub_processor = AutoProcessor.from_pretrained(REPO)
    assert type(hub_model) is G2VLMForConditionalGeneration  # the installed package's class, not the remote code
    local_model, local_processor = local_full
    assert_same_tensors(model_outputs(local_processor, local_model), model_outputs(hub_processor, hub_model))


def test_reconstruction_only_folder_and_push(hub, tiny, local_full, tmp_path):
    folder = build_reconstruction_only(tiny, tmp_path / "recon")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "g2vlm_reconstruction" and config["vision_config"] is None
    assert config["architectures"] == ["G2VLMForReconstruction"]
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert not [name for name in weight_map if name.startswith(("model.visual.", "lm_head."))]
    assert not (folder / "generation_config.json").exists()

    full_model, processor = local_full
    inputs = processor(geometry_images=[str(v) for v in VIEWS], return_tensors="pt")
    with torch.inference_mode():
        expected = full_model.reconstruct(**inputs)
    before = folder_digest(tiny)
    result = push_to_hub(tiny, "user/g2vlm-tiny-recon", token=TOKEN, reconstruction_only=True)
    assert folder_digest(tiny) == before
    assert result.reconstruction_only and "lm-head" not in str(sorted(result.files))
    assert json.loads(hub.files("user/g2vlm-tiny-recon")["config.json"])["auto_map"]["AutoModel"] == (
        "modeling_g2vlm.G2VLMForReconstruction"
    )
    for source in (folder, "user/g2vlm-tiny-recon"):
        model = AutoModel.from_pretrained(source, dtype=torch.float32).eval()
        assert type(model) is G2VLMForReconstruction
        with torch.inference_mode():
            scene = model.reconstruct(
                **AutoProcessor.from_pretrained(source)(geometry_images=[str(v) for v in VIEWS], return_tensors="pt")
            )
        for field in ("camera_poses", "local_points", "world_points", "global_points", "depth"):
            assert torch.equal(getattr(scene, field), getattr(expected, field)), (source, field)


def test_pinned_revisions_and_branches(hub, tiny, tmp_path):
    repo = "user/pinned"
    first = push_to_hub(tiny, repo, token=TOKEN, verify=False)
    changed = tmp_path / "changed"
    shutil.copytree(tiny, changed)
    weights = load_file(changed / "model.safetensors")
    original_head = weights["lm_head.weight"].clone()
    weights["lm_head.weight"] = weights["lm_head.weight"] * 2
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})

    hub.clear_requests()
    second = push_to_hub(changed, repo, token=TOKEN, commit_message="Scale the LM head")
    assert second.commit_oid != first.commit_oid and hub.head(repo) == second.commit_oid
    # Component shards: only the changed component is uploaded again.
    assert lfs_uploads(hub) == [second.files["model-lm-head.safetensors"]]
    changed_files = [
        path for path, digest in second.files.items() if path.endswith(".safetensors") and digest != first.files[path]
    ]
    assert changed_files == ["model-lm-head.safetensors"]

    pinned = AutoModelForImageTextToText.from_pretrained(repo, revision=first.commit_oid, dtype=torch.float32)
    latest = AutoModelForImageTextToText.from_pretrained(repo, dtype=torch.float32)
    assert torch.equal(pinned.lm_head.weight, original_head.float())
    assert torch.equal(latest.lm_head.weight, 2 * original_head.float())
    assert AutoConfig.from_pretrained(repo, revision=first.commit_oid).model_type == "g2vlm"

    on_branch = push_to_hub(tiny, repo, token=TOKEN, revision="dev", commit_message="Original weights", verify=False)
    assert hub.head(repo, "dev") == on_branch.commit_oid and hub.head(repo) == second.commit_oid
    branch_model = AutoModelForImageTextToText.from_pretrained(repo, revision="dev", dtype=torch.float32)
    assert torch.equal(branch_model.lm_head.weight, original_head.float())


def test_rerun_sends_nothing_already_on_the_hub(hub, pushed, tiny):
    result, _ = pushed
    hub.clear_requests()
    again = push_to_hub(tiny, REPO, token=TOKEN, example_images=VIEWS, parity=PARITY, source="official-tiny")
    assert again.commit_oid == result.commit_oid  # no empty commit
    assert hub.count("lfs_upload") == 0 and hub.count("commit") == 0


def test_failed_commit_then_resume_uploads_no_lfs_object_twice(hub, tiny):
    repo = "user/resume-commit"
    before = folder_digest(tiny)
    hub.clear_requests()
    hub.fail_next("commit", status=500)
    with pytest.raises(HubPushError) as failure:
        push_to_hub(tiny, repo, token=TOKEN)
    message = str(failure.value)
    assert "commit" in message and "HTTP 500" in message and "was not modified" in message and "Re-run" in message
    assert folder_digest(tiny) == before
    first_run = lfs_uploads(hub)
    assert len(first_run) == len(COMPONENTS) and hub.lfs_oids(repo) == set(first_run)
    assert set(hub.files(repo)) == {".gitattributes"}  # nothing committed

    hub.clear_requests()
    result = push_to_hub(tiny, repo, token=TOKEN)
    assert lfs_uploads(hub) == [] and hub.count("lfs_batch") == len(COMPONENTS) and hub.count("commit") == 1
    assert hub.head(repo) == result.commit_oid and folder_digest(tiny) == before


def test_failed_lfs_upload_then_resume_sends_only_the_missing_shards(hub, tiny):
    repo = "user/resume-lfs"
    hub.clear_requests()
    hub.fail_next("lfs_upload", status=403, skip=2)  # 403 is not retried: the third shard fails at once
    with pytest.raises(HubPushError) as failure:
        push_to_hub(tiny, repo, token=TOKEN)
    first_run = lfs_uploads(hub)
    assert len(first_run) == 2
    message = str(failure.value)
    assert "HTTP 403" in message and "Nothing was committed" in message and "was not modified" in message
    uploaded = message.split("Weight shards already on the Hub: ")[1].split(";")[0].split(", ")
    failed = message.split("failed while uploading ")[1].split(" ")[0]
    assert len(uploaded) == 2 and failed.endswith(".safetensors") and failed not in uploaded

    hub.clear_requests()
    result = push_to_hub(tiny, repo, token=TOKEN)
    second_run = lfs_uploads(hub)
    assert {result.files[name] for name in uploaded} == set(first_run)  # the message named what reached the Hub
    assert not set(second_run) & set(first_run)
    assert set(first_run) | set(second_run) == {
        digest for path, digest in result.files.items() if path.endswith(".safetensors")
    }


def test_verification_fails_loudly_on_a_mismatch(pushed):
    result, _ = pushed
    verify_upload(REPO, result.commit_oid, result.files, token=TOKEN)  # what the push checked
    wrong = {**result.files, "config.json": "0" * 64, "not-uploaded.json": "0" * 64}
    with pytest.raises(HubVerificationError) as failure:
        verify_upload(REPO, result.commit_oid, wrong, token=TOKEN)
    message = str(failure.value)
    assert f"config.json: sha256 {result.files['config.json']} on the Hub, {'0' * 64} uploaded" in message
    assert "not-uploaded.json: cannot be downloaded" in message
    assert "model-lm-head.safetensors" not in message


def test_invalid_repo_id_fails_before_any_request(hub, tiny, capsys):
    hub.clear_requests()
    with pytest.raises(ValueError, match="Invalid Hub repository id 'not a/valid id'"):
        push_to_hub(tiny, "not a/valid id", token=TOKEN)
    assert convert_cli([str(FIXTURE_DIR / "checkpoint"), "unused", "--push-to-hub", "a/b/c", "--token", TOKEN]) == 2
    assert "Invalid Hub repository id" in capsys.readouterr().err
    assert hub.requests == []


def test_token_errors_are_clear_and_leave_the_folder_intact(tiny, tmp_path, capsys):
    before = folder_digest(tiny)
    with running_hub_server(require_token="the-only-token") as strict:
        with pytest.raises(HubAuthError, match="needs a token"):
            push_to_hub(tiny, "user/needs-token")
        output = tmp_path / "never-converted"
        assert convert_cli([str(FIXTURE_DIR / "checkpoint"), str(output), "--push-to-hub", "user/needs-token"]) == 1
        assert "needs a token" in capsys.readouterr().err and not output.exists()  # checked before converting
        assert strict.requests == []  # refused before any network access
        with pytest.raises(HubAuthError, match="HTTP 401"):
            push_to_hub(tiny, "user/needs-token", token="hf_wrong_token")
        assert not strict.repo_exists("user/needs-token")
        assert push_to_hub(tiny, "user/needs-token", token="the-only-token", private=True).commit_oid
        assert HfApi(token="the-only-token").model_info("user/needs-token").private is True
    assert folder_digest(tiny) == before


def test_cli_converts_pushes_and_resumes(hub, tmp_path, capsys):
    output = tmp_path / "recon"
    argv = [str(FIXTURE_DIR / "checkpoint"), str(output), "--reconstruction-only", "--push-to-hub", "user/cli-recon",
            "--token", TOKEN, "--parity", "poses=1e-6", "--commit-message", "First upload"]  # fmt: skip
    assert convert_cli(argv) == 0
    out = capsys.readouterr().out
    assert "Pushed to user/cli-recon@main" in out and "verified by sha256" in out
    assert json.loads((output / "config.json").read_text())["model_type"] == "g2vlm_reconstruction"
    assert type(AutoModel.from_pretrained("user/cli-recon")) is G2VLMForReconstruction
    assert "| poses | 1e-6 |" in hub.files("user/cli-recon")["README.md"].decode()

    hub.clear_requests()
    assert convert_cli(argv) == 0  # OUTPUT exists: pushed as it is, nothing re-sent
    assert "pushing it as it is" in capsys.readouterr().out
    assert hub.count("lfs_upload") == 0 and hub.count("commit") == 0
    assert convert_cli([*argv[:2], "--push-to-hub", "user/cli-recon", "--token", TOKEN]) == 2  # kind mismatch
    assert "--overwrite" in capsys.readouterr().err
