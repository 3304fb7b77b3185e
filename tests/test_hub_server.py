"""The offline Hub server (tests/hub_server.py) driven by the real huggingface_hub / transformers clients.

Nothing of huggingface_hub is mocked: every call goes over HTTP to the local server. The Xet path is disabled
(see the module docstring of hub_server.py for what is not covered).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi, HfFileSystem, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `hub_server` is a sibling module, not a package
from hub_server import HubServer, running_hub_server

TOKEN = "hf_offline_test_token"
REPO = "user/tiny-model"


@pytest.fixture
def hub(tmp_path):
    with running_hub_server(hf_home=str(tmp_path / "hf_home")) as server:
        yield server
        unknown = [(r.method, r.path) for r in server.requests if r.kind == "unknown"]
        assert not unknown, f"huggingface_hub called endpoints the test server does not implement: {unknown}"


def _make_folder(folder: Path) -> dict[str, bytes]:
    """A small text file, a README with YAML front matter, a nested file and a ~1 MB safetensors file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("offline hub test\n")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "extra.json").write_text('{"a": 1}\n')
    save_file({"weight": np.arange(256 * 1024, dtype=np.float32)}, str(folder / "model.safetensors"))
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_upload_folder_goes_through_lfs_and_downloads_match(hub: HubServer, tmp_path: Path):
    local = _make_folder(tmp_path / "folder")
    assert len(local["model.safetensors"]) > 1_000_000
    api = HfApi(token=TOKEN)  # created inside the patched environment => talks to the test server

    url = api.create_repo(REPO)
    assert url.repo_id == REPO and url.startswith(hub.url)
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO)
    assert conflict.value.response.status_code == 409

    hub.clear_requests()
    commit = api.upload_folder(repo_id=REPO, folder_path=tmp_path / "folder", commit_message="add files")
    # The safetensors file (binary, matches *.safetensors) is uploaded through LFS, the text files inline.
    sha256 = hashlib.sha256(local["model.safetensors"]).hexdigest()
    lfs_puts = [r for r in hub.requests if r.kind == "lfs_upload"]
    assert [r.method for r in lfs_puts] == ["PUT"] and lfs_puts[0].path.endswith(sha256)
    assert lfs_puts[0].token is None  # like a presigned S3 URL: huggingface_hub sends no auth there
    assert hub.count("lfs_batch") == 1 and hub.count("lfs_verify") == 1 and hub.count("commit") == 1
    assert hub.count("validate_yaml") == 2  # README.md front matter: upload_folder and create_commit each check it
    assert all(r.token == TOKEN for r in hub.requests if r.kind in ("preupload", "lfs_batch", "commit"))
    assert hub.lfs_oids(REPO) == {sha256}

    infos = {i.path: i for i in api.get_paths_info(REPO, ["model.safetensors", "notes.txt", "sub", "missing"])}
    assert set(infos) == {"model.safetensors", "notes.txt", "sub"}
    assert infos["model.safetensors"].lfs.sha256 == sha256 and infos["model.safetensors"].size == len(
        local["model.safetensors"]
    )
    assert infos["notes.txt"].lfs is None

    info = api.model_info(REPO)
    assert info.sha == commit.oid == hub.head(REPO)
    assert {s.rfilename for s in info.siblings} == set(local) | {".gitattributes"}
    assert sorted(api.list_repo_files(REPO)) == sorted(set(local) | {".gitattributes"})
    assert [c.title for c in api.list_repo_commits(REPO)] == ["add files", "initial commit"]

    snapshot = Path(snapshot_download(REPO))
    assert Path(snapshot).name == commit.oid
    for name, content in local.items():
        downloaded = Path(hf_hub_download(REPO, name))
        assert downloaded.read_bytes() == content == (snapshot / name).read_bytes(), name
    assert hub.files(REPO) == {**local, ".gitattributes": (snapshot / ".gitattributes").read_bytes()}

    # Ranged reads (HfFileSystem issues `Range:` requests against /resolve).
    fs = HfFileSystem(token=TOKEN)
    with fs.open(f"{REPO}/model.safetensors", "rb", block_size=4096) as f:
        f.seek(500_000)
        assert f.read(1000) == local["model.safetensors"][500_000:501_000]
    assert any(r.kind == "resolve" and r.status == 206 for r in hub.requests)


def test_missing_file_repo_and_revision_raise_the_hub_errors(hub: HubServer):
    api = HfApi(token=TOKEN)
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"hello\n", path_in_repo="a.txt", repo_id=REPO)

    with pytest.raises(EntryNotFoundError) as missing_file:
        hf_hub_download(REPO, "does-not-exist.txt")
    assert isinstance(missing_file.value, RemoteEntryNotFoundError)
    assert missing_file.value.response.headers["X-Error-Code"] == "EntryNotFound"

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/no-such-repo", "a.txt")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("user/no-such-repo")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/no-such-repo")
    assert not api.repo_exists("user/no-such-repo") and api.repo_exists(REPO)

    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "a.txt", revision="no-such-branch")
    assert api.file_exists(REPO, "a.txt") and not api.file_exists(REPO, "b.txt")

    # A private repo is invisible without a token, readable with one.
    api.create_repo("user/private", private=True)
    api.upload_file(path_or_fileobj=b"secret\n", path_in_repo="s.txt", repo_id="user/private")
    with pytest.raises(RepositoryNotFoundError) as private:
        hf_hub_download("user/private", "s.txt", token=False)
    assert private.value.response.status_code == 401
    assert Path(hf_hub_download("user/private", "s.txt", token=TOKEN)).read_bytes() == b"secret\n"


def test_pinned_commit_branches_and_tags(hub: HubServer):
    api = HfApi(token=TOKEN)
    api.create_repo(REPO)
    c1 = api.upload_file(path_or_fileobj=b'{"v": 1}', path_in_repo="config.json", repo_id=REPO)
    c2 = api.upload_file(path_or_fileobj=b'{"v": 2}', path_in_repo="config.json", repo_id=REPO)
    assert c1.oid != c2.oid

    assert Path(hf_hub_download(REPO, "config.json")).read_bytes() == b'{"v": 2}'
    assert Path(hf_hub_download(REPO, "config.json", revision=c1.oid)).read_bytes() == b'{"v": 1}'
    assert (Path(snapshot_download(REPO, revision=c1.oid)) / "config.json").read_bytes() == b'{"v": 1}'

    api.create_branch(REPO, branch="dev", revision=c1.oid)
    api.create_branch(REPO, branch="dev", exist_ok=True)
    c3 = api.upload_file(path_or_fileobj=b'{"v": 3}', path_in_repo="config.json", repo_id=REPO, revision="dev")
    api.create_tag(REPO, tag="v1.0", revision=c1.oid)
    assert Path(hf_hub_download(REPO, "config.json", revision="dev")).read_bytes() == b'{"v": 3}'
    assert Path(hf_hub_download(REPO, "config.json", revision="v1.0")).read_bytes() == b'{"v": 1}'
    assert Path(hf_hub_download(REPO, "config.json")).read_bytes() == b'{"v": 2}'
    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": c2.oid, "dev": c3.oid}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0": c1.oid}

    # Re-uploading identical content is detected through the preupload `oid` => no new commit.
    hub.clear_requests()
    same = api.upload_file(path_or_fileobj=b'{"v": 2}', path_in_repo="config.json", repo_id=REPO)
    assert same.oid == c2.oid and hub.count("commit") == 0

    # Deletions and pull requests.
    api.delete_file("config.json", repo_id=REPO, revision="dev")
    assert "config.json" not in hub.files(REPO, revision="dev")
    pr = api.upload_file(path_or_fileobj=b"x", path_in_repo="pr.txt", repo_id=REPO, create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    assert Path(hf_hub_download(REPO, "pr.txt", revision=pr.pr_revision)).read_bytes() == b"x"


def test_require_token_answers_401_without_a_token(tmp_path: Path):
    with running_hub_server(require_token=True, hf_home=str(tmp_path / "home")) as hub:
        with pytest.raises(HfHubHTTPError) as no_token:
            HfApi(token=False).create_repo(REPO)
        assert no_token.value.response.status_code == 401
        assert "Authorization" in str(no_token.value)

        api = HfApi(token=TOKEN)
        api.create_repo(REPO)
        _make_folder(tmp_path / "folder")
        api.upload_folder(repo_id=REPO, folder_path=tmp_path / "folder")  # LFS PUT needs no token, as on S3

        with pytest.raises(HfHubHTTPError) as download:
            hf_hub_download(REPO, "notes.txt", token=False)
        assert download.value.response.status_code == 401
        assert Path(hf_hub_download(REPO, "notes.txt", token=TOKEN)).read_text() == "offline hub test\n"
        assert api.whoami()["name"] == "user"
        assert hub.count() > 0 and all(r.status != 401 or r.token is None for r in hub.requests)

    # A specific token: anything else is rejected the way the Hub rejects a bad token.
    with running_hub_server(require_token="the-right-one", hf_home=str(tmp_path / "home2")):
        with pytest.raises(HfHubHTTPError) as wrong:
            HfApi(token="a-wrong-one").create_repo(REPO)
        assert wrong.value.response.status_code == 401
        assert "Invalid credentials in Authorization header" in str(wrong.value)
        HfApi(token="the-right-one").create_repo(REPO)


def test_injected_commit_failure_then_retry_only_resends_what_is_missing(hub: HubServer, tmp_path: Path):
    local = _make_folder(tmp_path / "folder")
    api = HfApi(token=TOKEN)
    api.create_repo(REPO)
    initial = hub.head(REPO)

    hub.fail_next("commit")
    with pytest.raises(HfHubHTTPError) as failure:
        api.upload_folder(repo_id=REPO, folder_path=tmp_path / "folder")
    assert failure.value.response.status_code == 500
    assert hub.head(REPO) == initial and set(hub.files(REPO)) == {".gitattributes"}  # nothing committed
    assert hashlib.sha256(local["model.safetensors"]).hexdigest() in hub.lfs_oids(REPO)  # but the blob arrived

    hub.clear_requests()
    commit = api.upload_folder(repo_id=REPO, folder_path=tmp_path / "folder")
    assert hub.count("lfs_upload") == 0  # the LFS batch API reported the object as present => not re-sent
    assert hub.count("commit") == 1 and hub.head(REPO) == commit.oid
    assert {k: v for k, v in hub.files(REPO).items() if k != ".gitattributes"} == local


def test_multipart_lfs_upload_survives_a_failed_part(tmp_path: Path):
    local = _make_folder(tmp_path / "folder")
    with running_hub_server(hf_home=str(tmp_path / "home"), lfs_multipart_chunk_size=256 * 1024) as hub:
        api = HfApi(token=TOKEN)
        api.create_repo(REPO)
        hub.fail_next("lfs_upload", skip=2)  # the 3rd part PUT answers 500 once; huggingface_hub retries it (1 s)
        api.upload_folder(repo_id=REPO, folder_path=tmp_path / "folder")
        statuses = [r.status for r in hub.requests if r.kind == "lfs_upload"]
        n_parts = -(-len(local["model.safetensors"]) // (256 * 1024))
        assert statuses == [200, 200, 500] + [200] * (n_parts - 2)
        assert hub.count("lfs_complete") == 1
        assert Path(hf_hub_download(REPO, "model.safetensors")).read_bytes() == local["model.safetensors"]


def test_transformers_auto_classes_load_from_the_server(hub: HubServer, tmp_path: Path):
    import transformers

    folder = tmp_path / "bert"
    folder.mkdir()
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    config.save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "off", "##line"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    api = HfApi(token=TOKEN)
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=folder)

    loaded = transformers.AutoConfig.from_pretrained(REPO)
    assert isinstance(loaded, transformers.BertConfig)
    assert (loaded.hidden_size, loaded.num_hidden_layers, loaded.vocab_size) == (16, 1, 32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO)
    assert tokenizer.convert_ids_to_tokens(tokenizer("Hello offline world")["input_ids"]) == [
        "[CLS]", "hello", "off", "##line", "world", "[SEP]",
    ]  # fmt: skip
    assert any(r.kind == "resolve" and r.path.endswith("/vocab.txt") for r in hub.requests)


def test_subprocess_only_needs_the_environment(hub: HubServer):
    api = HfApi(token=TOKEN)
    api.create_repo(REPO)
    commit = api.upload_file(path_or_fileobj=b"from the child\n", path_in_repo="notes.txt", repo_id=REPO)
    script = textwrap.dedent(
        f"""
        from huggingface_hub import hf_hub_download, model_info
        print(model_info({REPO!r}).sha)
        print(open(hf_hub_download({REPO!r}, "notes.txt"), encoding="utf-8").read(), end="")
        """
    )
    hub.clear_requests()
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=hub.subprocess_env(token=TOKEN),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [commit.oid, "from the child"]
    assert hub.count("resolve") == 2 and all(r.token == TOKEN for r in hub.requests)  # HEAD + GET, HF_TOKEN used
    assert (Path(hub.hf_home) / "hub" / "models--user--tiny-model").is_dir()  # the child used HF_HUB_CACHE


def test_explicit_endpoint_without_patch_and_patch_is_reverted(tmp_path: Path, monkeypatch):
    # Without the patch, telemetry stays on and huggingface_hub would fetch its agent registry from the real Hub.
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    endpoint_before, env_before = hf_constants.ENDPOINT, os.environ.get("HF_ENDPOINT")
    with running_hub_server(patch_endpoint=False) as hub:
        assert hf_constants.ENDPOINT == endpoint_before  # nothing patched
        api = HfApi(endpoint=hub.url, token=TOKEN)
        api.create_repo(REPO)
        commit = api.upload_file(path_or_fileobj=b"explicit", path_in_repo="e.txt", repo_id=REPO)
        assert api.model_info(REPO).sha == commit.oid
        path = hf_hub_download(REPO, "e.txt", endpoint=hub.url, cache_dir=tmp_path / "cache", token=TOKEN)
        assert Path(path).read_bytes() == b"explicit"

    with running_hub_server() as hub:
        assert hf_constants.ENDPOINT == hub.url and os.environ["HF_ENDPOINT"] == hub.url
        assert hf_constants.HF_HUB_DISABLE_XET and hf_constants.HF_HUB_CACHE.startswith(hub.hf_home)
    assert hf_constants.ENDPOINT == endpoint_before and os.environ.get("HF_ENDPOINT") == env_before
    assert not Path(hub.hf_home).exists()  # the temporary HF_HOME is removed
