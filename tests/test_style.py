"""The tree keeps one style: ``ruff check`` (lint) and ``ruff format --check`` pass on it.

The rules are ``[tool.ruff]`` in pyproject.toml. ``ruff format . && ruff check --fix .`` repairs
most findings; the rest (long strings and comments, a loop variable a closure captures, ...)
the message names file and line for.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ruff() -> str:
    pytest.importorskip("ruff", reason="ruff is not installed: pip install -e '.[test]' brings it")
    from ruff.__main__ import find_ruff_bin

    return str(find_ruff_bin())


@pytest.mark.parametrize(
    "command", [["check", "--output-format", "concise"], ["format", "--check"]], ids=["lint", "format"]
)
def test_ruff(ruff, command):
    done = subprocess.run([ruff, *command, "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"ruff {' '.join(command)} found:\n{done.stdout}{done.stderr}"
