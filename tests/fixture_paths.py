"""Where the tests find the official tiny fixture: `$G2VLM_FIXTURES` if set, else `../shared/fixtures` beside the
checkout. Standard library only: the Hub test server's child processes import it without the package."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_ENV = "G2VLM_FIXTURES"


def fixtures_root() -> Path:
    """`$G2VLM_FIXTURES` if set, else `../shared/fixtures` beside the checkout (which may not exist)."""
    configured = os.environ.get(FIXTURES_ENV)
    return Path(configured).expanduser() if configured else REPO_ROOT.parent / "shared" / "fixtures"


FIXTURE_DIR = fixtures_root() / "official-tiny"
