"""``worldgen checkpoint``: what a model folder holds, and the same model stored in another dtype.

worldgen checkpoint info MODEL                  parts, parameters, storage dtype and MiB of each
worldgen checkpoint convert MODEL OUT --dtype fp8|bf16|fp32
                                                a new folder with the weights stored as asked
                                                (fp8: float8 with per-tensor scales, worldgen.checkpoint)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worldgen import checkpoint
from worldgen.checkpoint import CheckpointError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    info = sub.add_parser("info", help="parts, parameters, storage dtype and size of each")
    info.add_argument("model", help="checkpoint folder or packaged name (default)")
    convert = sub.add_parser("convert", help="copy a checkpoint with its weights stored in another dtype")
    convert.add_argument("model", help="checkpoint folder or packaged name (default)")
    convert.add_argument("out", type=Path, help="new checkpoint folder")
    convert.add_argument("--dtype", required=True, choices=sorted(checkpoint.STORAGE))


def run(args: argparse.Namespace) -> int:
    try:
        if args.checkpoint_command == "info":
            info(args.model)
        else:
            if args.out.exists() and any(args.out.iterdir()):
                raise ValueError(f"{args.out}: exists and is not empty; convert writes a new folder")
            copied = checkpoint.recast(args.model, args.out, args.dtype)
            print(f"wrote {', '.join(copied)} to {args.out} (weights stored as {args.dtype})")
            info(args.out)
    except (CheckpointError, ValueError) as e:
        print(f"worldgen checkpoint: {e}", file=sys.stderr)
        return 1
    return 0


def info(model: str | Path) -> None:
    folder = checkpoint.resolve(model)
    total = 0
    print(f"{'part':<12} {'parameters':>12} {'stored as':>14} {'MiB':>8}")
    for part in checkpoint.parts(folder):
        tensors, cfg = checkpoint.load(folder, part)
        size = sum(f.stat().st_size for f in checkpoint.shard_files(folder, part))
        total += size
        dtype = str(checkpoint.stored_dtype(folder, part)).removeprefix("torch.") if "model" in cfg else "data"
        params = sum(t.numel() for t in tensors.values()) if "model" in cfg else 0
        print(f"{part:<12} {params:>12,} {dtype:>14} {size / 2**20:>8.2f}")
    print(f"{'all':<12} {'':>12} {'':>14} {total / 2**20:>8.2f}")
