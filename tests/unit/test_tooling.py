"""The tree stays clean: ruff (lint and format) and mypy (types), configured in pyproject.toml, as part of the tests."""

import subprocess
import sys
from pathlib import Path

from harness import REPO_ROOT

BIN = Path(sys.executable).parent


def test_ruff_is_clean():
    r = subprocess.run([str(BIN / "ruff"), "check", "."], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


def test_ruff_format_leaves_the_tree_as_it_is():
    r = subprocess.run([str(BIN / "ruff"), "format", "--check", "."], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


def test_mypy_is_clean():
    r = subprocess.run([str(BIN / "mypy")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
