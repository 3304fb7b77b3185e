"""Loading a converted checkpoint for the command lines and the demo, refusing what would run silently wrong: weights
that do not match the config (transformers would fill missing ones at random and drop unexpected ones), a folder
without its tokenizer files (named, rather than transformers' "install sentencepiece or tiktoken"), a device this
machine lacks and a local-looking model path that does not exist (both checked before anything is read).

Everything that loads weights goes through this module; it imports nothing of the package at its top."""

from __future__ import annotations

from pathlib import Path

DTYPES = ("auto", "bfloat16", "float16", "float32")
"""The weights dtypes a command line offers (`--dtype`); "auto" keeps the saved one."""

TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
"""Either set holds the vocabulary of the Qwen2 tokenizer (the fast one's file, or the slow one's pair)."""

SHOWN_KEYS = 5


def check_device(device: str) -> None:
    """Raise a ValueError unless `device` names a device torch knows and this machine has (e.g. "cpu", "cuda",
    "cuda:1", "mps")."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"--device {device} is not a device name; use cpu, cuda, cuda:N or mps.") from error
    if parsed.type == "cpu":
        return
    backend = torch.backends.mps if parsed.type == "mps" else getattr(torch, parsed.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        kind = parsed.type.upper() if parsed.type in ("cuda", "xpu") else parsed.type
        raise ValueError(f"--device {device} was given but {kind} is not available on this machine; use --device cpu.")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"--device {device} was given but this machine has {count} {parsed.type} device(s).")


def check_model_path(model_path: str) -> None:
    """Raise a ValueError for a `model_path` that names no local folder and cannot be a Hub id either: one that looks
    local (starting with `.`, `/` or `~`, holding a backslash or more than one `/`), a bare name (a Hub id is
    `owner/name`), or `folder/name` whose `folder` is a local folder. Other names are left to the Hub (which, offline,
    is only known after its retries)."""
    path = Path(model_path).expanduser()
    if path.exists():
        return
    local_looking = model_path.startswith((".", "/", "~")) or "\\" in model_path or model_path.count("/") > 1
    if local_looking:
        raise ValueError(f"Model folder {model_path} does not exist.")
    if "/" not in model_path:
        raise ValueError(
            f"Model {model_path} is no folder here, and a Hub id has the form owner/name; give the folder "
            "g2vlm-convert wrote, or the model's Hub id."
        )
    if path.parent.is_dir():
        raise ValueError(
            f"Model folder {model_path} does not exist ({path.parent} is a folder here, so this is no Hub id)."
        )


def check_tokenizer_files(model_path: str) -> None:
    """Refuse a local checkpoint folder lacking its tokenizer files, naming them (a Hub id is not checked)."""
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        return
    missing = [] if (folder / TOKENIZER_CONFIG).is_file() else [TOKENIZER_CONFIG]
    vocabulary = [[name for name in names if not (folder / name).is_file()] for names in TOKENIZER_FILE_SETS]
    if all(vocabulary):
        missing.append(" or ".join(" + ".join(names) for names in TOKENIZER_FILE_SETS))
    if missing:
        raise ValueError(
            f"{folder} lacks the tokenizer file(s) {', '.join(missing)}; copy them from the checkpoint it was "
            "converted from, or convert it again with g2vlm-convert."
        )


def _named(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:SHOWN_KEYS])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > SHOWN_KEYS else ''})"


def load_processor(model_path: str):
    """The `G2VLMProcessor` of a converted checkpoint (quick: configs and tokenizer, no weights), after checking its
    tokenizer files."""
    from transformers import AutoProcessor

    import g2vlm_hf  # noqa: F401  (registers the Auto classes)

    check_tokenizer_files(model_path)
    return AutoProcessor.from_pretrained(model_path)


def load_model(model_path: str, dtype: str, device: str, generate: bool = True):
    """The model of a converted checkpoint in eval mode on `device`, its weights in `dtype` (one of `DTYPES`): a
    reconstruction-only checkpoint too when the model need not `generate`.

    Raises:
        ValueError: an unknown dtype or device, a reconstruction-only checkpoint where text is generated, or weights
            that lack keys the config needs or hold keys it does not know (e.g. a `num_hidden_layers` that does not
            match the weights).
    """
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {list(DTYPES)}.")
    check_device(device)
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    import g2vlm_hf  # noqa: F401  (registers the Auto classes)
    from g2vlm_hf.modeling import G2VLMReconstructionConfig

    config = AutoConfig.from_pretrained(model_path)
    reconstruction_only = config.model_type == G2VLMReconstructionConfig.model_type
    if reconstruction_only and generate:
        raise ValueError(
            f"{model_path} is a reconstruction-only checkpoint (no language-model head): answering questions needs "
            "the full model (g2vlm-convert without --reconstruction-only)."
        )
    auto_class = AutoModel if reconstruction_only else AutoModelForImageTextToText
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model, info = auto_class.from_pretrained(model_path, config=config, dtype=torch_dtype, output_loading_info=True)
    missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
    if missing or unexpected:
        problems = [f"missing weights {_named(missing)}"] if missing else []
        problems += [f"unexpected weights {_named(unexpected)}"] if unexpected else []
        raise ValueError(
            f"The weights of {model_path} do not match its config.json: {'; '.join(problems)}. Is config.json from "
            "the same checkpoint (e.g. num_hidden_layers)? Convert the checkpoint again with g2vlm-convert."
        )
    return model.to(device).eval()


def load_checked(model_path: str, dtype: str, device: str):
    """`(model, processor)` of a converted checkpoint: [`check_model_path`], [`load_processor`] then [`load_model`] (see
    their errors)."""
    check_model_path(model_path)
    processor = load_processor(model_path)
    return load_model(model_path, dtype, device), processor
