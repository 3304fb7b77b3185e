"""The test Hub server (tests/hub_server.py): its HTTP answers, and the real huggingface_hub / transformers against it.

The clients run in a child process configured through its environment only (`HF_ENDPOINT`, `HF_HUB_DISABLE_XET=1`,
`HF_HOME`, `HF_TOKEN`; see tests/hub_testing.py), as a user would configure them: nothing of them is patched. The
first test reads the wire directly with `http.client`, to pin what the server says the way the Hub says it.
"""

from __future__ import annotations

import hashlib
import http.client
import sys
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from huggingface_hub.errors import HfHubHTTPError
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules, not a package
from hub_server import HubServer
from hub_testing import TOKEN, HubClient, hub_env

REPO = "user/tiny-model"
IMPORTS = """
from pathlib import Path
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
api = HfApi()  # the token comes from HF_TOKEN, the endpoint from HF_ENDPOINT
"""


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server
        unknown = [(r.method, r.path) for r in server.requests if r.kind == "unknown"]
        assert not unknown, f"the clients called endpoints the test server does not implement: {unknown}"


@pytest.fixture(scope="module")
def client(hub, tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-home")
    with HubClient(hub_env(hub.url, home), tmp_path_factory.mktemp("client")) as child:
        child.run(IMPORTS)
        yield child


def make_folder(folder: Path) -> dict[str, bytes]:
    """A text file, a README with YAML front matter, a nested file and a ~1 MB safetensors file."""
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("offline hub test\n")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (folder / "sub" / "extra.json").write_text('{"a": 1}\n')
    save_file({"weight": np.arange(256 * 1024, dtype=np.float32)}, str(folder / "model.safetensors"))
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def request(url: str, method: str = "HEAD", token: str | None = None, **headers: str) -> http.client.HTTPResponse:
    """One request, redirects not followed."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    connection.request(method, target, headers=headers)
    response = connection.getresponse()
    response.body = response.read()
    connection.close()
    return response


def test_upload_folder_goes_through_lfs_and_downloads_back(hub, client, tmp_path):
    local = make_folder(tmp_path / "folder")
    url = client.run("api.create_repo(repo)", repo=REPO)
    assert url == f"{hub.url}/{REPO}" and client.run("api.create_repo(repo, exist_ok=True).repo_id") == REPO
    with pytest.raises(HfHubHTTPError) as conflict:  # raised in the child, sent back as itself
        client.run("api.create_repo(repo)")
    assert conflict.value.response.status_code == 409

    hub.clear_requests()
    commit = client.run("api.upload_folder(repo_id=repo, folder_path=folder, commit_message='add files').oid",
                        folder=tmp_path / "folder")  # fmt: skip
    sha256 = hashlib.sha256(local["model.safetensors"]).hexdigest()
    puts = [r for r in hub.requests if r.kind == "lfs_upload"]
    assert [r.path for r in puts] == [f"/{REPO}/{sha256}"] and puts[0].token is None  # a signed URL, no token
    assert [hub.count(kind) for kind in ("lfs_batch", "lfs_verify", "commit")] == [1, 1, 1]
    assert all(r.token == TOKEN for r in hub.requests if r.kind in ("preupload", "lfs_batch", "lfs_verify", "commit"))
    assert hub.lfs_oids(REPO) == {sha256} and hub.head(REPO) == commit
    assert hub.files(REPO) == {**local, ".gitattributes": hub.files(REPO)[".gitattributes"]}

    listing = client.run(
        """
        info = api.model_info(repo, files_metadata=True)
        lfs = {s.rfilename: s.lfs.sha256 if s.lfs else None for s in info.siblings}
        snapshot = Path(snapshot_download(repo))
        (info.sha, lfs, sorted(api.list_repo_files(repo)), snapshot.name,
         {name: (snapshot / name).read_bytes() for name in names},
         {name: Path(hf_hub_download(repo, name)).read_bytes() for name in names})
        """,
        names=sorted(local),
    )
    sha, lfs, files, snapshot_name, snapshot, downloads = listing
    assert sha == commit and snapshot_name == commit
    assert lfs == {".gitattributes": None, "README.md": None, "notes.txt": None, "sub/extra.json": None,
                   "model.safetensors": sha256}  # fmt: skip
    assert files == sorted([*local, ".gitattributes"]) and snapshot == local and downloads == local
    storage = [r for r in hub.requests if r.kind == "storage_get"]
    assert storage and all(r.token is None for r in storage)  # the token never left the Hub origin


def test_resolve_answers_like_the_hub(hub, client):
    repo = "user/wire"
    client.run("api.create_repo(repo); api.upload_file(path_or_fileobj=b'hello\\n', path_in_repo='a.txt', repo_id=repo)"
               "; api.upload_file(path_or_fileobj=b'\\0' * 100, path_in_repo='w.bin', repo_id=repo)", repo=repo)  # fmt: skip
    head = hub.head(repo)

    regular = request(f"{hub.url}/{repo}/resolve/main/a.txt")
    assert regular.status == 200 and regular.headers["X-Repo-Commit"] == head
    git_blob_id = hashlib.sha1(b"blob 6\0hello\n").hexdigest()
    assert regular.headers["ETag"] == f'"{git_blob_id}"'
    assert request(f"{hub.url}/{repo}/resolve/{head}/a.txt", "GET").body == b"hello\n"

    lfs = request(f"{hub.url}/{repo}/resolve/main/w.bin", token=TOKEN)
    sha256 = hashlib.sha256(bytes(100)).hexdigest()
    assert lfs.status == 302 and lfs.headers["X-Linked-Etag"] == f'"{sha256}"' and lfs.headers["X-Linked-Size"] == "100"
    location = lfs.headers["Location"]
    assert location.startswith(hub.storage_url) and hub.storage_url != hub.url  # another origin, as a CDN
    assert request(location, "GET").body == bytes(100)
    part = request(location, "GET", Range="bytes=90-")  # resuming a download
    assert part.status == 206 and part.headers["Content-Range"] == "bytes 90-99/100" and part.body == bytes(10)
    assert request(location, "GET", token=TOKEN).status == 400  # a client must not send its token there
    assert request(location.split("?")[0], "GET").status == 403  # unsigned

    missing = request(f"{hub.url}/{repo}/resolve/main/nope.txt")
    assert missing.status == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
    assert request(f"{hub.url}/{repo}/resolve/nope/a.txt").headers["X-Error-Code"] == "RevisionNotFound"
    no_repo = request(f"{hub.url}/user/nope/resolve/main/a.txt")
    assert no_repo.status == 401 and no_repo.headers["X-Error-Code"] == "RepoNotFound"


def test_missing_file_repo_and_revision_raise_the_hub_errors(client):
    outcome = client.run(
        """
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
        api.create_repo("user/errors")
        api.upload_file(path_or_fileobj=b"hello\\n", path_in_repo="a.txt", repo_id="user/errors")
        api.create_repo("user/private", private=True)
        api.upload_file(path_or_fileobj=b"secret\\n", path_in_repo="s.txt", repo_id="user/private")
        outcome = {}
        calls = {
            "missing file": lambda: hf_hub_download("user/errors", "nope.txt"),
            "missing repo": lambda: hf_hub_download("user/nope", "a.txt"),
            "missing repo (snapshot)": lambda: snapshot_download("user/nope"),
            "missing repo (info)": lambda: api.model_info("user/nope"),
            "missing revision": lambda: hf_hub_download("user/errors", "a.txt", revision="nope"),
            "private without token": lambda: hf_hub_download("user/private", "s.txt", token=False),
        }
        for name, call in calls.items():
            try:
                call()
                outcome[name] = None
            except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as error:
                outcome[name] = type(error).__name__
        outcome["private with token"] = Path(hf_hub_download("user/private", "s.txt")).read_bytes()
        outcome["exists"] = [api.repo_exists("user/errors"), api.repo_exists("user/nope"),
                             api.file_exists("user/errors", "a.txt"), api.file_exists("user/errors", "b.txt")]
        outcome
        """
    )
    assert outcome == {
        "missing file": "RemoteEntryNotFoundError",
        "missing repo": "RepositoryNotFoundError",
        "missing repo (snapshot)": "RepositoryNotFoundError",
        "missing repo (info)": "RepositoryNotFoundError",
        "missing revision": "RevisionNotFoundError",
        "private without token": "RepositoryNotFoundError",
        "private with token": b"secret\n",
        "exists": [True, False, True, False],
    }


def test_pinned_commits_branches_and_no_empty_commit(hub, client):
    c1, c2, c3 = client.run(
        """
        repo = "user/revisions"
        api.create_repo(repo)
        c1 = api.upload_file(path_or_fileobj=b'{"v": 1}', path_in_repo="config.json", repo_id=repo).oid
        c2 = api.upload_file(path_or_fileobj=b'{"v": 2}', path_in_repo="config.json", repo_id=repo).oid
        api.create_branch(repo, branch="dev", revision=c1)
        api.create_branch(repo, branch="dev", exist_ok=True)
        c3 = api.upload_file(path_or_fileobj=b'{"v": 3}', path_in_repo="config.json", repo_id=repo, revision="dev").oid
        c1, c2, c3
        """
    )
    assert len({c1, c2, c3}) == 3 and hub.head("user/revisions") == c2 and hub.head("user/revisions", "dev") == c3
    read = "Path(hf_hub_download('user/revisions', 'config.json', revision=revision)).read_bytes()"
    for revision, content in [(None, b'{"v": 2}'), (c1, b'{"v": 1}'), ("dev", b'{"v": 3}'), (c2, b'{"v": 2}')]:
        assert client.run(read, revision=revision) == content, revision
    assert (Path(client.run("snapshot_download('user/revisions', revision=c1)")) / "config.json").read_bytes() == (
        b'{"v": 1}'
    )

    hub.clear_requests()  # identical content: the preupload answer's oid says so, and no commit is made
    assert client.run("api.upload_file(path_or_fileobj=b'{\"v\": 2}', path_in_repo='config.json', "
                      "repo_id='user/revisions').oid") == c2  # fmt: skip
    assert hub.count("commit") == 0
    client.run("api.delete_file('config.json', repo_id='user/revisions', revision='dev')")
    assert "config.json" not in hub.files("user/revisions", "dev") and "config.json" in hub.files("user/revisions")


def test_tokens_are_required_and_checked(hub, client, tmp_path):
    hub.require_token = "the-right-one"
    try:
        outcome = client.run(
            """
            from huggingface_hub.errors import HfHubHTTPError
            outcome = []
            for token in (False, "a-wrong-one"):
                try:
                    HfApi(token=token).create_repo("user/guarded")
                except HfHubHTTPError as error:
                    outcome.append((error.response.status_code, str(error)))
            HfApi(token="the-right-one").create_repo("user/guarded")
            outcome
            """
        )
    finally:
        hub.require_token = False
    assert [status for status, _ in outcome] == [401, 401]
    assert "Invalid credentials in Authorization header" in outcome[1][1]
    assert hub.repo_exists("user/guarded")


def test_failed_commit_then_retry_sends_only_what_is_missing(hub, client, tmp_path):
    local = make_folder(tmp_path / "folder")
    client.run("api.create_repo('user/retry')")
    initial = hub.head("user/retry")
    hub.fail_next("commit")
    with pytest.raises(HfHubHTTPError) as failure:
        client.run("api.upload_folder(repo_id='user/retry', folder_path=folder)", folder=tmp_path / "folder")
    assert failure.value.response.status_code == 500
    assert hub.head("user/retry") == initial  # nothing committed, but the LFS object arrived
    assert hub.lfs_oids("user/retry") == {hashlib.sha256(local["model.safetensors"]).hexdigest()}

    hub.clear_requests()
    commit = client.run("api.upload_folder(repo_id='user/retry', folder_path=folder).oid")
    assert hub.count("lfs_upload") == 0 and hub.count("commit") == 1 and hub.head("user/retry") == commit
    assert {k: v for k, v in hub.files("user/retry").items() if k != ".gitattributes"} == local


def test_transformers_auto_classes_load_from_the_server(hub, client, tmp_path):
    names = client.run(
        """
        import transformers
        folder = workdir / "bert"
        transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32).save_pretrained(folder)
        (folder / "vocab.txt").write_text("\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world",
                                                      "off", "##line"]) + "\\n")
        (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
        api.create_repo("user/bert")
        api.upload_folder(repo_id="user/bert", folder_path=folder)
        config = transformers.AutoConfig.from_pretrained("user/bert")
        tokenizer = transformers.AutoTokenizer.from_pretrained("user/bert")
        (type(config).__name__, config.hidden_size, tokenizer.convert_ids_to_tokens(tokenizer("Hello offline world")["input_ids"]))
        """,
        workdir=tmp_path,
    )
    assert names == ("BertConfig", 16, ["[CLS]", "hello", "off", "##line", "world", "[SEP]"])
    head = hub.head("user/bert")
    assert any(r.kind == "resolve" and r.path == f"/user/bert/resolve/{head}/vocab.txt" for r in hub.requests)


def test_clients_take_the_hub_from_their_environment_and_are_bounded(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what this process has must not leak into the client
    monkeypatch.setenv("HF_TOKEN", "hf_not_this_one")
    with HubClient(hub_env(hub.url, tmp_path / "home"), tmp_path / "client", timeout=3) as child:
        seen = child.run("import os; {k: v for k, v in os.environ.items() if k.startswith(('HF_', 'HUGGINGFACE'))}")
        assert seen == {
            "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "home"),
            "HF_HUB_CACHE": str(tmp_path / "home" / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": TOKEN,
        }  # fmt: skip
        with pytest.raises(TimeoutError):
            child.run("import time; time.sleep(60)")
        assert child.process.poll() is not None  # killed, not left running


def test_a_client_without_the_package_cannot_import_it(hub, tmp_path):
    with HubClient(hub_env(hub.url, tmp_path / "home"), tmp_path / "client", without_package=True) as child:
        with pytest.raises(ModuleNotFoundError, match="g2vlm_hf"):
            child.run("import g2vlm_hf")
        path, hub_version = child.run("import sys, huggingface_hub; sys.path, huggingface_hub.__version__")
    import huggingface_hub

    assert hub_version == huggingface_hub.__version__  # the same site-packages, without g2vlm_hf
    source = str(Path(__file__).resolve().parents[1] / "src")
    assert not [entry for entry in path if entry.startswith(source)]
