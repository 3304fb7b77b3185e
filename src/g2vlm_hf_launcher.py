"""The `g2vlm` console script: answers `--help` and argument errors before torch and transformers are imported.

Any `g2vlm_hf.*` module imports the package first, whose `__init__` registers the Auto classes and so imports torch
and transformers (seconds to tens of seconds). This launcher parses the command line with `g2vlm_hf/cli/parser.py`,
a standard-library-only file it loads on its own (it defines no class or state the commands use), then imports the
package normally and runs the parsed command (`g2vlm_hf.cli.main.run`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def g2vlm() -> int:
    package = importlib.util.find_spec("g2vlm_hf")  # located, not imported
    if package is None or not package.submodule_search_locations:
        raise ImportError("The g2vlm_hf package is not installed.")
    path = Path(next(iter(package.submodule_search_locations))) / "cli" / "parser.py"
    spec = importlib.util.spec_from_file_location("g2vlm_hf_launcher_parser", path)
    parser = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parser)
    args = parser.build_parser().parse_args()
    parser.quiet_import_warnings()

    from g2vlm_hf.cli.main import run

    return run(args)


if __name__ == "__main__":
    sys.exit(g2vlm())
