"""Loading a converted checkpoint for the command lines, refusing what would run silently wrong: weights that do not
match the config (transformers would fill missing ones at random and drop unexpected ones) and a folder without
its tokenizer files (named, rather than transformers' "install sentencepiece or tiktoken")."""

from __future__ import annotations

from pathlib import Path

from .cli import DTYPES

TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
"""Either set holds the vocabulary of the Qwen2 tokenizer (the fast one's file, or the slow one's pair)."""

SHOWN_KEYS = 5


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


def load_checked(model_path: str, dtype: str, device: str):
    """`(model, processor)` of a converted checkpoint, the model in eval mode on `device`, its weights in `dtype` (one
    of `DTYPES`).

    Raises:
        ValueError: an unknown dtype, tokenizer files are missing, or the weights lack keys the config needs or hold
            keys it does not know (e.g. a `num_hidden_layers` that does not match the weights).
    """
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {list(DTYPES)}.")
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import g2vlm_hf  # noqa: F401  (registers the Auto classes)

    check_tokenizer_files(model_path)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model, info = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch_dtype, output_loading_info=True)
    missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
    if missing or unexpected:
        problems = [f"missing weights {_named(missing)}"] if missing else []
        problems += [f"unexpected weights {_named(unexpected)}"] if unexpected else []
        raise ValueError(
            f"The weights of {model_path} do not match its config.json: {'; '.join(problems)}. Is config.json from "
            "the same checkpoint (e.g. num_hidden_layers)? Convert the checkpoint again with g2vlm-convert."
        )
    return model.to(device).eval(), AutoProcessor.from_pretrained(model_path)
