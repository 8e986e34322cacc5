"""`make test` enforces the style check: ruff (pinned in the `dev` extra) passes on the repo."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed: `pip install -e '.[dev]'` (or `make venv`) installs it"
    proc = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"`ruff check .` found problems:\n{proc.stdout}{proc.stderr}"
