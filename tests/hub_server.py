"""A minimal, offline Hugging Face Hub server for tests (standard library only).

What this is
------------
An in-memory implementation of the part of the Hub HTTP protocol that ``huggingface_hub`` 2.4 uses for model
repos (datasets/spaces URLs are routed the same way): ``create_repo`` / ``delete_repo`` / ``whoami``,
``upload_folder`` / ``upload_file`` / ``create_commit`` (preupload, LFS batch API, LFS PUT (basic and optional
multipart), LFS verify, NDJSON commit), branches / tags / PR refs, ``model_info`` / ``repo_info``,
``list_repo_tree`` / ``get_paths_info`` / ``list_repo_refs`` / ``list_repo_commits`` and file downloads through
``/{repo}/resolve/{revision}/{path}`` (HEAD + GET, ``Range``), so ``hf_hub_download``, ``snapshot_download`` and
``transformers``' ``from_pretrained`` work against it. It runs a ``ThreadingHTTPServer`` on 127.0.0.1 (ephemeral
port) in a background thread.

What this is NOT -- read before trusting a green test
-----------------------------------------------------
* The **Xet storage path is not covered**: clients must run with ``HF_HUB_DISABLE_XET=1`` (the helpers below set
  it), so uploads go through the legacy LFS protocol and downloads through plain ``/resolve``. Everything
  ``hf_xet`` does (chunking, CAS, xet tokens, ``_upload_pipeline`` multi-commit uploads) is untested offline.
* **Real-Hub behaviour is not covered**: no CDN redirects for LFS files (they are served directly by
  ``/resolve``), no per-user permissions (any ``Bearer`` token is accepted unless one specific token is
  required), no gated repos, no rate limits, no pagination, no size limits / 10 MB regular-file rule enforcement,
  approximate ``.gitattributes`` / ``.gitignore`` matching, no README/YAML validation (always valid), no
  ``copy`` of LFS files across repos (``/lfs-files/duplicate``), no safetensors/security metadata. The real Hub
  is served over https; this one over http, which changes one client quirk: ``huggingface_hub`` only turns a 401
  into ``RepositoryNotFoundError`` for ``https://`` URLs, so here a 401 stays a plain ``HfHubHTTPError``
  (``RepositoryNotFoundError`` is a subclass, so ``except HfHubHTTPError`` + ``.response.status_code == 401``
  works against both).

Usage in a test (same process)
------------------------------
::

    from hub_server import running_hub_server

    def test_roundtrip(tmp_path):
        with running_hub_server() as hub:          # server + endpoint patch + temp HF_HOME/HF_HUB_CACHE
            api = HfApi(token="hf_test")           # or HfApi(endpoint=hub.url, token=...)
            api.create_repo("user/tiny")
            api.upload_folder(repo_id="user/tiny", folder_path=...)
            path = hf_hub_download("user/tiny", "config.json")
            assert hub.count("lfs_upload") == 1
            hub.fail_next("commit")                # next commit request answers HTTP 500

``running_hub_server(require_token=True)`` answers 401 to any request without ``Authorization: Bearer ...``
(``require_token="secret"`` additionally rejects any other token). Create ``HfApi()`` objects *inside* the
``with`` block (or pass ``endpoint=hub.url``): an ``HfApi`` reads the endpoint when it is constructed.

Usage from a subprocess
-----------------------
``huggingface_hub`` reads ``HF_ENDPOINT`` at import time, so a fresh interpreter only needs the environment::

    subprocess.run([...], env=hub.subprocess_env(token="hf_test"))

which sets ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET=1``, ``HF_HOME``/``HF_HUB_CACHE`` (the temp dir),
``HF_HUB_DISABLE_TELEMETRY=1`` and removes offline / token / staging variables inherited from the parent.

Fault injection and request log
-------------------------------
Every request is appended to ``hub.requests`` as a ``RecordedRequest(method, path, kind, query, status,
token)``; ``kind`` is one of ``KINDS``. ``hub.fail_next(kind, times=1, status=500, skip=0)`` makes the requests
of that kind number ``skip+1 .. skip+times`` (counted from now) fail before they are processed. Note that
``huggingface_hub`` retries 408/429/5xx with exponential backoff (1 s, 2 s, 4 s, ...) on ``preupload``,
``lfs_batch``, ``lfs_upload``, ``lfs_verify``, ``tree`` and ``commits`` (so one injected 500 there is retried
and the call still succeeds, one second later); ``commit``, ``create_repo``, ``repo_info`` and ``paths_info`` are
not retried; a failed ``resolve`` HEAD surfaces as ``LocalEntryNotFoundError`` unless the file is cached. Use a
non-retried status (e.g. 400/403) to make a retried endpoint fail at once.

Environment notes
-----------------
The in-process patch (``running_hub_server`` / ``hub_endpoint``) removes ``HF_TOKEN`` & co. and points the token
file into the temp ``HF_HOME`` for its duration, so pass tokens explicitly (``HfApi(token=...)``, ``token=...``).
It also disables telemetry: otherwise huggingface_hub fetches an "agent harnesses" registry from ``ENDPOINT``
when it first builds a user-agent (without the patch, that request goes to the real Hub).
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "KINDS",
    "EndpointPatch",
    "HubServer",
    "RecordedRequest",
    "apply_hub_endpoint_patch",
    "hub_endpoint",
    "hub_subprocess_env",
    "running_hub_server",
]

# Kinds of requests, for `fail_next` and the request log.
KINDS = frozenset(
    {
        "whoami",
        "create_repo",
        "delete_repo",
        "repo_settings",
        "repo_info",
        "tree",
        "paths_info",
        "refs",
        "commits",
        "branch",
        "tag",
        "preupload",
        "lfs_batch",
        "lfs_upload",  # PUT of an LFS object (basic transfer) or of one multipart part
        "lfs_complete",  # POST completing a multipart LFS upload
        "lfs_verify",
        "lfs_download",
        "commit",
        "resolve",
        "validate_yaml",
        "other",  # telemetry, agent-harnesses registry
        "unknown",  # anything this server does not implement (answered 404)
    }
)

REPO_TYPES = ("model", "dataset", "space")
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub's limit for regular (non-LFS) files
_LFS_SPEC = "version https://git-lfs.github.com/spec/v1\n"

# The `.gitattributes` the Hub puts in the initial commit of a new repo (abridged).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib",
        "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar",
        "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(oid: str, size: int) -> bytes:
    return f"{_LFS_SPEC}oid sha256:{oid}\nsize {size}\n".encode()


def _is_binary_sample(sample: bytes) -> bool:
    if b"\x00" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(sample) - 4  # tolerate a multi-byte character cut by the 512-byte sample
    return False


def _match_pattern(pattern: str, path: str) -> bool:
    """Approximate gitattributes/gitignore matching: patterns without '/' match the basename."""
    pattern = pattern.strip()
    if not pattern:
        return False
    if pattern.endswith("/"):
        return path.startswith(pattern.lstrip("/")) or f"/{pattern}" in f"/{path}"
    if "/" in pattern.strip("/"):
        return fnmatch.fnmatchcase(path, pattern.lstrip("/"))
    return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern.strip("/"))


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(data: Any, status: int = 200, content_type: str = "application/json") -> _Response:
    return _Response(status, json.dumps(data).encode(), {"Content-Type": content_type})


@dataclass
class RecordedRequest:
    """One request received by the server (``status`` is filled in once answered)."""

    method: str
    path: str  # decoded path, without query string
    kind: str
    query: dict[str, list[str]]
    token: str | None
    status: int | None = None


@dataclass
class _Request:
    method: str
    path: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: Any
    body: bytes
    token: str | None

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise _HttpError(400, "Request body is not valid JSON") from None

    def flag(self, name: str) -> bool:
        return (self.query.get(name) or [""])[-1].lower() in ("1", "true", "yes")


@dataclass
class _Entry:
    path: str
    size: int
    blob_id: str  # git sha1 of the content (regular) or of the LFS pointer (LFS)
    lfs_oid: str | None = None  # sha256 of the content for LFS files
    pointer_size: int | None = None

    def to_json(self, last_commit: dict | None = None) -> dict:
        data: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.lfs_oid is not None:
            data["lfs"] = {"oid": self.lfs_oid, "size": self.size, "pointerSize": self.pointer_size}
        if last_commit is not None:
            data["lastCommit"] = last_commit
        return data


@dataclass
class _Commit:
    oid: str
    parent: str | None
    files: dict[str, _Entry]
    title: str
    message: str
    date: str
    author: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)  # regular file contents, by git blob sha
    lfs: dict[str, bytes] = field(default_factory=dict)  # LFS objects, by sha256
    lfs_parts: dict[str, dict[int, bytes]] = field(default_factory=dict)  # pending multipart uploads


class _Handler(BaseHTTPRequestHandler):
    server_version = "TestHubServer/1.0"
    # HTTP/1.0: one request per connection. No keep-alive => no idle handler threads blocking shutdown and no stale
    # pooled connections in huggingface_hub's shared client once a test server is gone.
    protocol_version = "HTTP/1.0"
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline()
                if not size_line:
                    break
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        try:
            body = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        response = hub._handle_request(self.command, self.path, self.headers, body)
        try:
            self.send_response(response.status)
            headers = {"Content-Length": str(len(response.body)), **response.headers}
            for key, value in headers.items():
                # http.server encodes headers as latin-1: keep non-latin-1 paths in messages from crashing it.
                self.send_header(key, str(value).encode("latin-1", "replace").decode("latin-1"))
            self.end_headers()
            if self.command != "HEAD" and response.body:
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    allow_reuse_address = True


class HubServer:
    """In-memory Hub protocol server. Use as a context manager or call ``start()`` / ``stop()``.

    Args:
        require_token: ``False`` (default): tokens are optional (private repos still need one).
            ``True``: every request except the presigned-style LFS object URLs needs ``Authorization: Bearer <any>``,
            else 401. A string (or collection of strings): only those tokens are accepted.
        username: the user returned by ``whoami`` and used as namespace for repo ids without one.
        lfs_threshold: files of at least this size are uploaded through LFS (in addition to ``.gitattributes``
            patterns and binary content).
        lfs_multipart_chunk_size: if set, LFS objects bigger than this are uploaded with the multipart transfer
            (``chunk_size`` + one PUT per part + completion POST) instead of a single PUT.
    """

    def __init__(
        self,
        *,
        require_token: bool | str | Collection[str] = False,
        username: str = "user",
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        lfs_multipart_chunk_size: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if isinstance(require_token, str):
            self._valid_tokens: frozenset[str] | None = frozenset({require_token})
        elif require_token is True or require_token is False:
            self._valid_tokens = None
        else:
            self._valid_tokens = frozenset(require_token)
        self.require_token = bool(require_token)
        self.username = username
        self.lfs_threshold = lfs_threshold
        self.lfs_multipart_chunk_size = lfs_multipart_chunk_size
        self.hf_home: str | None = None  # set by `running_hub_server` when it patches the environment
        self._host = host
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._requests: list[RecordedRequest] = []
        self._faults: list[list[Any]] = []  # [kind, skip, times, status]
        self._counter = itertools.count()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> HubServer:
        if self._httpd is not None:
            return self
        httpd = _Server((self._host, 0), _Handler)
        httpd.hub = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="test-hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> HubServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------------------------ test-facing helpers
    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of all requests received so far (oldest first)."""
        with self._lock:
            return list(self._requests)

    def count(self, kind: str | None = None, method: str | None = None) -> int:
        return sum(
            1 for r in self.requests if (kind is None or r.kind == kind) and (method is None or r.method == method)
        )

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def fail_next(self, kind: str, times: int = 1, *, status: int = 500, skip: int = 0) -> None:
        """Make requests of ``kind`` number ``skip+1`` to ``skip+times`` (counted from now) fail with ``status``.

        ``kind`` is one of ``KINDS`` or ``"*"`` (any request). The failing request is recorded but not processed.
        """
        if kind != "*" and kind not in KINDS:
            raise ValueError(f"Unknown request kind {kind!r}; expected one of {sorted(KINDS)} or '*'")
        with self._lock:
            self._faults.append([kind, skip, times, status])

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def head(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> str:
        """Commit oid at the tip of ``branch``."""
        with self._lock:
            return self._repos[(repo_type, repo_id)].branches[branch]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """All files (path -> bytes) of ``repo_id`` at ``revision`` (branch, tag or commit oid)."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            commit = repo.commits[self._resolve_revision(repo, revision)]
            return {path: self._content(repo, entry) for path, entry in commit.files.items()}

    def lfs_oids(self, repo_id: str, repo_type: str = "model") -> set[str]:
        """sha256 of the LFS objects stored for ``repo_id`` (committed or not)."""
        with self._lock:
            return set(self._repos[(repo_type, repo_id)].lfs)

    def subprocess_env(
        self, *, token: str | None = None, hf_home: str | None = None, base: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Environment for a child process that should talk to this server (see `hub_subprocess_env`)."""
        hf_home = hf_home or self.hf_home
        if hf_home is None:
            raise ValueError("Pass hf_home= (no temporary HF_HOME was created by running_hub_server)")
        return hub_subprocess_env(self.url, hf_home=hf_home, token=token, base=base)

    # ------------------------------------------------------------------------------------------- dispatching
    def _handle_request(self, method: str, raw_target: str, headers: Any, body: bytes) -> _Response:
        split = urlsplit(raw_target)
        raw_segments = [s for s in split.path.split("/") if s != ""]
        segments = [unquote(s) for s in raw_segments]
        auth = headers.get("Authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        req = _Request(
            method=method,
            path=unquote(split.path),
            segments=segments,
            query=parse_qs(split.query, keep_blank_values=True),
            headers=headers,
            body=body,
            token=token or None,
        )
        kind, handler, needs_auth = self._route(req)
        record = RecordedRequest(method=method, path=req.path, kind=kind, query=req.query, token=req.token)
        with self._lock:
            self._requests.append(record)
            fault_status = self._take_fault(kind)
        try:
            if fault_status is not None:
                raise _HttpError(fault_status, f"Injected failure for a '{kind}' request (test hub server)")
            if needs_auth and self.require_token:
                self._check_token(req)
            with self._lock:
                response = handler(req)
        except _HttpError as e:
            headers_out = {"Content-Type": "application/json", "X-Error-Message": e.message, **e.headers}
            if e.code is not None:
                headers_out["X-Error-Code"] = e.code
            response = _Response(e.status, json.dumps({"error": e.message}).encode(), headers_out)
        except Exception as e:  # noqa: BLE001 - a bug in this server: report it as a 500 with the traceback
            import traceback

            response = _Response(
                500,
                json.dumps({"error": f"test hub server crashed: {e!r}", "traceback": traceback.format_exc()}).encode(),
                {"Content-Type": "application/json"},
            )
        record.status = response.status
        return response

    def _take_fault(self, kind: str) -> int | None:
        for fault in self._faults:
            fault_kind, skip, times, status = fault
            if fault_kind not in ("*", kind) or times <= 0:
                continue
            if skip > 0:
                fault[1] -= 1
                continue
            fault[2] -= 1
            self._faults = [f for f in self._faults if f[2] > 0]
            return status
        return None

    def _check_token(self, req: _Request) -> None:
        if req.token is None:
            raise _HttpError(
                401,
                "Unauthorized: this request needs an 'Authorization: Bearer <token>' header "
                "(the test hub server runs with require_token enabled)",
            )
        if self._valid_tokens is not None and req.token not in self._valid_tokens:
            # Same message as the real Hub for a bad token (huggingface_hub keys on it).
            raise _HttpError(401, "Invalid credentials in Authorization header")

    def _route(self, req: _Request) -> tuple[str, Callable[[_Request], _Response], bool]:
        m, s = req.method, req.segments
        if s[:1] == ["api"]:
            rest = s[1:]
            if rest == ["whoami-v2"] and m == "GET":
                return "whoami", self._whoami, False  # always needs a token, checked in the handler
            if rest == ["repos", "create"] and m == "POST":
                return "create_repo", self._create_repo, True
            if rest == ["repos", "delete"] and m == "DELETE":
                return "delete_repo", self._delete_repo, True
            if rest == ["validate-yaml"] and m == "POST":
                return "validate_yaml", lambda r: _json({"errors": [], "warnings": []}), True
            if rest[:1] == ["agent-harnesses"]:
                return "other", lambda r: _json({"standardEnvVars": [], "harnesses": {}}), False
            if rest[:1] == ["telemetry"]:
                return "other", lambda r: _json({}), False
            if len(rest) >= 3 and rest[0] in ("models", "datasets", "spaces"):
                repo_type, repo_id, tail = rest[0][:-1], f"{rest[1]}/{rest[2]}", rest[3:]
                route = self._route_repo_api(m, repo_type, repo_id, tail)
                if route is not None:
                    return route
        elif s[:1] == ["__lfs__"] and len(s) >= 5 and s[1] in REPO_TYPES:
            repo_type, repo_id, oid, extra = s[1], f"{s[2]}/{s[3]}", s[4], s[5:]
            if m == "PUT" and not extra:
                return "lfs_upload", lambda r: self._lfs_put(r, repo_type, repo_id, oid), False
            if m == "PUT" and len(extra) == 2 and extra[0] == "part" and extra[1].isdigit():
                return "lfs_upload", lambda r: self._lfs_put_part(r, repo_type, repo_id, oid, int(extra[1])), False
            if m == "POST" and not extra:
                return "lfs_complete", lambda r: self._lfs_complete(r, repo_type, repo_id, oid), False
            if m == "POST" and extra == ["verify"]:
                return "lfs_verify", lambda r: self._lfs_verify(r, repo_type, repo_id, oid), True
            if m == "GET" and not extra:
                return "lfs_download", lambda r: self._lfs_get(r, repo_type, repo_id, oid), False
        else:
            repo_type, rest = "model", s
            if rest[:1] in (["datasets"], ["spaces"]):
                repo_type, rest = rest[0][:-1], rest[1:]
            if (
                m == "POST"
                and len(rest) == 6
                and rest[1].endswith(".git")
                and rest[2:] == ["info", "lfs", "objects", "batch"]
            ):
                repo_id = f"{rest[0]}/{rest[1][: -len('.git')]}"
                return "lfs_batch", lambda r: self._lfs_batch(r, repo_type, repo_id), True
            if m in ("GET", "HEAD") and len(rest) >= 5 and rest[2] == "resolve":
                repo_id, revision, path = f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:])
                return "resolve", lambda r: self._resolve(r, repo_type, repo_id, revision, path), True
        return "unknown", self._not_implemented, False

    def _route_repo_api(
        self, m: str, repo_type: str, repo_id: str, tail: list[str]
    ) -> tuple[str, Callable[[_Request], _Response], bool] | None:
        op, args = (tail[0], tail[1:]) if tail else ("", [])
        if op == "" and m == "GET":
            return "repo_info", lambda r: self._repo_info(r, repo_type, repo_id, None), True
        if op == "revision" and m == "GET" and args:
            return "repo_info", lambda r: self._repo_info(r, repo_type, repo_id, "/".join(args)), True
        if op == "tree" and m == "GET" and args:
            return "tree", lambda r: self._tree(r, repo_type, repo_id, args[0], "/".join(args[1:])), True
        if op == "paths-info" and m == "POST" and len(args) == 1:
            return "paths_info", lambda r: self._paths_info(r, repo_type, repo_id, args[0]), True
        if op == "preupload" and m == "POST" and len(args) == 1:
            return "preupload", lambda r: self._preupload(r, repo_type, repo_id, args[0]), True
        if op == "commit" and m == "POST" and len(args) == 1:
            return "commit", lambda r: self._commit(r, repo_type, repo_id, args[0]), True
        if op == "refs" and m == "GET" and not args:
            return "refs", lambda r: self._refs(r, repo_type, repo_id), True
        if op == "commits" and m == "GET" and len(args) == 1:
            return "commits", lambda r: self._commits(r, repo_type, repo_id, args[0]), True
        if op == "branch" and m in ("POST", "DELETE") and len(args) == 1:
            return "branch", lambda r: self._branch(r, repo_type, repo_id, args[0]), True
        if op == "tag" and m in ("POST", "DELETE") and len(args) == 1:
            return "tag", lambda r: self._tag(r, repo_type, repo_id, args[0]), True
        if op == "settings" and m == "PUT" and not args:
            return "repo_settings", lambda r: self._settings(r, repo_type, repo_id), True
        return None

    # ---------------------------------------------------------------------------------------- state helpers
    def _get_repo(self, req: _Request, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HttpError(404, "Repository not found", code="RepoNotFound")
        if repo.private and req.token is None:
            raise _HttpError(401, "Repository not found (private repository, no token sent)", code="RepoNotFound")
        return repo

    def _resolve_revision(self, repo: _Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision.startswith("refs/heads/") and revision[11:] in repo.branches:
            return repo.branches[revision[11:]]
        if revision.startswith("refs/tags/") and revision[10:] in repo.tags:
            return repo.tags[revision[10:]]
        if revision.startswith("refs/pr/") and revision[8:].isdigit() and int(revision[8:]) in repo.pull_requests:
            return repo.pull_requests[int(revision[8:])]
        if revision in repo.commits:
            return revision
        if len(revision) >= 7 and all(c in "0123456789abcdef" for c in revision.lower()):
            matches = [oid for oid in repo.commits if oid.startswith(revision.lower())]
            if len(matches) == 1:
                return matches[0]
        raise _HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def _content(self, repo: _Repo, entry: _Entry) -> bytes:
        return repo.lfs[entry.lfs_oid] if entry.lfs_oid is not None else repo.blobs[entry.blob_id]

    def _new_commit(
        self, repo: _Repo, parent: str | None, files: dict[str, _Entry], title: str, message: str, author: str
    ) -> _Commit:
        seed = f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{title}\n{next(self._counter)}\n{time.time_ns()}"
        commit = _Commit(
            oid=hashlib.sha1(seed.encode()).hexdigest(),
            parent=parent,
            files=files,
            title=title,
            message=message,
            date=_now_iso(),
            author=author,
        )
        repo.commits[commit.oid] = commit
        return commit

    def _add_regular(self, repo: _Repo, path: str, content: bytes) -> _Entry:
        blob_id = _git_blob_sha(content)
        repo.blobs[blob_id] = content
        return _Entry(path=path, size=len(content), blob_id=blob_id)

    def _last_commit(self, repo: _Repo, head: str, path: str) -> dict:
        """The most recent commit (from ``head``) that changed ``path`` (a file or folder prefix)."""

        def signature(commit: _Commit) -> Any:
            if path in commit.files:
                return commit.files[path].blob_id
            return tuple(sorted((p, e.blob_id) for p, e in commit.files.items() if p.startswith(path + "/")))

        commit = repo.commits[head]
        while commit.parent is not None and signature(repo.commits[commit.parent]) == signature(commit):
            commit = repo.commits[commit.parent]
        return {"id": commit.oid, "title": commit.title, "date": commit.date}

    @staticmethod
    def _dirs(files: dict[str, _Entry]) -> set[str]:
        dirs = set()
        for path in files:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return dirs

    @staticmethod
    def _tree_id(files: dict[str, _Entry], folder: str) -> str:
        listing = sorted((p, e.blob_id) for p, e in files.items() if p.startswith(folder + "/"))
        return hashlib.sha1(json.dumps(listing).encode()).hexdigest()

    def _folder_json(self, repo: _Repo, head: str, files: dict[str, _Entry], folder: str, expand: bool) -> dict:
        data: dict[str, Any] = {"type": "directory", "oid": self._tree_id(files, folder), "size": 0, "path": folder}
        if expand:
            data["lastCommit"] = self._last_commit(repo, head, folder)
        return data

    def _file_json(self, repo: _Repo, head: str, entry: _Entry, expand: bool) -> dict:
        return entry.to_json(self._last_commit(repo, head, entry.path) if expand else None)

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.url}/{repo_id}" if repo_type == "model" else f"{self.url}/{repo_type}s/{repo_id}"

    # -------------------------------------------------------------------------------------------- endpoints
    def _not_implemented(self, req: _Request) -> _Response:
        raise _HttpError(404, f"Not implemented by the test hub server: {req.method} {req.path}")

    def _whoami(self, req: _Request) -> _Response:
        if req.token is None or (self._valid_tokens is not None and req.token not in self._valid_tokens):
            raise _HttpError(401, "Invalid credentials in Authorization header")
        return _json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.username,
                "fullname": "Test User",
                "email": f"{self.username}@example.invalid",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test-token", "role": "write"}},
            }
        )

    def _create_repo(self, req: _Request) -> _Response:
        payload = req.json()
        name = payload.get("name")
        if not name or "/" in name:
            raise _HttpError(400, f"Invalid repo name: {name!r}")
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise _HttpError(400, f"Invalid repo type: {repo_type!r}")
        repo_id = f"{payload.get('organization') or self.username}/{name}"
        url = self._repo_url(repo_type, repo_id)
        if (repo_type, repo_id) in self._repos:
            return _json({"error": f"You already created this {repo_type} repo", "url": url}, status=409)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now_iso())
        entry = self._add_regular(repo, ".gitattributes", DEFAULT_GITATTRIBUTES.encode())
        commit = self._new_commit(repo, None, {".gitattributes": entry}, "initial commit", "", self.username)
        repo.branches["main"] = commit.oid
        self._repos[(repo_type, repo_id)] = repo
        return _json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _delete_repo(self, req: _Request) -> _Response:
        payload = req.json()
        repo_id = f"{payload.get('organization') or self.username}/{payload.get('name')}"
        repo = self._get_repo(req, payload.get("type") or "model", repo_id)
        del self._repos[(repo.repo_type, repo.repo_id)]
        return _json({})

    def _settings(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        payload = req.json()
        if "private" in payload:
            repo.private = bool(payload["private"])
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        return _json({})

    def _repo_info(self, req: _Request, repo_type: str, repo_id: str, revision: str | None) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        sha = self._resolve_revision(repo, revision or "main")
        commit = repo.commits[sha]
        blobs = req.flag("blobs")
        siblings = []
        for path in sorted(commit.files):
            entry = commit.files[path]
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.blob_id)
                if entry.lfs_oid is not None:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.lfs_oid, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        namespace = repo_id.split("/")[0]
        data: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": namespace,
            "sha": sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if repo_type == "model":
            data["modelId"] = repo_id
        if repo_type == "space":
            data.update(sdk="static", runtime={"stage": "RUNNING"})
        return _json(data)

    def _tree(self, req: _Request, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        head = self._resolve_revision(repo, revision)
        files = repo.commits[head].files
        folder = path.strip("/")
        dirs = self._dirs(files)
        if folder and folder not in dirs:
            raise _HttpError(404, f"Entry not found: {folder}", code="EntryNotFound", headers={"X-Repo-Commit": head})
        prefix = folder + "/" if folder else ""
        recursive, expand = req.flag("recursive"), req.flag("expand")
        out = []
        for d in sorted(dirs):
            if d.startswith(prefix) and (recursive or "/" not in d[len(prefix) :]):
                out.append(self._folder_json(repo, head, files, d, expand))
        for p in sorted(files):
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :]):
                out.append(self._file_json(repo, head, files[p], expand))
        return _json(out)

    def _paths_info(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        head = self._resolve_revision(repo, revision)
        files = repo.commits[head].files
        content_type = (req.headers.get("Content-Type") or "").lower()
        if "json" in content_type:
            payload = req.json()
            paths = payload.get("paths") or []
            expand = bool(payload.get("expand"))
        else:
            form = parse_qs(req.body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = (form.get("expand") or [""])[-1].lower() in ("1", "true")
        dirs = self._dirs(files)
        out = []
        for p in paths if isinstance(paths, list) else [paths]:
            p = p.strip("/")
            if p in files:
                out.append(self._file_json(repo, head, files[p], expand))
            elif p in dirs:
                out.append(self._folder_json(repo, head, files, p, expand))
        return _json(out)

    def _refs(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        data = {
            "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in repo.branches.items()],
            "converts": [],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo.tags.items()],
        }
        if req.query.get("include_prs"):
            data["pullRequests"] = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": c}
                for n, c in repo.pull_requests.items()
            ]
        return _json(data)

    def _commits(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        oid: str | None = self._resolve_revision(repo, revision)
        out = []
        while oid is not None:
            c = repo.commits[oid]
            out.append(
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author}],
                    "date": c.date,
                }
            )
            oid = c.parent
        return _json(out)

    def _branch(self, req: _Request, repo_type: str, repo_id: str, branch: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        if req.method == "DELETE":
            if branch not in repo.branches:
                raise _HttpError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            if branch == "main":
                raise _HttpError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            return _json({})
        if branch in repo.branches:
            raise _HttpError(409, f"Reference already exists: refs/heads/{branch}")
        starting_point = req.json().get("startingPoint") or "main"
        repo.branches[branch] = self._resolve_revision(repo, starting_point)
        return _json({})

    def _tag(self, req: _Request, repo_type: str, repo_id: str, name: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        if req.method == "DELETE":
            if name not in repo.tags:
                raise _HttpError(404, f"Invalid rev id: {name}", code="RevisionNotFound")
            del repo.tags[name]
            return _json({})
        tag = req.json().get("tag")  # POST /tag/{revision} with {"tag": name}
        if not tag:
            raise _HttpError(400, "Missing 'tag'")
        if tag in repo.tags:
            raise _HttpError(409, f"Reference already exists: refs/tags/{tag}")
        repo.tags[tag] = self._resolve_revision(repo, name)
        return _json({})

    def _preupload(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        head = self._resolve_revision(repo, revision)
        files = repo.commits[head].files
        payload = req.json()
        lfs_patterns = []
        if ".gitattributes" in files:
            for line in self._content(repo, files[".gitattributes"]).decode(errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 2 and "filter=lfs" in parts[1:]:
                    lfs_patterns.append(parts[0])
        ignore_patterns = [
            line.strip()
            for line in (payload.get("gitIgnore") or "").splitlines()
            if line.strip() and not line.strip().startswith(("#", "!"))
        ]
        out = []
        for f in payload.get("files", []):
            path, size = f["path"], int(f.get("size", 0))
            sample = base64.b64decode(f.get("sample") or "")
            is_lfs = (
                size >= self.lfs_threshold
                or any(_match_pattern(p, path) for p in lfs_patterns)
                or _is_binary_sample(sample)
            )
            existing = files.get(path)
            oid = None
            if existing is not None:
                oid = existing.lfs_oid if existing.lfs_oid is not None else existing.blob_id
            out.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if is_lfs else "regular",
                    "shouldIgnore": any(_match_pattern(p, path) for p in ignore_patterns),
                    "oid": oid,
                }
            )
        return _json({"files": out, "commitOid": head})

    def _lfs_href(self, repo: _Repo, oid: str, suffix: str = "") -> str:
        return f"{self.url}/__lfs__/{repo.repo_type}/{repo.repo_id}/{oid}{suffix}"

    def _lfs_batch(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        payload = req.json()
        operation = payload.get("operation")
        chunk = self.lfs_multipart_chunk_size
        transfers = payload.get("transfers") or ["basic"]
        use_multipart = chunk is not None and "multipart" in transfers
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid")), int(obj.get("size", 0))
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if operation == "upload":
                if oid in repo.lfs and len(repo.lfs[oid]) == size:
                    pass  # already there: no "actions" => huggingface_hub skips the upload
                elif use_multipart and size > chunk:
                    n_parts = -(-size // chunk)
                    header = {"chunk_size": str(chunk)}
                    header.update({f"{i:05d}": self._lfs_href(repo, oid, f"/part/{i}") for i in range(1, n_parts + 1)})
                    item["actions"] = {
                        "upload": {"href": self._lfs_href(repo, oid), "header": header},
                        "verify": {"href": self._lfs_href(repo, oid, "/verify"), "header": {}},
                    }
                else:
                    item["actions"] = {
                        "upload": {"href": self._lfs_href(repo, oid), "header": {}},
                        "verify": {"href": self._lfs_href(repo, oid, "/verify"), "header": {}},
                    }
            elif operation == "download":
                if oid in repo.lfs:
                    item["actions"] = {"download": {"href": self._lfs_href(repo, oid), "header": {}}}
                else:
                    item["error"] = {"code": 404, "message": "Object does not exist"}
            else:
                raise _HttpError(400, f"Unsupported LFS operation: {operation!r}")
            objects.append(item)
        transfer = "multipart" if use_multipart else "basic"
        return _json(
            {"transfer": transfer, "objects": objects, "hash_algo": "sha256"},
            content_type="application/vnd.git-lfs+json",
        )

    def _store_lfs(self, repo: _Repo, oid: str, data: bytes) -> None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != oid:
            raise _HttpError(400, f"LFS object content does not match its oid: expected {oid}, got {actual}")
        repo.lfs[oid] = data

    def _lfs_put(self, req: _Request, repo_type: str, repo_id: str, oid: str) -> _Response:
        repo = self._get_repo_unauthenticated(repo_type, repo_id)
        self._store_lfs(repo, oid, req.body)
        return _Response(200, b"", {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'})

    def _lfs_put_part(self, req: _Request, repo_type: str, repo_id: str, oid: str, part: int) -> _Response:
        repo = self._get_repo_unauthenticated(repo_type, repo_id)
        repo.lfs_parts.setdefault(oid, {})[part] = req.body
        return _Response(200, b"", {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'})

    def _lfs_complete(self, req: _Request, repo_type: str, repo_id: str, oid: str) -> _Response:
        repo = self._get_repo_unauthenticated(repo_type, repo_id)
        payload = req.json()
        pending = repo.lfs_parts.get(oid, {})
        chunks = []
        for part in sorted(payload.get("parts", []), key=lambda p: int(p["partNumber"])):
            number = int(part["partNumber"])
            if number not in pending:
                raise _HttpError(400, f"Multipart upload of {oid}: part {number} was never uploaded")
            if str(part.get("etag", "")).strip('"') != hashlib.md5(pending[number]).hexdigest():
                raise _HttpError(400, f"Multipart upload of {oid}: etag mismatch for part {number}")
            chunks.append(pending[number])
        self._store_lfs(repo, oid, b"".join(chunks))
        repo.lfs_parts.pop(oid, None)
        return _json({})

    def _lfs_verify(self, req: _Request, repo_type: str, repo_id: str, oid: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        size = req.json().get("size")
        if oid not in repo.lfs or (size is not None and len(repo.lfs[oid]) != int(size)):
            raise _HttpError(404, f"LFS object {oid} not found (or wrong size)")
        return _json({})

    def _lfs_get(self, req: _Request, repo_type: str, repo_id: str, oid: str) -> _Response:
        repo = self._get_repo_unauthenticated(repo_type, repo_id)
        if oid not in repo.lfs:
            raise _HttpError(404, f"LFS object {oid} not found")
        return _Response(200, repo.lfs[oid], {"Content-Type": "application/octet-stream"})

    def _get_repo_unauthenticated(self, repo_type: str, repo_id: str) -> _Repo:
        # The presigned-URL equivalents (LFS object PUT/GET): no Authorization header is sent by the client.
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HttpError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _commit(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        lines = []
        for raw in req.body.splitlines():
            if raw.strip():
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    raise _HttpError(400, "Commit payload is not valid NDJSON") from None
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None:
            raise _HttpError(400, "Commit payload has no header line")
        create_pr = req.flag("create_pr")
        if create_pr:
            base = self._resolve_revision(repo, revision)
        elif revision in repo.branches:
            base = repo.branches[revision]
        elif revision.startswith("refs/pr/") and revision[8:].isdigit() and int(revision[8:]) in repo.pull_requests:
            base = repo.pull_requests[int(revision[8:])]
        else:
            self._resolve_revision(repo, revision)  # 404 RevisionNotFound if it does not exist at all
            raise _HttpError(400, f"Invalid rev id: {revision} is not a branch")
        parent_commit = header.get("parentCommit")
        if parent_commit and not base.startswith(parent_commit.lower()):
            raise _HttpError(412, f"A commit has happened since {parent_commit}. Please refresh and try again.")
        files = dict(repo.commits[base].files)
        for line in lines:
            key, value = line.get("key"), line.get("value") or {}
            if key == "header":
                continue
            path = str(value.get("path", "")).strip()
            if key in ("file", "lfsFile") and (not path or path.startswith("/") or ".." in path.split("/")):
                raise _HttpError(400, f"Invalid path in commit: {path!r}")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HttpError(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[path] = self._add_regular(repo, path, base64.b64decode(value.get("content") or ""))
            elif key == "lfsFile":
                oid = str(value.get("oid"))
                if oid not in repo.lfs:
                    raise _HttpError(
                        400,
                        f"Your push was rejected because an LFS pointer pointed to a file that does not exist: "
                        f"{path} (oid {oid})",
                    )
                size = len(repo.lfs[oid])
                if value.get("size") is not None and int(value["size"]) != size:
                    raise _HttpError(400, f"LFS file {path}: size {value['size']} does not match the object ({size})")
                pointer = _lfs_pointer(oid, size)
                files[path] = _Entry(
                    path=path, size=size, blob_id=_git_blob_sha(pointer), lfs_oid=oid, pointer_size=len(pointer)
                )
            elif key == "deletedFile":
                if path not in files:
                    raise _HttpError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.strip("/") + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise _HttpError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise _HttpError(400, f"Unknown commit operation {key!r}")
        author = self.username
        commit = self._new_commit(
            repo, base, files, str(header.get("summary") or ""), str(header.get("description") or ""), author
        )
        pr_url = None
        if create_pr:
            number = max(repo.pull_requests, default=0) + 1
            repo.pull_requests[number] = commit.oid
            pr_url = f"{self._repo_url(repo_type, repo_id)}/discussions/{number}"
        elif revision in repo.branches:
            repo.branches[revision] = commit.oid
        else:
            repo.pull_requests[int(revision[8:])] = commit.oid
        return _json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    def _resolve(self, req: _Request, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        head = self._resolve_revision(repo, revision)
        entry = repo.commits[head].files.get(path)
        if entry is None:
            raise _HttpError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": head})
        content = self._content(repo, entry)
        etag = f'"{entry.lfs_oid or entry.blob_id}"'
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": etag,
            "X-Repo-Commit": head,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1], safe='')}",
        }
        if entry.lfs_oid is not None:
            headers["X-Linked-Etag"] = etag
            headers["X-Linked-Size"] = str(entry.size)
        range_header = req.headers.get("Range")
        if range_header:
            start, end = self._parse_range(range_header, len(content))
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            return _Response(206, content[start : end + 1], headers)
        return _Response(200, content, headers)

    @staticmethod
    def _parse_range(value: str, size: int) -> tuple[int, int]:
        unit, _, spec = value.partition("=")
        if unit.strip().lower() != "bytes" or "," in spec:
            raise _HttpError(416, f"Unsupported Range: {value}", headers={"Content-Range": f"bytes */{size}"})
        first, _, last = spec.strip().partition("-")
        try:
            if first == "":
                start, end = max(size - int(last), 0), size - 1
            else:
                start, end = int(first), (int(last) if last else size - 1)
        except ValueError:
            raise _HttpError(416, f"Invalid Range: {value}", headers={"Content-Range": f"bytes */{size}"}) from None
        end = min(end, size - 1)
        if start >= size or start > end:
            raise _HttpError(416, f"Range not satisfiable: {value}", headers={"Content-Range": f"bytes */{size}"})
        return start, end


# ------------------------------------------------------------------------------------- pointing clients at it
_ENV_TO_REMOVE = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_OIDC_RESOURCE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HUGGINGFACE_HUB_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HUGGINGFACE_CO_STAGING",
    "HF_HUB_ENABLE_HF_TRANSFER",
)


def _hub_env(url: str, hf_home: str) -> dict[str, str]:
    no_proxy = ",".join(
        dict.fromkeys(filter(None, [*(os.environ.get("NO_PROXY") or "").split(","), "127.0.0.1", "localhost"]))
    )
    return {
        "HF_ENDPOINT": url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": os.path.join(hf_home, "hub"),
        "HF_HUB_DISABLE_TELEMETRY": "1",  # also avoids the user-agent's agent-registry fetch
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


def hub_subprocess_env(
    url: str, *, hf_home: str, token: str | None = None, base: dict[str, str] | None = None
) -> dict[str, str]:
    """A copy of ``base`` (default ``os.environ``) for a child process talking to the server at ``url``.

    Tokens, offline flags and cache overrides inherited from ``base`` are removed; ``token`` (if given) is passed as
    ``HF_TOKEN``. A fresh interpreter picks all of this up at import time: no patching is needed there.
    """
    env = dict(os.environ if base is None else base)
    for name in _ENV_TO_REMOVE:
        env.pop(name, None)
    env.update(_hub_env(url, hf_home))
    if token is not None:
        env["HF_TOKEN"] = token
    return env


_MISSING = object()


class EndpointPatch:
    """Points the already-imported ``huggingface_hub`` (and ``transformers``) at ``url``; ``revert()`` undoes it.

    ``huggingface_hub.constants`` is computed at import time, so setting ``HF_ENDPOINT`` alone does nothing in a
    running interpreter. This patches the environment *and* the derived module attributes: ``constants.ENDPOINT``,
    ``HUGGINGFACE_CO_URL_TEMPLATE`` (used by ``hf_hub_url``/``hf_hub_download``), ``HF_URL_HOSTS``,
    ``HF_HUB_DISABLE_XET``, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_TELEMETRY``, the cache/token paths derived from
    ``HF_HOME``, the endpoint of the module-level ``HfApi`` behind ``huggingface_hub.create_repo``/``upload_folder``/
    ``model_info``..., and ``transformers.utils.hub``'s lazily-created shared ``HfApi``. ``HfApi`` objects created
    before the patch keep their old endpoint.
    """

    def __init__(self, url: str, hf_home: str) -> None:
        self.url = url.rstrip("/")
        self.hf_home = hf_home
        self._env: dict[str, str | None] = {}
        self._attrs: list[tuple[Any, str, Any]] = []
        self._applied = False

    def _set_attr(self, obj: Any, name: str, value: Any, only_if_present: bool = True) -> None:
        old = getattr(obj, name, _MISSING)
        if old is _MISSING and only_if_present:
            return
        self._attrs.append((obj, name, old))
        setattr(obj, name, value)

    def _set_env(self, name: str, value: str | None) -> None:
        if name not in self._env:
            self._env[name] = os.environ.get(name)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def apply(self) -> EndpointPatch:
        if self._applied:
            return self
        self._applied = True
        for name in _ENV_TO_REMOVE:
            self._set_env(name, None)
        for name, value in _hub_env(self.url, self.hf_home).items():
            self._set_env(name, value)

        import huggingface_hub.utils._http as hf_http
        from huggingface_hub import constants, hf_api

        home = self.hf_home
        hub_cache = os.path.join(home, "hub")
        host = urlsplit(self.url).hostname or "127.0.0.1"
        values = {
            "ENDPOINT": self.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": self.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS) | {host},
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_DISABLE_UPDATE_CHECK": True,
            "HF_HOME": home,
            "default_cache_path": hub_cache,
            "default_assets_cache_path": os.path.join(home, "assets"),
            "HUGGINGFACE_HUB_CACHE": hub_cache,
            "HF_HUB_CACHE": hub_cache,
            "HUGGINGFACE_ASSETS_CACHE": os.path.join(home, "assets"),
            "HF_ASSETS_CACHE": os.path.join(home, "assets"),
            "HF_TOKEN_PATH": os.path.join(home, "token"),
            "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
            "HF_XET_CACHE": os.path.join(home, "xet"),
            "CHECK_FOR_UPDATE_DONE_PATH": os.path.join(home, ".check_for_update_done"),
            "CHECK_FOR_SKILL_UPDATE_DONE_PATH": os.path.join(home, ".check_for_skill_update_done"),
            "AGENT_HARNESSES_PATH": os.path.join(home, ".agent_harnesses.json"),
        }
        for name, value in values.items():
            self._set_attr(constants, name, value)
        # Origins whose redirects keep the auth header (only same-origin redirects matter here, but be consistent).
        if isinstance(getattr(hf_http, "_HUB_ORIGINS", None), frozenset):
            self._set_attr(hf_http, "_HUB_ORIGINS", hf_http._HUB_ORIGINS | {self.url})
        # Module-level `api = HfApi()` behind `huggingface_hub.create_repo`, `upload_folder`, `model_info`, ...
        if isinstance(getattr(hf_api, "api", None), hf_api.HfApi):
            self._set_attr(hf_api.api, "endpoint", self.url)
        # Module-level copies made with `from ..constants import X` at import time.
        cache_manager = sys.modules.get("huggingface_hub.utils._cache_manager")
        if cache_manager is not None:
            self._set_attr(cache_manager, "HF_HUB_CACHE", hub_cache)
        # transformers caches one HfApi (created on first use with the endpoint of that time): drop it.
        tf_hub = sys.modules.get("transformers.utils.hub")
        if tf_hub is not None and hasattr(tf_hub, "_hf_api"):
            self._set_attr(tf_hub, "_hf_api", None)
        return self

    def revert(self) -> None:
        if not self._applied:
            return
        for obj, name, old in reversed(self._attrs):
            if old is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._attrs.clear()
        # transformers may have created its shared HfApi against the test server meanwhile: drop it again.
        tf_hub = sys.modules.get("transformers.utils.hub")
        if tf_hub is not None and getattr(getattr(tf_hub, "_hf_api", None), "endpoint", None) == self.url:
            tf_hub._hf_api = None
        for name, old in self._env.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        self._env.clear()
        self._applied = False


def apply_hub_endpoint_patch(url: str, hf_home: str) -> EndpointPatch:
    """Apply the endpoint/cache patch now; call ``.revert()`` on the result to undo it (e.g. in a fixture)."""
    return EndpointPatch(url, hf_home).apply()


@contextlib.contextmanager
def hub_endpoint(url: str, hf_home: str) -> Iterator[EndpointPatch]:
    """Context manager form of `apply_hub_endpoint_patch`."""
    patch = apply_hub_endpoint_patch(url, hf_home)
    try:
        yield patch
    finally:
        patch.revert()


@contextlib.contextmanager
def running_hub_server(
    *,
    require_token: bool | str = False,
    patch_endpoint: bool = True,
    hf_home: str | os.PathLike | None = None,
    **server_kwargs: Any,
) -> Iterator[HubServer]:
    """Start a `HubServer`, point ``huggingface_hub``/``transformers`` at it, yield it, then undo everything.

    With ``patch_endpoint=True`` (default) ``HF_HOME`` / ``HF_HUB_CACHE`` go to ``hf_home`` (a fresh temporary
    directory, removed afterwards, if not given) so the real cache and any saved token are never touched; the
    directory is available as ``server.hf_home`` (used by ``server.subprocess_env()``).
    """
    server = HubServer(require_token=require_token, **server_kwargs).start()
    tmp_home = None
    try:
        if hf_home is None:
            tmp_home = tempfile.mkdtemp(prefix="test-hf-home-")
            hf_home = tmp_home
        server.hf_home = os.fspath(hf_home)
        if patch_endpoint:
            with hub_endpoint(server.url, server.hf_home):
                yield server
        else:
            yield server
    finally:
        server.stop()
        if tmp_home is not None:
            shutil.rmtree(tmp_home, ignore_errors=True)
