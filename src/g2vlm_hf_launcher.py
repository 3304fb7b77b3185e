"""The `g2vlm` console script: answers `--help` and argument errors before torch and transformers are imported.

Any `g2vlm_hf.*` module imports the package first, whose `__init__` registers the Auto classes and so imports torch
and transformers (tens of seconds on a busy machine). This launcher loads `g2vlm_hf/cli.py` on its own to parse the
command line (the module imports nothing heavy at its top); the package is imported when a command runs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def g2vlm() -> int:
    package = importlib.util.find_spec("g2vlm_hf")  # located, not imported
    if package is None or not package.submodule_search_locations:
        raise ImportError("The g2vlm_hf package is not installed.")
    path = Path(next(iter(package.submodule_search_locations))) / "cli.py"
    spec = importlib.util.spec_from_file_location("g2vlm_hf.cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.main()


if __name__ == "__main__":
    sys.exit(g2vlm())
