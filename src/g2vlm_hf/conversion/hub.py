"""Push a converted G²VLM folder to the Hugging Face Hub.

`push_to_hub` never writes into the folder it pushes. It stages the upload in a temporary folder: the weights
re-sharded by component (`sharding.py`), config, generation config, processor, tokenizer and chat template, the
remote code with its `auto_map` (`remote_code.py`), the model card (`model_card.py`) and optional example images.
It then uploads each weight shard on its own (so a failure can say which shards reached the Hub), commits everything
in one commit, and downloads every file of that commit back to compare sha256 digests with the staged files.

Re-running after an interruption resumes: the staged files are byte-identical from one run to the next, the Hub keeps
LFS objects uploaded before a failed commit, and huggingface_hub does not send an object the Hub already has.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.utils import logging

from ..modeling import G2VLMConfig, G2VLMReconstructionConfig
from ..output_manifest import MANIFEST_NAME
from .model_card import DEFAULT_BASE_MODEL, EXAMPLES_DIR, ModelCardInfo, build_model_card
from .reconstruction_only import read_model_type, write_reconstruction_only
from .remote_code import write_remote_code
from .sharding import SAFE_WEIGHTS_INDEX_NAME, is_weight_file, save_component_shards

logger = logging.get_logger(__name__)

DEFAULT_REVISION = "main"
# Remote files that a push replaces: those of them not in the new upload are deleted in the same commit.
# Written beside the weights but not for the repository: the card is made anew, and the output manifest records this
# machine's conversion command.
NOT_PUBLISHED = ("README.md", MANIFEST_NAME)
MANAGED_PATTERNS = ("*.safetensors", SAFE_WEIGHTS_INDEX_NAME, "*.py", "generation_config.json", f"{EXAMPLES_DIR}/*")


class HubPushError(RuntimeError):
    """A push that failed. The message says what reached the Hub, and that the local folder was not modified."""


class HubAuthError(HubPushError):
    """No token, or a token the Hub rejected."""


class HubVerificationError(HubPushError):
    """The files the Hub serves after the commit differ from the files that were uploaded."""


@dataclass(frozen=True)
class PushResult:
    """A completed push.

    Attributes:
        repo_id: the repository.
        revision: the branch that was pushed to.
        commit_oid: the commit holding the upload (pin it with `from_pretrained(..., revision=commit_oid)`).
        commit_url: its URL.
        files: every uploaded path -> its sha256 (checked against what the Hub serves when `verify=True`).
        reconstruction_only: whether the repository holds the reconstruction-only model.
    """

    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    files: dict[str, str]
    reconstruction_only: bool


def validate_hub_repo_id(repo_id: str) -> str:
    """Return `repo_id` if huggingface_hub accepts it as a repository id, else raise a ValueError saying why."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"Invalid Hub repository id {repo_id!r}: {error} Use 'namespace/name', e.g. 'my-user/g2vlm-2b'."
        ) from None
    return repo_id


def sha256_of(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def stage_for_hub(
    folder: str | Path,
    staging: str | Path,
    *,
    repo_id: str,
    reconstruction_only: bool = False,
    example_images: Sequence[str | Path] = (),
    card_info: Mapping[str, object] | None = None,
    max_shard_size: str = "5GB",
) -> dict[str, Path]:
    """Write into the empty or absent folder `staging` everything a push of `folder` uploads; `folder` is only read.

    A full folder is pushed as it is, or as its reconstruction-only version with `reconstruction_only=True`; a
    reconstruction-only folder is pushed as one. `card_info` holds extra [`ModelCardInfo`] fields (`source`,
    `parity`, ...).

    Returns:
        Path in the repository -> staged file.
    """
    folder, staging = Path(folder), Path(staging)
    model_type = read_model_type(folder)
    if model_type not in (G2VLMConfig.model_type, G2VLMReconstructionConfig.model_type):
        raise ValueError(f"{folder} holds a {model_type!r} checkpoint, not a converted G2VLM one.")
    images = [Path(image) for image in example_images]
    for image in images:
        if not image.is_file():
            raise FileNotFoundError(f"Example image {image} does not exist.")
    names = [image.name for image in images]
    if len(set(names)) != len(names):
        raise ValueError(f"The example images must have distinct file names, got {names}.")

    reconstruction_only = reconstruction_only or model_type == G2VLMReconstructionConfig.model_type
    staging.mkdir(parents=True, exist_ok=True)
    if model_type == G2VLMConfig.model_type and reconstruction_only:
        write_reconstruction_only(folder, staging, max_shard_size=max_shard_size)
    else:
        for source in sorted(folder.iterdir()):
            if source.is_file() and not is_weight_file(source.name) and source.name not in NOT_PUBLISHED:
                shutil.copyfile(source, staging / source.name)
        save_component_shards(folder, staging, max_shard_size=max_shard_size)
    write_remote_code(staging, reconstruction_only=reconstruction_only)

    for image in images:
        (staging / EXAMPLES_DIR).mkdir(exist_ok=True)
        shutil.copyfile(image, staging / EXAMPLES_DIR / image.name)

    index = json.loads((staging / SAFE_WEIGHTS_INDEX_NAME).read_text(encoding="utf-8"))
    info = ModelCardInfo(
        repo_id=repo_id,
        reconstruction_only=reconstruction_only,
        example_images=names,
        components=index["metadata"].get("components", {}),
        package_version=_package_version(),
        **dict(card_info or {}),
    )
    build_model_card(info).save(staging / "README.md")
    return {path.relative_to(staging).as_posix(): path for path in sorted(staging.rglob("*")) if path.is_file()}


def _package_version() -> str:
    from .. import __version__

    return __version__


def resolve_token(token: str | None) -> str:
    """`token`, else the saved / `HF_TOKEN` one; a HubAuthError when there is none (before any network access)."""
    token = token or get_token()
    if not token:
        raise HubAuthError(
            "Pushing to the Hub needs a token with write access: pass --token (token=...), set HF_TOKEN, or run "
            "`hf auth login`. Nothing was uploaded."
        )
    return token


def _http_error(error: BaseException) -> BaseException:
    """The HTTP error behind `error` (huggingface_hub wraps some in a RuntimeError), else `error` itself."""
    seen = error
    while seen is not None:
        if getattr(getattr(seen, "response", None), "status_code", None) is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return error


def _http_status(error: BaseException) -> int | None:
    return getattr(getattr(_http_error(error), "response", None), "status_code", None)


def _describe(error: BaseException) -> str:
    error = _http_error(error)
    status = _http_status(error)
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    return f"HTTP {status}: {first_line}" if status is not None else f"{type(error).__name__}: {first_line}"


def _prepare_repo(api: HfApi, repo_id: str, revision: str, private: bool | None) -> list[str]:
    """Create the repository (and branch) if needed; return the files currently on `revision`."""
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision != DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.list_repo_files(repo_id, revision=revision)
    except HfHubHTTPError as error:
        if _http_status(error) in (401, 403):
            raise HubAuthError(
                f"The Hub refused access to {repo_id} ({_describe(error)}): check that the token is valid and may "
                "write to this namespace. Nothing was uploaded."
            ) from error
        raise HubPushError(
            f"Could not prepare {repo_id}@{revision} ({_describe(error)}). Nothing was uploaded."
        ) from error


def _stale_files(remote: Iterable[str], staged: Iterable[str]) -> list[str]:
    staged = set(staged)
    return sorted(
        path
        for path in remote
        if path not in staged and any(fnmatch.fnmatchcase(path, pattern) for pattern in MANAGED_PATTERNS)
    )


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    reconstruction_only: bool = False,
    example_images: Sequence[str | Path] = (),
    base_model: str | None = DEFAULT_BASE_MODEL,
    source: str | None = None,
    source_revision: str | None = None,
    parity: Mapping[str, str] | None = None,
    max_shard_size: str = "5GB",
    verify: bool = True,
) -> PushResult:
    """Upload the converted folder `folder` to the Hub repository `repo_id` (created if missing) in one commit.

    Args:
        folder: output of `g2vlm-convert` (full or reconstruction-only) or of `build_reconstruction_only`; it is only
            read.
        repo_id: `namespace/name`; validated before any network access.
        private: visibility of a newly created repository.
        revision: branch to commit to (created from `main` if missing); default `main`.
        commit_message: defaults to "Upload G2VLM (transformers format)".
        token: a token with write access; defaults to the saved / `HF_TOKEN` one.
        reconstruction_only: push the reconstruction-only version of a full folder (no ViT, no LM head).
        example_images: images uploaded under `examples/` and used by the model card's snippets.
        base_model, source, source_revision, parity: what the model card records about the conversion.
        max_shard_size: a component larger than this is split into several shards.
        verify: download every file of the commit back and compare sha256 digests with the uploaded files.

    Returns:
        [`PushResult`] with the commit to pin.

    Raises:
        ValueError: invalid `repo_id` or `folder`.
        HubAuthError: no token, or the Hub refused it.
        HubPushError: the upload or commit failed (the message says what reached the Hub; re-run to resume).
        HubVerificationError: what the Hub serves differs from what was uploaded.
    """
    validate_hub_repo_id(repo_id)
    folder = Path(folder)
    read_model_type(folder)  # a ValueError for a folder that is not a converted checkpoint
    token = resolve_token(token)
    revision = revision or DEFAULT_REVISION
    commit_message = commit_message or "Upload G2VLM (transformers format)"
    card_info = {
        "base_model": base_model,
        "source": source,
        "source_revision": source_revision,
        "parity": dict(parity or {}),
        "verified": verify,
    }

    with tempfile.TemporaryDirectory(prefix="g2vlm-push-") as tmp:
        staged = stage_for_hub(
            folder,
            Path(tmp) / "repo",
            repo_id=repo_id,
            reconstruction_only=reconstruction_only,
            example_images=example_images,
            card_info=card_info,
            max_shard_size=max_shard_size,
        )
        reconstruction_only = json.loads(staged["config.json"].read_text())["model_type"] != G2VLMConfig.model_type
        digests = {path: sha256_of(local) for path, local in staged.items()}
        api = HfApi(token=token)
        remote_files = _prepare_repo(api, repo_id, revision, private)
        deletions = [CommitOperationDelete(path_in_repo=path) for path in _stale_files(remote_files, staged)]
        additions = {
            path: CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local)) for path, local in staged.items()
        }
        _upload(api, repo_id, revision, additions, folder)
        try:
            commit = api.create_commit(
                repo_id, operations=[*additions.values(), *deletions], commit_message=commit_message, revision=revision
            )
        except Exception as error:
            raise HubPushError(
                f"Every file of the push reached {repo_id}, but the commit on {revision!r} failed ({_describe(error)}). "
                f"The local folder {folder} was not modified. Re-run the same command to commit: the weight files "
                "already uploaded are kept by the Hub and are not sent again."
            ) from error
        if verify:
            verify_upload(repo_id, commit.oid, digests, token=token, cache_dir=Path(tmp) / "download")
    logger.info(f"Pushed {folder} to {repo_id}@{revision} (commit {commit.oid}).")
    return PushResult(repo_id, revision, commit.oid, commit.commit_url, digests, reconstruction_only)


def _upload(api: HfApi, repo_id: str, revision: str, additions: dict[str, CommitOperationAdd], folder: Path) -> None:
    """Upload the LFS objects: the small files together, then each weight shard on its own."""
    weights = [path for path in additions if path.endswith(".safetensors")]
    others = [path for path in additions if path not in weights]
    done: list[str] = []
    current = "the configuration, code, card and example files"
    try:
        api.preupload_lfs_files(repo_id, additions=[additions[path] for path in others], revision=revision)
        done.extend(others)
        for path in weights:
            current = path
            api.preupload_lfs_files(repo_id, additions=[additions[path]], revision=revision)
            done.append(path)
    except Exception as error:
        uploaded = [path for path in done if path in weights]
        missing = [path for path in weights if path not in uploaded]
        raise HubPushError(
            f"Upload to {repo_id}@{revision} failed while uploading {current} ({_describe(error)}). "
            f"Weight shards already on the Hub: {', '.join(uploaded) or 'none'}; not uploaded: {', '.join(missing)}. "
            f"Nothing was committed, and the local folder {folder} was not modified. Re-run the same command to "
            "resume: the shards already uploaded are not sent again."
        ) from error


def verify_upload(
    repo_id: str,
    revision: str,
    expected: Mapping[str, str],
    *,
    token: str | None = None,
    cache_dir: str | Path | None = None,
) -> None:
    """Download every file of `expected` (path -> sha256) from `repo_id@revision` and compare digests.

    Raises:
        HubVerificationError: naming each file that is missing or differs.
    """
    with tempfile.TemporaryDirectory(prefix="g2vlm-verify-") as tmp:
        cache_dir = Path(cache_dir or tmp)
        problems = []
        for path, digest in logging.tqdm(
            sorted(expected.items()), desc="Verifying the upload", disable=not logging.is_progress_bar_enabled()
        ):
            try:
                local = hf_hub_download(repo_id, path, revision=revision, token=token, cache_dir=cache_dir)
            except Exception as error:
                problems.append(f"{path}: cannot be downloaded ({_describe(error)})")
                continue
            served = sha256_of(Path(local))
            if served != digest:
                problems.append(f"{path}: sha256 {served} on the Hub, {digest} uploaded")
    if problems:
        raise HubVerificationError(
            f"{repo_id}@{revision} does not serve what was uploaded: " + "; ".join(problems) + ". Re-run the push."
        )
    logger.info(f"Verified {len(expected)} files of {repo_id}@{revision} (sha256).")


__all__ = [
    "HubAuthError",
    "HubPushError",
    "HubVerificationError",
    "PushResult",
    "push_to_hub",
    "resolve_token",
    "stage_for_hub",
    "validate_hub_repo_id",
    "verify_upload",
]
