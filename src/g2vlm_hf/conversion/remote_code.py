"""Remote code: the package's modeling and processing modules as a flat set of files for `trust_remote_code=True`.

transformers' dynamic-module loader downloads the file named in `auto_map` and, recursively, the files it imports with
single-dot relative imports from the same (flat) folder. `g2vlm_hf/modeling/*.py` and `g2vlm_hf/processing/*.py`
(without their `__init__.py`) import each other that way, and the top-level modules of `SHARED_MODULES` (such as
`g2vlm_hf/integers.py`) with `from ..integers import ...`: all of them are copied into one folder, verbatim but for
those imports, which become `from .integers import ...`, with one comment line on top saying where each file comes
from.
`check_remote_code` fails if a module imports something that would not travel (another parent-package import, a
sibling that is not copied, or a third-party package other than torch, transformers, numpy and PIL).
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

# The package, its subpackages copied into the flat set, the top-level modules these may import with `from ..name`,
# and what all of them may import besides the standard library.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SOURCE_PACKAGES = ("modeling", "processing")
SHARED_MODULES = ("integers",)
ALLOWED_THIRD_PARTY = frozenset({"torch", "transformers", "numpy", "PIL"})

CONFIG_AUTO_MAP = {
    "AutoConfig": "configuration_g2vlm.G2VLMConfig",
    "AutoModel": "modeling_g2vlm.G2VLMForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_g2vlm.G2VLMForConditionalGeneration",
    "AutoProcessor": "processing_g2vlm.G2VLMProcessor",
}
RECONSTRUCTION_CONFIG_AUTO_MAP = {
    "AutoConfig": "configuration_g2vlm.G2VLMReconstructionConfig",
    "AutoModel": "modeling_g2vlm.G2VLMForReconstruction",
    "AutoProcessor": "processing_g2vlm.G2VLMProcessor",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_g2vlm.G2VLMProcessor"}
PROCESSOR_FILES = ("processor_config.json", "tokenizer_config.json")


def _header(relative_path: str, rewritten: bool) -> str:
    from .. import __version__

    how = "with its `from ..` imports made `from .`" if rewritten else "verbatim"
    return (
        f"# Copied {how} from g2vlm_hf {__version__} (g2vlm_hf/{relative_path}) for trust_remote_code; "
        "edit the package, not this copy.\n"
    )


def source_modules(root: str | Path = PACKAGE_ROOT) -> dict[str, Path]:
    """File name -> source path of every module that goes into the remote code (a ValueError on a name clash):
    the modules of `SOURCE_PACKAGES` and the `SHARED_MODULES` of the package `root` that exist."""
    root = Path(root)
    paths = [path for package in SOURCE_PACKAGES for path in sorted((root / package).glob("*.py"))]
    paths += [root / f"{name}.py" for name in SHARED_MODULES if (root / f"{name}.py").is_file()]
    modules: dict[str, Path] = {}
    for path in paths:
        if path.name == "__init__.py":
            continue
        if path.name in modules:
            raise ValueError(f"Two remote-code modules are named {path.name}: {modules[path.name]} and {path}.")
        modules[path.name] = path
    return modules


_PARENT_IMPORT = re.compile(r"from(\s+)\.\.(?=[A-Za-z_])")


def flatten_imports(text: str) -> str:
    """`text` of a subpackage module with each `from ..<shared module> import ...` made `from .<module> import ...`.

    Other imports are left as they are (`check_remote_code` refuses those that would not travel).
    """
    lines = text.splitlines(keepends=True)
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.level == 2 and (node.module or "").split(".")[0] in SHARED_MODULES:
            line = lines[node.lineno - 1]
            statement = line[node.col_offset :]
            if not _PARENT_IMPORT.match(statement):
                raise ValueError(f"Cannot flatten the import on line {node.lineno}: {line.strip()!r}")
            lines[node.lineno - 1] = line[: node.col_offset] + _PARENT_IMPORT.sub(r"from\1.", statement, count=1)
    return "".join(lines)


def remote_code_files(root: str | Path = PACKAGE_ROOT) -> dict[str, str]:
    """File name -> text of the flat remote-code files (header line + the module, its shared imports flattened)."""
    root = Path(root)
    files = {}
    for name, path in source_modules(root).items():
        text = path.read_text(encoding="utf-8")
        flat = flatten_imports(text) if path.parent != root else text
        files[name] = _header(path.relative_to(root).as_posix(), flat != text) + flat
    check_remote_code(files)
    return files


def check_remote_code(files: dict[str, str]) -> None:
    """Fail (ValueError) if a module imports something that transformers' loader cannot resolve from `files`.

    Relative imports must name a sibling in `files` with a single dot. Absolute imports must be the standard library,
    torch, transformers, numpy or PIL, except inside `try:` blocks (optional imports, which transformers' import
    check skips too).
    """
    local = {name[: -len(".py")] for name in files}
    allowed = ALLOWED_THIRD_PARTY | set(sys.stdlib_module_names) | {"__future__"}
    problems = []
    for name, text in files.items():
        tree = ast.parse(text, filename=name)
        optional = {id(node) for block in ast.walk(tree) if isinstance(block, ast.Try) for node in ast.walk(block)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                target = (node.module or "").split(".")[0]
                if node.level != 1 or not node.module or "." in node.module or target not in local:
                    problems.append(f"{name}: from {'.' * node.level}{node.module or ''} import ...")
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in optional:
                roots = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                problems += [f"{name}: import {root}" for root in roots if root.split(".")[0] not in allowed]
    if problems:
        raise ValueError(
            "The remote code would not load without g2vlm_hf; these imports do not travel: " + "; ".join(problems)
        )


def write_remote_code(folder: str | Path, *, reconstruction_only: bool = False) -> list[str]:
    """Write the remote-code files into `folder` and add `auto_map` to its config, processor and tokenizer configs.

    Returns:
        The names of the files written or changed.
    """
    folder = Path(folder)
    written = []
    for name, text in remote_code_files().items():
        (folder / name).write_text(text, encoding="utf-8")
        written.append(name)
    config_map = RECONSTRUCTION_CONFIG_AUTO_MAP if reconstruction_only else CONFIG_AUTO_MAP
    for file_name, auto_map in [("config.json", config_map), *((name, PROCESSOR_AUTO_MAP) for name in PROCESSOR_FILES)]:
        path = folder / file_name
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {file_name}: it is not a converted G2VLM folder.")
        data = json.loads(path.read_text(encoding="utf-8"))
        data["auto_map"] = dict(auto_map)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(file_name)
    return written


__all__ = ["check_remote_code", "flatten_imports", "remote_code_files", "source_modules", "write_remote_code"]
