"""The examples in docstrings run: every module of the packages with a ``>>>`` example."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "worldgen": "worldgen",
    "memory": "worldgen.memory",
    "env": "worldgen.env",
    "server": "worldgen.server",
    "clients": "worldgen.clients",
}


def modules_with_examples() -> list[str]:
    found = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if ">>>" in path.read_text():
                parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
                found.append(".".join([package, *parts]))
    return found


@pytest.mark.parametrize("module", modules_with_examples())
def test_docstring_examples_run(module, one_thread):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{module}: {result.failed} of {result.attempted} examples failed (output above)"
