"""A small offline Hugging Face Hub for tests: standard library only, HTTP on 127.0.0.1, state in memory.

It serves the part of the Hub's HTTP protocol that the public calls of huggingface_hub (1.x and 2.x) and
transformers make for model repositories: ``create_repo``, ``create_branch``, ``model_info`` / ``repo_info`` (with
or without a revision), ``list_repo_files`` / ``list_repo_tree``, ``preupload_lfs_files`` / ``create_commit`` /
``upload_file`` / ``upload_folder`` (preupload, LFS batch API, LFS PUT and verify, NDJSON commit), and downloads
through ``/{repo}/resolve/{revision}/{path}`` (``hf_hub_download``, ``snapshot_download``, ``from_pretrained``).

As on the real Hub, the LFS objects live on a separate storage host (``localhost``, a second port on 127.0.0.1): the
batch API hands out (signed) upload URLs there, and ``/resolve`` answers a file stored with LFS with a 302 redirect
to it, carrying the file's metadata (``X-Linked-Etag`` = sha256, ``X-Linked-Size``, ``X-Repo-Commit``); the client
must not follow it with its token.
A regular file is answered directly with ``ETag`` (its git blob id) and ``X-Repo-Commit``. Errors carry
``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and ``X-Error-Message``, which
huggingface_hub maps to its exception classes.

The server knows nothing of the clients: point them at it through their public configuration, in a process started
with ``HF_ENDPOINT=<server.url>`` and ``HF_HUB_DISABLE_XET=1`` in its environment (see ``hub_testing.hub_env``).

NOT covered: the Xet storage path (hence ``HF_HUB_DISABLE_XET=1``: uploads use the LFS protocol), datasets and
spaces, tags, pull requests, multipart LFS uploads, pagination, permissions beyond "a token is needed / this token
is accepted", size rules, README/YAML validation, rate limits.

Tests read its state directly (``files``, ``head``, ``lfs_oids``, ``requests``) and inject failures with
``fail_next(kind, status=..., skip=...)``; ``kind`` is one of ``KINDS``. Note that huggingface_hub retries 5xx
answers on most endpoints (not on ``commit``): use a 4xx status to make those fail at once.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import hmac
import itertools
import json
import os
import socket
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["KINDS", "HubServer", "RecordedRequest"]

KINDS = frozenset(
    {
        "create_repo", "repo_info", "tree", "branch", "preupload", "lfs_batch", "lfs_upload", "lfs_verify",
        "commit", "resolve", "storage_get", "validate_yaml", "unknown",
    }
)  # fmt: skip
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores regular (non-LFS) files up to 10 MB
# An abridged copy of the .gitattributes the Hub puts in the first commit of a repository.
_LFS_PATTERNS = "*.bin *.ckpt *.gguf *.h5 *.model *.npy *.npz *.onnx *.pt *.pth *.safetensors *.tar.gz *.zip"
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in _LFS_PATTERNS.split())


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra


@dataclass
class RecordedRequest:
    method: str
    path: str  # without the query string
    kind: str
    token: str | None
    status: int | None = None  # filled in once answered


@dataclass(frozen=True)
class _File:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def blob_id(self) -> str:  # git blob id of what git stores: the content, or the LFS pointer
        stored = self.pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()

    def tree_entry(self, path: str) -> dict:
        entry: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": len(self.data), "path": path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    date: str
    files: dict[str, _File]


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)  # objects on the storage origin, by sha256


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients' connection pools expect
    timeout = 30  # an idle kept-alive connection is closed after this
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall per response

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def _handle(self) -> None:
        hub, body = self.server.hub, self._body()
        status, headers, payload = hub._dispatch(self.server.role, self.command, self.path, self.headers, body)
        self.send_response(status)
        for key, value in {"Content-Length": str(len(payload)), **headers}.items():
            self.send_header(key, str(value).encode("latin-1", "replace").decode("latin-1"))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Close the kept-alive connections too, so that no handler thread outlives `stop()`."""
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class HubServer:
    """The Hub API on ``url`` and an LFS storage origin on another port; a context manager.

    Args:
        require_token: ``False``: requests need no token (a private repository needs one). ``True``: every request
            to the API needs ``Authorization: Bearer <any token>``, else 401. A string: only that token is accepted.
        username: the namespace of repositories created without one.
    """

    def __init__(self, *, require_token: bool | str = False, username: str = "user") -> None:
        self.require_token = require_token
        self.username = username
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._requests: list[RecordedRequest] = []
        self._faults: list[list] = []  # [kind, skip, times, status]
        self._counter = itertools.count()
        self._secret = os.urandom(16)
        self._servers: dict[str, _Server] = {}
        self._threads: list[threading.Thread] = []

    # -------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> HubServer:
        for role in ("api", "storage"):
            server = _Server(("127.0.0.1", 0), _Handler)
            server.hub, server.role, server.connections = self, role, set()
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
            thread.start()
            self._servers[role], self._threads = server, [*self._threads, thread]
        return self

    def stop(self) -> None:
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
            server.close_connections()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = {}, []

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _origin(self, role: str) -> str:
        host, port = self._servers[role].server_address[:2]
        return f"http://{host}:{port}"

    @property
    def url(self) -> str:
        """The endpoint (``HF_ENDPOINT``)."""
        return self._origin("api")

    @property
    def storage_url(self) -> str:
        """The storage origin, named `localhost` (it listens on 127.0.0.1 too): clients tell a CDN from the Hub by
        its host name (huggingface_hub 1.x ignores the port), and must not send it their token."""
        return self._origin("storage").replace("127.0.0.1", "localhost")

    # ------------------------------------------------------------------------------------------ for tests
    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def count(self, kind: str | None = None) -> int:
        return sum(1 for r in self.requests if kind is None or r.kind == kind)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def fail_next(self, kind: str, *, status: int = 500, skip: int = 0, times: int = 1) -> None:
        """Answer requests number ``skip+1`` to ``skip+times`` of ``kind`` (counted from now) with ``status``."""
        if kind not in KINDS:
            raise ValueError(f"Unknown request kind {kind!r}, expected one of {sorted(KINDS)}")
        with self._lock:
            self._faults.append([kind, skip, times, status])

    def repo_exists(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self._repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content of every file of ``repo_id`` at ``revision`` (a branch or a commit)."""
        with self._lock:
            repo = self._repos[repo_id]
            return {path: f.data for path, f in repo.commits[self._commit_oid(repo, revision)].files.items()}

    def lfs_oids(self, repo_id: str) -> set[str]:
        """sha256 of the LFS objects stored for ``repo_id``, committed or not."""
        with self._lock:
            return set(self._repos[repo_id].lfs)

    # ---------------------------------------------------------------------------------------- dispatching
    def _dispatch(self, role: str, method: str, target: str, headers: Any, body: bytes) -> tuple[int, dict, bytes]:
        split = urlsplit(target)
        parts = [unquote(p) for p in split.path.split("/") if p]
        auth = headers.get("Authorization") or ""
        token = auth[7:].strip() or None if auth.lower().startswith("bearer ") else None
        kind, handler = self._route(role, method, parts)
        record = RecordedRequest(method, unquote(split.path), kind, token)
        request = _Request(method, parts, parse_qs(split.query), headers, body, token)
        with self._lock:
            self._requests.append(record)
            fault = self._take_fault(kind)
            try:
                if fault is not None:
                    raise HttpError(fault, f"Injected failure of a {kind!r} request (test Hub server)")
                if role == "api" and kind != "unknown":
                    self._check_token(token)
                status, out_headers, payload = handler(request)
            except HttpError as e:
                out_headers = {"Content-Type": "application/json", "X-Error-Message": e.message, **e.headers}
                if e.code:
                    out_headers["X-Error-Code"] = e.code
                status, payload = e.status, json.dumps({"error": e.message, **e.extra}).encode()
            except Exception as e:
                out_headers, status = {"Content-Type": "application/json"}, 500
                payload = json.dumps(
                    {"error": f"test Hub server error: {e!r}", "trace": traceback.format_exc()}
                ).encode()
            record.status = status
        return status, out_headers, payload

    def _take_fault(self, kind: str) -> int | None:
        for fault in self._faults:
            if fault[0] != kind:
                continue
            if fault[1] > 0:
                fault[1] -= 1
                return None
            fault[2] -= 1
            self._faults = [f for f in self._faults if f[2] > 0]
            return fault[3]
        return None

    def _check_token(self, token: str | None) -> None:
        if self.require_token and token is None:
            raise HttpError(401, "Unauthorized: this server needs 'Authorization: Bearer <token>'")
        if isinstance(self.require_token, str) and token != self.require_token:
            raise HttpError(401, "Invalid credentials in Authorization header")  # the Hub's words, keyed on by clients

    def _route(self, role: str, method: str, p: list[str]) -> tuple[str, Any]:
        if role == "storage":  # signed URLs handed out by the LFS batch API and by /resolve redirects
            if len(p) == 3 and method == "PUT":
                return "lfs_upload", lambda r: self._storage_put(r, f"{p[0]}/{p[1]}", p[2])
            if len(p) == 3 and method in ("GET", "HEAD"):
                return "storage_get", lambda r: self._storage_get(r, f"{p[0]}/{p[1]}", p[2])
            return "unknown", self._unknown
        if p == ["api", "repos", "create"] and method == "POST":
            return "create_repo", self._create_repo
        if p == ["api", "validate-yaml"] and method == "POST":
            return "validate_yaml", lambda r: (200, {}, json.dumps({"errors": [], "warnings": []}).encode())
        if len(p) >= 4 and p[:2] == ["api", "models"]:
            repo_id, op, rest = f"{p[2]}/{p[3]}", (p[4] if len(p) > 4 else ""), p[5:]
            if method == "GET" and op == "" and not rest:
                return "repo_info", lambda r: self._repo_info(r, repo_id, "main")
            if method == "GET" and op == "revision" and len(rest) == 1:
                return "repo_info", lambda r: self._repo_info(r, repo_id, rest[0])
            if method == "GET" and op == "tree" and rest:
                return "tree", lambda r: self._tree(r, repo_id, rest[0], "/".join(rest[1:]))
            handlers = {"branch": self._branch, "preupload": self._preupload, "commit": self._commit}
            if method == "POST" and op in handlers and len(rest) == 1:
                return op, lambda r: handlers[op](r, repo_id, rest[0])
        if len(p) == 6 and p[1].endswith(".git") and p[2:5] == ["info", "lfs", "objects"] and method == "POST":
            repo_id = f"{p[0]}/{p[1][: -len('.git')]}"
            if p[5] == "batch":
                return "lfs_batch", lambda r: self._lfs_batch(r, repo_id)
            if p[5] == "verify":
                return "lfs_verify", lambda r: self._lfs_verify(r, repo_id)
        if len(p) >= 5 and p[2] == "resolve" and method in ("GET", "HEAD"):
            return "resolve", lambda r: self._resolve(r, f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]))
        return "unknown", self._unknown

    @staticmethod
    def _unknown(request: _Request) -> tuple:
        raise HttpError(404, f"Not implemented by the test Hub server: {request.method} /{'/'.join(request.parts)}")

    # ------------------------------------------------------------------------------------------- state
    def _repo(self, request: _Request, repo_id: str) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and request.token is None):
            # As the Hub: the same answer for a missing and a private repository; 401 without a token.
            raise HttpError(401 if request.token is None else 404, "Repository not found", code="RepoNotFound")
        return repo

    def _commit_oid(self, repo: _Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision.startswith("refs/heads/") and revision[11:] in repo.branches:
            return repo.branches[revision[11:]]
        if revision in repo.commits:
            return revision
        raise HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def _new_commit(self, repo: _Repo, parent: str | None, title: str, files: dict[str, _File]) -> _Commit:
        oid = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{title}\n{next(self._counter)}".encode()).hexdigest()
        repo.commits[oid] = commit = _Commit(oid, parent, title, _now(), files)
        return commit

    def _signed(self, repo_id: str, oid: str) -> str:
        path = f"/{repo_id}/{oid}"
        signature = hmac.new(self._secret, path.encode(), "sha256").hexdigest()[:32]
        return f"{self.storage_url}{quote(path)}?X-Signature={signature}"

    def _check_signature(self, request: _Request, repo_id: str, oid: str) -> None:
        given = (request.query.get("X-Signature") or [""])[0]
        if not hmac.compare_digest(self._signed(repo_id, oid).rsplit("=", 1)[1], given):
            raise HttpError(403, "Invalid or missing signature")
        if request.token is not None:
            raise HttpError(400, "The storage origin must not receive the Hub token")

    # ------------------------------------------------------------------------------------------ handlers
    def _create_repo(self, request: _Request) -> tuple:
        payload = _json_body(request)
        if payload.get("type", "model") not in (None, "model"):
            raise HttpError(400, "Only model repositories are supported by the test Hub server")
        repo_id = f"{payload.get('organization') or self.username}/{payload['name']}"
        if request.token is None:
            raise HttpError(401, "You must be logged in to create a repository")
        if repo_id in self._repos:
            raise HttpError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        repo = self._repos[repo_id] = _Repo(repo_id, private, _now())
        initial = self._new_commit(
            repo, None, "initial commit", {".gitattributes": _File(GITATTRIBUTES.encode(), False)}
        )
        repo.branches["main"] = initial.oid
        return _ok({"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _repo_info(self, request: _Request, repo_id: str, revision: str) -> tuple:
        repo = self._repo(request, repo_id)
        commit = repo.commits[self._commit_oid(repo, revision)]
        blobs = (request.query.get("blobs") or [""])[0].lower() == "true"
        siblings = []
        for path, f in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(f.data), blobId=f.blob_id)
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
            siblings.append(sibling)
        return _ok(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                "author": repo_id.split("/")[0], "sha": commit.oid, "lastModified": commit.date,
                "createdAt": repo.created_at, "private": repo.private, "gated": False, "disabled": False,
                "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            }
        )  # fmt: skip

    def _tree(self, request: _Request, repo_id: str, revision: str, folder: str) -> tuple:
        repo = self._repo(request, repo_id)
        commit = repo.commits[self._commit_oid(repo, revision)]
        recursive = (request.query.get("recursive") or [""])[0].lower() == "true"
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        dirs = {"/".join(path.split("/")[:i]) for path in commit.files for i in range(1, path.count("/") + 1)}
        if prefix and prefix[:-1] not in dirs:
            raise HttpError(404, f"Entry not found: {folder}", code="EntryNotFound")
        listed = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(dirs)
            if d.startswith(prefix) and (recursive or "/" not in d[len(prefix) :])
        ]
        listed += [
            f.tree_entry(path)
            for path, f in sorted(commit.files.items())
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])
        ]
        return _ok(listed)

    def _branch(self, request: _Request, repo_id: str, branch: str) -> tuple:
        repo = self._repo(request, repo_id)
        if branch in repo.branches:
            raise HttpError(409, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = self._commit_oid(repo, _json_body(request).get("startingPoint") or "main")
        return _ok({})

    def _preupload(self, request: _Request, repo_id: str, revision: str) -> tuple:
        repo = self._repo(request, repo_id)
        commit = repo.commits[self._commit_oid(repo, revision)]
        attributes = commit.files.get(".gitattributes", _File(b"", False)).data.decode(errors="replace")
        patterns = [line.split()[0] for line in attributes.splitlines() if "filter=lfs" in line.split()[1:]]
        answers = []
        for item in _json_body(request).get("files", []):
            path, size, sample = item["path"], int(item.get("size", 0)), base64.b64decode(item.get("sample") or "")
            lfs = (
                size >= LFS_THRESHOLD
                or b"\0" in sample
                or any(fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern) for pattern in patterns)
            )
            existing = commit.files.get(path)
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.blob_id)
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return _ok({"files": answers, "commitOid": commit.oid})

    def _lfs_batch(self, request: _Request, repo_id: str) -> tuple:
        repo = self._repo(request, repo_id)
        payload = _json_body(request)
        if payload.get("operation") != "upload":
            raise HttpError(400, "Only the 'upload' operation of the LFS batch API is implemented")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs:  # an object the storage already has gets no actions: the client skips it
                item["actions"] = {
                    "upload": {"href": self._signed(repo_id, oid), "header": {}},
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(item)
        return (
            200,
            {"Content-Type": "application/vnd.git-lfs+json"},
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
        )

    def _storage_put(self, request: _Request, repo_id: str, oid: str) -> tuple:
        self._check_signature(request, repo_id, oid)
        if hashlib.sha256(request.body).hexdigest() != oid:
            raise HttpError(400, f"The uploaded content does not match its sha256 {oid}")
        self._repos[repo_id].lfs[oid] = request.body
        return 200, {"ETag": f'"{hashlib.md5(request.body).hexdigest()}"'}, b""

    def _storage_get(self, request: _Request, repo_id: str, oid: str) -> tuple:
        self._check_signature(request, repo_id, oid)
        return _content(request, self._repos[repo_id].lfs[oid], {})

    def _lfs_verify(self, request: _Request, repo_id: str) -> tuple:
        repo, payload = self._repo(request, repo_id), _json_body(request)
        if len(repo.lfs.get(payload.get("oid"), b"")) != int(payload.get("size", -1)) or payload["oid"] not in repo.lfs:
            raise HttpError(404, f"LFS object {payload.get('oid')} not found (or of another size)")
        return _ok({})

    def _commit(self, request: _Request, repo_id: str, revision: str) -> tuple:
        repo = self._repo(request, repo_id)
        if request.query.get("create_pr"):
            raise HttpError(400, "Pull requests are not implemented by the test Hub server")
        if revision not in repo.branches:
            self._commit_oid(repo, revision)  # RevisionNotFound, or a commit oid:
            raise HttpError(400, f"Invalid rev id: {revision} is not a branch")
        try:
            lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        except ValueError:
            raise HttpError(400, "The commit payload is not NDJSON") from None
        header = next((line["value"] for line in lines if line["key"] == "header"), None)
        if header is None:
            raise HttpError(400, "The commit payload has no header")
        base = repo.branches[revision]
        if header.get("parentCommit") and header["parentCommit"] != base:
            raise HttpError(412, f"A commit has happened since {header['parentCommit']}. Please refresh and try again.")
        files = dict(repo.commits[base].files)
        for line in lines:
            key, value = line["key"], line.get("value") or {}
            path = str(value.get("path", ""))
            if key == "file":
                files[path] = _File(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                if value["oid"] not in repo.lfs:
                    raise HttpError(
                        400, f"Your push was rejected: the LFS object of {path} ({value['oid']}) is missing"
                    )
                files[path] = _File(repo.lfs[value["oid"]], True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HttpError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            elif key != "header":
                raise HttpError(400, f"Commit operation {key!r} is not implemented by the test Hub server")
        commit = self._new_commit(repo, base, str(header.get("summary") or ""), files)
        repo.branches[revision] = commit.oid
        url = f"{self.url}/{repo_id}/commit/{commit.oid}"
        return _ok({"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})

    def _resolve(self, request: _Request, repo_id: str, revision: str, path: str) -> tuple:
        repo = self._repo(request, repo_id)
        commit = repo.commits[self._commit_oid(repo, revision)]
        f = commit.files.get(path)
        if f is None:
            raise HttpError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{f.blob_id}"'}
        if f.lfs:  # the Hub redirects to its storage, with the metadata of the file on the redirect itself
            headers.update(
                {"Location": self._signed(repo_id, f.sha256), "X-Linked-Etag": f'"{f.sha256}"',
                 "X-Linked-Size": str(len(f.data))}
            )  # fmt: skip
            return 302, headers, b""
        return _content(request, f.data, headers)


@dataclass
class _Request:
    method: str
    parts: list[str]
    query: dict[str, list[str]]
    headers: Any
    body: bytes
    token: str | None


def _json_body(request: _Request) -> dict:
    try:
        return json.loads(request.body or b"{}")
    except ValueError:
        raise HttpError(400, "The request body is not JSON") from None


def _content(request: _Request, data: bytes, headers: dict) -> tuple[int, dict, bytes]:
    """`data`, or the part of it that a `Range: bytes=first-[last]` header asks for (206), as a download server."""
    headers = {**headers, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
    wanted = request.headers.get("Range") or ""
    first, _, last = wanted.removeprefix("bytes=").partition("-")
    if not wanted or not first.isdigit() or not (last.isdigit() or last == ""):
        return 200, headers, data
    start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
    if start > end:
        raise HttpError(416, f"Range not satisfiable: {wanted}", headers={"Content-Range": f"bytes */{len(data)}"})
    return 206, {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}, data[start : end + 1]


def _ok(data: Any) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(data).encode()
