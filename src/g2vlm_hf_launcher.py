"""The console scripts `g2vlm`, `g2vlm-convert` and `g2vlm-eval`: each answers `--help` and argument errors before
torch and transformers are imported.

Any `g2vlm_hf.*` module imports the package first, whose `__init__` registers the Auto classes and so imports torch
and transformers (seconds to tens of seconds). The launcher parses the command line with the command's
standard-library-only parser file (`cli/parser.py`, `conversion/cli.py`, `evaluation/parser.py`), loaded on its own
(it defines no class or state the commands use), then imports the package normally and runs the command.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import signal
import sys
from collections.abc import Iterator
from pathlib import Path


def _standalone(relative_path: str):
    """Load `g2vlm_hf/<relative_path>`, a standard-library-only file, on its own: the package is located, not
    imported (importing it imports torch and transformers)."""
    package = importlib.util.find_spec("g2vlm_hf")
    if package is None or not package.submodule_search_locations:
        raise ImportError("The g2vlm_hf package is not installed.")
    path = Path(next(iter(package.submodule_search_locations))) / relative_path
    name = "g2vlm_hf_launcher_" + relative_path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _starting(command: str) -> Iterator[None]:
    """Ctrl-C while `command` starts (parsing, then importing the package: seconds) ends it with one line and exit
    status 130, as during its run, instead of a traceback from inside the import machinery.

    The interrupt is also recorded: one that lands inside a callback the interpreter runs for itself (a weakref
    callback of importlib's module locks) is reported as "ignored" and swallowed there, and the command would go on.
    A command started with SIGINT ignored (a background job of a script, as Python itself honours) keeps ignoring it.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    interrupted = False

    def interrupt(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    def drop_swallowed_interrupt(unraisable: sys.UnraisableHookArgs) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)

    previous_handler = signal.signal(signal.SIGINT, interrupt)
    previous_hook, sys.unraisablehook = sys.unraisablehook, drop_swallowed_interrupt
    try:
        yield
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        sys.unraisablehook = previous_hook
    if interrupted:
        print(f"{command}: interrupted while starting; nothing was written.", file=sys.stderr)
        raise SystemExit(130)


def g2vlm() -> int:
    with _starting("g2vlm"):
        parser = _standalone("cli/parser.py")
        args = parser.build_parser().parse_args()
        parser.quiet_import_warnings()
        command = importlib.import_module("g2vlm_hf.cli.main")
    return command.run(args)


def g2vlm_convert() -> int:
    """`g2vlm-convert`: its parser answers `--help` and argument errors first; the package then parses again (cheap)."""
    with _starting("g2vlm-convert"):
        _standalone("conversion/cli.py").build_parser().parse_args()
        _standalone("cli/parser.py").quiet_import_warnings()
        command = importlib.import_module("g2vlm_hf.conversion.cli")
    return command.main()


def g2vlm_eval() -> int:
    """`g2vlm-eval`, likewise."""
    with _starting("g2vlm-eval"):
        _standalone("evaluation/parser.py").build_parser().parse_args()
        _standalone("cli/parser.py").quiet_import_warnings()
        command = importlib.import_module("g2vlm_hf.evaluation.cli")
    return command.main()


if __name__ == "__main__":
    sys.exit(g2vlm())
