"""Helpers of the Hub tests: Python processes pointed at the test Hub server, a fast tiny checkpoint, reference outputs.

Whatever talks to the test Hub server (`tests/hub_server.py`) runs in a `HubClient`: a child Python process started
with the server in its environment (`hub_env`: `HF_ENDPOINT`, `HF_HUB_DISABLE_XET=1`, `HF_HOME` / `HF_HUB_CACHE` in a
temporary folder, `HF_TOKEN`, no offline flag), as a user would point huggingface_hub and transformers at a Hub.
Nothing of either library is patched. A `HubClient` runs the code snippets it is given one after another in one
namespace (so torch and transformers are imported once per client) and sends back their values and exceptions.

`HubClient(..., without_package=True)` is a Python where g2vlm_hf does not exist: it runs isolated (`-I -S`: no
`PYTHON*` variables, no `.pth` files, hence no editable install) on a copy of site-packages made of links to
every entry but g2vlm_hf's, and checks at start that `import g2vlm_hf` cannot find anything.

This module imports neither g2vlm_hf nor pytest, nor anything outside the standard library at module level: the
child processes import it too.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import pickle
import select
import shutil
import site
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any

from fixture_paths import FIXTURE_DIR

TESTS_DIR = Path(__file__).resolve().parent
IMAGES_DIR = FIXTURE_DIR / "images"
VIEWS = sorted(IMAGES_DIR.glob("view_*.png"))
TOKEN = "hf_g2vlm_offline_token"
SOURCE_DIR = TESTS_DIR.parent / "src" / "g2vlm_hf"
COLLECTED_AT = time.time()  # g2vlm_hf is imported by conftest.py just before the test modules import this one
QUESTION = "How far is the red box from the blue wall?"
PACKAGE = "g2vlm_hf"


def hub_env(endpoint: str, hf_home: str | Path, token: str | None = TOKEN) -> dict[str, str]:
    """The environment of a process that uses the Hub at `endpoint`, with its cache in `hf_home`.

    Every `HF_*` / `HUGGINGFACE_*` / `TRANSFORMERS_*` variable of this process is dropped (offline flags, tokens,
    cache locations), then the Hub is configured the way a user would: `HF_ENDPOINT`, `HF_HUB_DISABLE_XET=1` (the
    test server speaks the LFS protocol), `HF_HOME` / `HF_HUB_CACHE`, `HF_TOKEN` (unless `token` is None), and
    `HF_HUB_DISABLE_TELEMETRY=1`.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(Path(hf_home) / "hub"),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY=no_proxy,
        no_proxy=no_proxy,
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


class ChildError(Exception):
    """An exception of a `HubClient` child that cannot travel as itself (e.g. one holding an HTTP response).

    Attributes: `types` (the qualified names of its class and base classes), `status` (the HTTP status of its
    response, if any) and `message`.
    """

    def __init__(self, message: str, types: tuple[str, ...] = (), status: int | None = None) -> None:
        super().__init__(f"{types[0] if types else 'Error'}: {message}")
        self.message, self.types, self.status = message, tuple(types), status

    def __reduce__(self):
        return ChildError, (self.message, self.types, self.status)

    def is_a(self, name: str) -> bool:
        return any(t == name or t.endswith(f".{name}") for t in self.types)


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling as itself, else a ChildError describing it."""
    with contextlib.suppress(Exception):  # whatever makes it unpicklable
        if type(error).__module__.startswith("transformers_modules"):  # remote code: the parent cannot import it
            raise TypeError
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error) and str(copy) == str(error):
            return error
    types = tuple(f"{cls.__module__}.{cls.__qualname__}" for cls in type(error).__mro__)
    status = getattr(getattr(error, "response", None), "status_code", None)
    return ChildError(str(error), types, status)


def _send(stream: Any, data: bytes) -> None:
    stream.write(len(data).to_bytes(8, "big") + data)
    stream.flush()


def _receive(stream: Any) -> bytes | None:
    size = int.from_bytes(stream.read(8) or b"\0" * 8, "big")
    return stream.read(size) if size else None


def _execute(code: str, namespace: dict) -> Any:
    """Run `code` in `namespace`; the value of its last statement if that is an expression, else None."""
    tree = ast.parse(code)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<hub client>", "exec"), namespace)
    return None if last is None else eval(compile(ast.Expression(last.value), "<hub client>", "eval"), namespace)


def serve(reply_fd: int) -> None:
    """The loop of a `HubClient` child: run each snippet received on stdin, reply on `reply_fd`."""
    replies = os.fdopen(reply_fd, "wb")
    namespace: dict[str, Any] = {"__name__": "__hub_client__"}
    while (message := _receive(sys.stdin.buffer)) is not None:
        code, variables = pickle.loads(message)
        namespace.update(variables)
        stdout, stderr = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                reply = ("ok", _execute(code, namespace))
        except BaseException as error:
            reply = ("error", (_portable(error), traceback.format_exc()))
        try:
            data = pickle.dumps((*reply, stdout.getvalue(), stderr.getvalue()))
        except Exception as error:
            failure = ChildError(f"the value of the snippet cannot be pickled: {error!r}", ("PicklingError",))
            data = pickle.dumps(("error", (failure, ""), stdout.getvalue(), stderr.getvalue()))
        _send(replies, data)


_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); import hub_testing; hub_testing.serve(int(sys.argv[2]))"
_BOOT_WITHOUT_PACKAGE = textwrap.dedent(
    f"""
    import importlib.util, sys
    sys.path += [sys.argv[3], sys.argv[1]]  # site-packages without {PACKAGE}, then tests/ (for hub_testing)
    if importlib.util.find_spec({PACKAGE!r}) is not None:
        raise SystemExit({PACKAGE!r} + " can be imported in the process that must not see it")
    import hub_testing; hub_testing.serve(int(sys.argv[2]))
    """
)


def site_packages_without_package(destination: Path) -> Path:
    """A folder of links to every entry of this Python's site-packages except g2vlm_hf's own (package, metadata,
    editable-install hooks) and `.pth` files: a site-packages where g2vlm_hf was never installed."""
    destination.mkdir(parents=True, exist_ok=True)
    user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    for folder in [*site.getsitepackages(), *filter(None, [user_site])]:
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            name = entry.lower()
            if name.startswith((PACKAGE, PACKAGE.replace("_", "-"), "__editable__")) or name.endswith(".pth"):
                continue
            if not (destination / entry).exists():
                (destination / entry).symlink_to(os.path.join(folder, entry))
    return destination


class HubClient:
    """A child Python process, configured by `env` only, that runs snippets and sends back what they evaluate to.

    `run(code, **variables)` runs `code` (with `variables` bound) in the child and returns the value of its last
    statement if it is an expression. An exception raised there is raised here: as itself when it pickles (g2vlm_hf's
    errors, SystemExit...), else as a `ChildError`; the child's traceback is attached as a note. `stdout` / `stderr`
    hold what the last snippet printed. Every call is bounded by `timeout` seconds; the child is killed past it, and
    at the latest when the client is closed (use it as a context manager).
    """

    def __init__(self, env: dict[str, str], workdir: Path, *, without_package: bool = False, timeout: float = 300):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.timeout, self.stdout, self.stderr = workdir, timeout, "", ""
        self.log = workdir / "client.log"
        read_fd, write_fd = os.pipe()
        if without_package:
            packages = site_packages_without_package(workdir / "site-packages")
            argv = [
                sys.executable,
                "-I",
                "-S",
                "-c",
                _BOOT_WITHOUT_PACKAGE,
                str(TESTS_DIR),
                str(write_fd),
                str(packages),
            ]
        else:
            argv = [sys.executable, "-c", _BOOT, str(TESTS_DIR), str(write_fd)]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env,
                pass_fds=(write_fd,),
            )  # fmt: skip
        os.close(write_fd)
        self._replies: int | None = read_fd

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                _send(self.process.stdin, b"")
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        if self._replies is not None:
            os.close(self._replies)
            self._replies = None

    def _read(self, size: int, deadline: float) -> bytes:
        data = bytearray()
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._replies], [], [], remaining)[0]:
                self.process.kill()
                self.close()
                raise TimeoutError(f"the Hub client did not answer in {self.timeout} s; its log: {self.log_tail()}")
            chunk = os.read(self._replies, size - len(data))
            if not chunk:
                self.close()
                raise RuntimeError(f"the Hub client died ({self.process.returncode}); its log: {self.log_tail()}")
            data += chunk
        return bytes(data)

    def log_tail(self, characters: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-characters:]

    def run(self, code: str, /, **variables: Any) -> Any:
        try:
            _send(self.process.stdin, pickle.dumps((textwrap.dedent(code), variables)))
        except (OSError, ValueError):
            raise RuntimeError(f"the Hub client is gone ({self.process.poll()}); its log: {self.log_tail()}") from None
        deadline = time.monotonic() + self.timeout
        status, value, self.stdout, self.stderr = pickle.loads(
            self._read(int.from_bytes(self._read(8, deadline), "big"), deadline)
        )
        if status == "ok":
            return value
        error, child_traceback = value
        if hasattr(error, "add_note"):
            error.add_note(f"raised in the Hub client:\n{child_traceback}")
        raise error


def sources_changed_since_collection() -> list[str]:
    """Package modules edited on disk after this test session imported them (the remote code copied from disk would
    then differ from the code running in this process)."""
    return sorted(
        str(path.relative_to(SOURCE_DIR)) for path in SOURCE_DIR.rglob("*.py") if path.stat().st_mtime > COLLECTED_AT
    )


def fast_tiny_copy(converted: Path, destination: Path) -> Path:
    """A copy of the converted tiny checkpoint whose processor makes small inputs (geometry views 112 pixels wide,
    semantic images 112x112), so that every forward pass of the tests takes a fraction of a second."""
    shutil.copytree(converted, destination)
    config_file = destination / "processor_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    # the geometry settings: "image_processor" in the current layout, "geometry_image_processor" in the older one
    config.get("geometry_image_processor", config["image_processor"])["target_width"] = 112
    config["semantic_image_size"] = 112
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return destination


def folder_digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Relative path -> (sha256, mode) of every file under `folder`, to show it was not modified."""
    return {
        path.relative_to(folder).as_posix(): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def model_outputs(processor, full_model, recon_model=None, views=VIEWS, question: str = QUESTION) -> dict:
    """Inputs and outputs (tensors) of a chat forward pass, a short greedy generation and reconstructions.

    `recon_model` may be None. The same function runs in the parent (package installed) and in the children.
    """
    import torch

    messages = [
        {
            "role": "user",
            "content": [*({"type": "image", "image": str(v)} for v in views), {"type": "text", "text": question}],
        }
    ]
    chat = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    recon = processor(geometry_images=[str(v) for v in views], return_tensors="pt")
    out = {f"chat.{key}": value for key, value in chat.items()}
    out.update({f"recon_inputs.{key}": value for key, value in recon.items()})
    with torch.inference_mode():
        out["logits"] = full_model(**chat).logits
        out["generated"] = full_model.generate(**chat, max_new_tokens=4, do_sample=False)
        models = {"full": full_model, "recon_only": recon_model}
        for name, model in models.items():
            if model is None:
                continue
            scene = model.reconstruct(**recon)
            for field in ("camera_poses", "local_points", "world_points", "global_points", "depth", "confidence"):
                value = getattr(scene, field)
                if value is not None:
                    out[f"{name}.{field}"] = value
    return {key: value.contiguous() for key, value in out.items()}


__all__ = [
    "TOKEN", "VIEWS", "ChildError", "HubClient", "fast_tiny_copy", "folder_digest", "hub_env", "model_outputs",
    "site_packages_without_package",
]  # fmt: skip
