"""The ``worldgen`` command: record play, train, evaluate, and play or serve world models.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int | None``; this file only routes to them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only to build their own parser.
COMMANDS: dict[str, tuple[str, str]] = {
    "record": ("worldgen.env.sources.record", "record real play (ViZDoom or any Gymnasium env) into a dataset"),
    "data": ("worldgen.data.cli", "inspect a dataset: info, view"),
    "train": ("worldgen.training.cli", "train a tokenizer, dynamics model, reward head or geometry head"),
    "eval": ("worldgen.evaluation.cli", "evaluate a checkpoint on held-out episodes"),
    "bench": ("worldgen.engine.bench", "benchmark streaming: frames/s, latency p50/p99, MFU at several batch sizes"),
    "serve": ("worldgen.server.cli", "stream a world model to browsers and clients over websockets"),
    "play": ("worldgen.clients.play", "play a world model in a pygame window (local engine or --server)"),
    "generate": (
        "worldgen.engine.generate_cli",
        "long video offline from context and actions (overlapping-clip fusion)",
    ),
    "checkpoint": (
        "worldgen.checkpoint_cli",
        "a model folder's parts and sizes; the same model with its weights stored in fp8, bf16 or fp32",
    ),
    "cloud": (
        "worldgen.cloud",
        "build a point-cloud world cache from recorded play (.ply, picture); view it in open3d",
    ),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldgen",
        description="Record play, train, evaluate, and play or serve world models.",
        epilog="`worldgen COMMAND --help` shows a command's options; docs/README.md in the repository has the guides.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Import only the module of the command asked for: `worldgen record` does not load torch
    # models, and `worldgen --help` (no command) imports none, so it answers at once.
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == wanted:
            importlib.import_module(module).add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return importlib.import_module(args._module).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
