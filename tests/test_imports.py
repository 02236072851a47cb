"""Imports point one way, read from the source with ``ast`` (lazy imports inside functions count).

Between packages: ``memory`` <- ``worldgen`` <- ``env``, ``server`` <- ``clients``. Inside the core
(``worldgen/``) each room may import only rooms of a lower rank, and no module imports a
command-line module (``*.cli``): a constant or helper two modules need lives in the lower one.
docs/architecture.md explains the rooms.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject.toml's package-dir)
FOLDERS = {
    "worldgen": "worldgen",
    "memory": "worldgen.memory",
    "env": "worldgen.env",
    "server": "worldgen.server",
    "clients": "worldgen.clients",
}
# Top-level rooms and the rooms each may import besides itself.
MAY_IMPORT = {
    "memory": set(),
    "core": {"memory"},
    "env": {"core", "memory"},
    "server": {"core", "memory"},
    "clients": {"server", "core", "memory"},
}
# Rooms of the core by rank: a module may import modules of its own room or of a lower rank.
CORE_RANKS = {
    "actions": 0,
    "checkpoint": 0,
    "checkpoint_cli": 1,  # `worldgen checkpoint`: a model folder's parts, stored in another dtype
    "provenance": 0,
    "files": 0,
    "data": 1,
    "models": 2,
    "evaluation.metrics": 2,  # image metrics: a leaf that trainers and the engine use
    "sampling": 3,
    "engine": 4,
    "training": 5,
    "evaluation": 5,
    "cloud": 5,  # `worldgen cloud`: a session's point cloud from a recording, .ply, the viewer
}


def modules() -> dict[str, Path]:
    """Every module of the installed packages: dotted name -> file."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The worldgen modules ``path`` imports; ``from pkg import name`` counts as ``pkg.name`` when
    that is a module. The bare ``worldgen`` package stands for what it exports: the engine."""
    got = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            got |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            got |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            }
    return {"worldgen.engine" if m == "worldgen" else m for m in got if m.split(".")[0] == "worldgen"}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else "core"


def core_rank(module: str) -> int | None:
    rest = module.removeprefix("worldgen.")
    for name in sorted(CORE_RANKS, key=len, reverse=True):  # evaluation.metrics before evaluation
        if rest == name or rest.startswith(name + "."):
            return CORE_RANKS[name]
    return None


def violations(found: dict[str, Path]) -> list[str]:
    """One line per import of ``found``'s modules that runs against the direction."""
    wrong = []
    for module, path in found.items():
        for target in sorted(imports(path, set(found))):
            src, dst = room(module), room(target)
            where = f"{path.name}: {module} imports {target}"
            if target.split(".")[-1] == "cli" and target != module:
                wrong.append(f"{where} (a command-line module; move what it needs below it)")
            elif src != dst and dst not in MAY_IMPORT[src]:
                wrong.append(f"{where} ({src} may import only {sorted(MAY_IMPORT[src]) or 'nothing of worldgen'})")
            elif src == dst == "core" and module != "worldgen.cli":
                have, want = core_rank(module), core_rank(target)
                if have is not None and want is not None and want > have:
                    wrong.append(f"{where} (rank {have} imports rank {want})")
                elif have == want == CORE_RANKS["training"] and module.split(".")[1] != target.split(".")[1]:
                    wrong.append(f"{where} (training and evaluation are siblings)")
    return wrong


def test_imports_point_one_way():
    found = modules()
    assert {room(m) for m in found} == set(MAY_IMPORT)
    # Every core module has a rank but the package's face, the router of commands and the weights.
    unranked = sorted(m for m in found if room(m) == "core" and core_rank(m) is None)
    assert unranked == ["worldgen", "worldgen.checkpoints", "worldgen.cli"], (
        f"give these a rank in CORE_RANKS: {unranked}"
    )
    wrong = violations(found)
    assert not wrong, "imports against the direction:\n" + "\n".join(wrong)


def test_env_modules_live_in_their_rooms():
    """``env/`` is three rooms (docs/architecture.md): a module goes into one of them, not beside."""
    rooms = {"sources", "learned", "gym"}
    env = [m.split(".")[2:] for m in modules() if room(m) == "env"]
    loose = sorted(".".join(parts) for parts in env if parts and parts[0] not in rooms)
    assert not loose, f"put these in one of env's rooms {sorted(rooms)}: {loose}"
    assert {parts[0] for parts in env if parts} == rooms


def test_the_check_catches_each_kind(tmp_path):
    """Planted imports of each kind are caught, lazy ones inside a function too."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "from worldgen.training.loop import hardware\n"  # the engine reaching up into training
        "from worldgen.data.cli import add_arguments\n"  # a command-line module
        "def later():\n"
        "    import worldgen.env.sources.record\n"  # the core importing a data source
    )
    memory = tmp_path / "memory.py"
    memory.write_text("from worldgen import models\n")
    found = modules()
    found = {**found, "worldgen.engine.planted": planted, "worldgen.memory.planted": memory}
    wrong = [w for w in violations(found) if "planted" in w]
    assert len(wrong) == 4, wrong
    assert any("rank 4 imports rank 5" in w for w in wrong) and any("command-line" in w for w in wrong)
    assert any("core may import only ['memory']" in w for w in wrong)
    assert any("memory may import only nothing of worldgen" in w for w in wrong)
