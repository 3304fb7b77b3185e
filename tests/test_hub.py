"""Pushing converted checkpoints to the Hub (`g2vlm_hf.conversion.push_to_hub`, `g2vlm-convert --push-to-hub`).

Everything that talks to the Hub runs in a child process (`HubClient`, tests/hub_testing.py) whose environment points
the real huggingface_hub and transformers at the offline Hub server of tests/hub_server.py (`HF_ENDPOINT`,
`HF_HUB_DISABLE_XET=1`, `HF_HOME`, `HF_TOKEN`); nothing of them is patched. This process reads the server's state
and computes the reference outputs from the local folder. NOT covered offline: the Xet storage path (uploads use
the LFS protocol) and real-Hub behaviour (permissions, rate limits, size rules); `tests/test_hub_real.py` pushes to
the real Hub when a token is given (opt-in marker `real_hub`).
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
from safetensors.torch import load, load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules, not a package
from conftest import FIXTURE_DIR
from hub_server import HubServer
from hub_testing import TOKEN, VIEWS, HubClient, fast_tiny_copy, folder_digest, hub_env, model_outputs

from g2vlm_hf.conversion import (
    COMPONENTS,
    SHARD_OF_PART,
    HubAuthError,
    HubPushError,
    HubVerificationError,
    build_reconstruction_only,
    component_of,
    save_component_shards,
)
from g2vlm_hf.modeling.parts import part_of

REPO = "user/g2vlm-tiny"
PARITY = {"camera poses, fp32 (max. relative error)": "1e-6", "greedy tokens": "identical"}


def assert_same_tensors(expected: dict, actual: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


def lfs_uploads(hub) -> list[str]:
    """sha256 of the LFS objects PUT to the server since the last `clear_requests()`."""
    return [r.path.rsplit("/", 1)[-1] for r in hub.requests if r.kind == "lfs_upload" and r.status == 200]


CLIENT_IMPORTS = """
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
from g2vlm_hf.conversion import push_to_hub, verify_upload
from g2vlm_hf.conversion.cli import main as convert_cli
from hub_testing import model_outputs
"""


def hub_client(server: HubServer, workdir: Path, token: str | None = TOKEN) -> HubClient:
    """A child process with g2vlm_hf, pointed at `server` by its environment (the token in HF_TOKEN)."""
    client = HubClient(hub_env(server.url, workdir / "hf-home", token), workdir / "client")
    client.run(CLIENT_IMPORTS)
    return client


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server
        unknown = [(r.method, r.path) for r in server.requests if r.kind == "unknown"]
        assert not unknown, f"endpoints the test server does not implement: {unknown}"


@pytest.fixture(scope="module")
def client(hub, tmp_path_factory):
    with hub_client(hub, tmp_path_factory.mktemp("hub-client")) as child:
        yield child


@pytest.fixture(scope="module")
def tiny(converted_tiny, tmp_path_factory) -> Path:
    """The converted tiny checkpoint, with a processor that makes small inputs (fast forward passes)."""
    return fast_tiny_copy(converted_tiny, tmp_path_factory.mktemp("hub") / "g2vlm-tiny")


def push(client: HubClient, folder: Path, repo_id: str, **kwargs):
    """`push_to_hub(folder, repo_id, **kwargs)` in the child (the token comes from its HF_TOKEN)."""
    return client.run("push_to_hub(folder, repo_id, **kwargs)", folder=folder, repo_id=repo_id, kwargs=kwargs)


@pytest.fixture(scope="module")
def pushed(hub, client, tiny):
    before = folder_digest(tiny)
    hub.clear_requests()
    result = push(client, tiny, REPO, example_images=VIEWS, parity=PARITY, source="official-tiny")
    return result, before, hub.requests


@pytest.fixture(scope="module")
def local_full(tiny):
    model = AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny)


def test_push_uploads_component_shards_config_code_and_card(hub, pushed, tiny):
    result, before, requests = pushed
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
        assert shard == f"model-{SHARD_OF_PART[part_of(name)]}.safetensors", name
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

    # The download-back check fetched every file of the commit: regular files from /resolve, the weights from the
    # storage origin /resolve redirected to, without the token.
    prefix = f"/{REPO}/resolve/{result.commit_oid}/"
    fetched = {r.path[len(prefix) :] for r in requests if r.kind == "resolve" and r.path.startswith(prefix)}
    assert fetched == set(result.files)
    from_storage = {r.path.rsplit("/", 1)[-1] for r in requests if r.kind == "storage_get"}
    assert from_storage >= {result.files[shard] for shard in shards} and all(
        r.token is None for r in requests if r.kind in ("storage_get", "lfs_upload")
    )


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
    with pytest.raises(ValueError, match="belongs to no part of G2VLM"):
        component_of("model.something_new.weight")


@pytest.mark.parametrize("code", ["package", "remote"])
def test_from_pretrained_reproduces_the_local_model(pushed, client, local_full, code):
    # The Auto classes serve the installed package even with trust_remote_code=True (transformers prefers registered
    # local code), so the pushed modeling and processing files are loaded by name from the repository here, as
    # the dynamic-module loader does for a user without the package (tests/test_remote_code.py runs that case).
    module, outputs = client.run(
        """
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        if code == "remote":
            model_class = get_class_from_dynamic_module("modeling_g2vlm.G2VLMForConditionalGeneration", repo)
            processor_class = get_class_from_dynamic_module("processing_g2vlm.G2VLMProcessor", repo)
        else:
            model_class, processor_class = AutoModelForImageTextToText, AutoProcessor
        model = model_class.from_pretrained(repo, dtype=torch.float32).eval()
        (type(model).__module__, model_outputs(processor_class.from_pretrained(repo), model))
        """,
        repo=REPO,
        code=code,
    )
    if code == "remote":
        assert module.startswith("transformers_modules.") and module.endswith(".modeling_g2vlm"), module
    else:
        assert module == "g2vlm_hf.modeling.modeling_g2vlm"
    local_model, local_processor = local_full
    assert_same_tensors(model_outputs(local_processor, local_model), outputs)


def test_reconstruction_only_folder_and_push(hub, client, tiny, local_full, tmp_path):
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
    result = push(client, tiny, "user/g2vlm-tiny-recon", reconstruction_only=True)
    assert folder_digest(tiny) == before
    assert result.reconstruction_only and "lm-head" not in str(sorted(result.files))
    # the local outputs carry their manifest (an owned output); a push never publishes it
    assert (folder / ".g2vlm-output").is_file() and (tiny / ".g2vlm-output").is_file()
    assert ".g2vlm-output" not in hub.files("user/g2vlm-tiny-recon")
    assert json.loads(hub.files("user/g2vlm-tiny-recon")["config.json"])["auto_map"]["AutoModel"] == (
        "modeling_g2vlm.G2VLMForReconstruction"
    )
    code = """
    model = AutoModel.from_pretrained(source, dtype=torch.float32).eval()
    with torch.inference_mode():
        scene = model.reconstruct(**AutoProcessor.from_pretrained(source)(geometry_images=views, return_tensors="pt"))
    (type(model).__name__, {field: getattr(scene, field) for field in fields})
    """
    fields = ("camera_poses", "local_points", "world_points", "global_points", "depth")
    for source in (folder, "user/g2vlm-tiny-recon"):  # the local folder, and the Hub through the child
        class_name, scene = client.run(code, source=source, views=[str(v) for v in VIEWS], fields=fields)
        assert class_name == "G2VLMForReconstruction"
        for field in fields:
            assert torch.equal(scene[field], getattr(expected, field)), (source, field)


def test_pinned_revisions_and_branches(hub, client, tiny, tmp_path):
    repo = "user/pinned"
    first = push(client, tiny, repo, verify=False)
    changed = tmp_path / "changed"
    shutil.copytree(tiny, changed)
    weights = load_file(changed / "model.safetensors")
    original_head = weights["lm_head.weight"].clone()
    weights["lm_head.weight"] = weights["lm_head.weight"] * 2
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})

    hub.clear_requests()
    second = push(client, changed, repo, commit_message="Scale the LM head")
    assert second.commit_oid != first.commit_oid and hub.head(repo) == second.commit_oid
    # Component shards: only the changed component is uploaded again.
    assert lfs_uploads(hub) == [second.files["model-lm-head.safetensors"]]
    changed_files = [
        path for path, digest in second.files.items() if path.endswith(".safetensors") and digest != first.files[path]
    ]
    assert changed_files == ["model-lm-head.safetensors"]
    on_branch = push(client, tiny, repo, revision="dev", commit_message="Original weights", verify=False)
    assert hub.head(repo, "dev") == on_branch.commit_oid and hub.head(repo) == second.commit_oid

    heads = client.run(
        """
        load = lambda revision: AutoModelForImageTextToText.from_pretrained(repo, revision=revision, dtype=torch.float32)
        heads = {name: load(revision).lm_head.weight for name, revision in revisions.items()}
        heads, AutoConfig.from_pretrained(repo, revision=revisions["pinned"]).model_type
        """,
        repo=repo,
        revisions={"pinned": first.commit_oid, "latest": None, "branch": "dev"},
    )
    assert heads[1] == "g2vlm"
    assert torch.equal(heads[0]["pinned"], original_head.float())
    assert torch.equal(heads[0]["latest"], 2 * original_head.float())
    assert torch.equal(heads[0]["branch"], original_head.float())


def test_rerun_sends_nothing_already_on_the_hub(hub, client, pushed, tiny):
    result, _, _ = pushed
    hub.clear_requests()
    again = push(client, tiny, REPO, example_images=VIEWS, parity=PARITY, source="official-tiny")
    assert again.commit_oid == result.commit_oid  # no empty commit
    assert hub.count("lfs_upload") == 0 and hub.count("commit") == 0


def test_failed_commit_then_resume_uploads_no_lfs_object_twice(hub, client, tiny):
    repo = "user/resume-commit"
    before = folder_digest(tiny)
    hub.clear_requests()
    hub.fail_next("commit", status=500)
    with pytest.raises(HubPushError) as failure:
        push(client, tiny, repo)
    message = str(failure.value)
    assert "commit" in message and "HTTP 500" in message and "was not modified" in message and "Re-run" in message
    assert folder_digest(tiny) == before
    first_run = lfs_uploads(hub)
    assert len(first_run) == len(COMPONENTS) and hub.lfs_oids(repo) == set(first_run)
    assert set(hub.files(repo)) == {".gitattributes"}  # nothing committed

    hub.clear_requests()
    result = push(client, tiny, repo)
    assert lfs_uploads(hub) == [] and hub.count("lfs_batch") == len(COMPONENTS) and hub.count("commit") == 1
    assert hub.head(repo) == result.commit_oid and folder_digest(tiny) == before


def test_failed_lfs_upload_then_resume_sends_only_the_missing_shards(hub, client, tiny):
    repo = "user/resume-lfs"
    hub.clear_requests()
    hub.fail_next("lfs_upload", status=403, skip=2)  # 403 is not retried: the third shard fails at once
    with pytest.raises(HubPushError) as failure:
        push(client, tiny, repo)
    first_run = lfs_uploads(hub)
    assert len(first_run) == 2
    message = str(failure.value)
    assert "HTTP 403" in message and "Nothing was committed" in message and "was not modified" in message
    uploaded = message.split("Weight shards already on the Hub: ")[1].split(";")[0].split(", ")
    failed = message.split("failed while uploading ")[1].split(" ")[0]
    assert len(uploaded) == 2 and failed.endswith(".safetensors") and failed not in uploaded

    hub.clear_requests()
    result = push(client, tiny, repo)
    second_run = lfs_uploads(hub)
    assert {result.files[name] for name in uploaded} == set(first_run)  # the message named what reached the Hub
    assert not set(second_run) & set(first_run)
    assert set(first_run) | set(second_run) == {
        digest for path, digest in result.files.items() if path.endswith(".safetensors")
    }


def test_verification_fails_loudly_on_a_mismatch(client, pushed):
    result, _, _ = pushed
    verify = "verify_upload(repo, commit, expected)"
    client.run(verify, repo=REPO, commit=result.commit_oid, expected=result.files)  # what the push checked
    wrong = {**result.files, "config.json": "0" * 64, "not-uploaded.json": "0" * 64}
    with pytest.raises(HubVerificationError) as failure:
        client.run(verify, repo=REPO, commit=result.commit_oid, expected=wrong)
    message = str(failure.value)
    assert f"config.json: sha256 {result.files['config.json']} on the Hub, {'0' * 64} uploaded" in message
    assert "not-uploaded.json: cannot be downloaded" in message
    assert "model-lm-head.safetensors" not in message


def test_invalid_repo_id_fails_before_any_request(hub, client, tiny):
    hub.clear_requests()
    with pytest.raises(ValueError, match="Invalid Hub repository id 'not a/valid id'"):
        push(client, tiny, "not a/valid id")
    argv = [str(FIXTURE_DIR / "checkpoint"), "unused", "--push-to-hub", "a/b/c", "--token", TOKEN]
    assert client.run("convert_cli(argv)", argv=argv) == 2
    assert "Invalid Hub repository id" in client.stderr
    assert hub.requests == []


def test_token_errors_are_clear_and_leave_the_folder_intact(tiny, tmp_path):
    before = folder_digest(tiny)
    with HubServer(require_token="the-only-token") as strict, hub_client(strict, tmp_path, token=None) as client:
        with pytest.raises(HubAuthError, match="needs a token"):
            push(client, tiny, "user/needs-token")
        output = tmp_path / "never-converted"
        argv = [str(FIXTURE_DIR / "checkpoint"), str(output), "--push-to-hub", "user/needs-token"]
        assert client.run("convert_cli(argv)", argv=argv) == 1
        assert "needs a token" in client.stderr and not output.exists()  # checked before converting
        assert strict.requests == []  # refused before any network access
        with pytest.raises(HubAuthError, match="HTTP 401"):
            push(client, tiny, "user/needs-token", token="hf_wrong_token")
        assert not strict.repo_exists("user/needs-token")
        assert push(client, tiny, "user/needs-token", token="the-only-token", private=True).commit_oid
        assert client.run(
            "from huggingface_hub import HfApi; HfApi(token='the-only-token').model_info('user/needs-token').private"
        )
    assert folder_digest(tiny) == before


def test_cli_converts_pushes_and_resumes(hub, client, tmp_path):
    output = tmp_path / "recon"  # no --token: the child's HF_TOKEN
    argv = [
        str(FIXTURE_DIR / "checkpoint"),
        str(output),
        "--reconstruction-only",
        "--push-to-hub",
        "user/cli-recon",
        "--parity",
        "poses=1e-6",
        "--commit-message",
        "First upload",
    ]  # fmt: skip (the token: HF_TOKEN)
    cli = "convert_cli(argv)"
    assert client.run(cli, argv=argv) == 0
    assert "Pushed to user/cli-recon@main" in client.stdout and "verified by sha256" in client.stdout
    assert json.loads((output / "config.json").read_text())["model_type"] == "g2vlm_reconstruction"
    assert client.run("type(AutoModel.from_pretrained('user/cli-recon')).__name__") == "G2VLMForReconstruction"
    assert "| poses | 1e-6 |" in hub.files("user/cli-recon")["README.md"].decode()

    hub.clear_requests()
    assert client.run(cli) == 0  # OUTPUT exists: pushed as it is, nothing re-sent
    assert "pushing it as it is" in client.stdout
    assert hub.count("lfs_upload") == 0 and hub.count("commit") == 0
    assert client.run(cli, argv=[*argv[:2], "--push-to-hub", "user/cli-recon"]) == 2  # kind mismatch
    assert "--overwrite" in client.stderr
