"""Evaluation cost: PSNR/SSIM throughput in frames/s, and optionally a whole `worldgen eval`.

    python benchmarks/eval_bench.py                                        # metrics, CPU
    python benchmarks/eval_bench.py --device cuda
    python benchmarks/eval_bench.py --device cuda --checkpoint default --data data/doom-heldout --split all

Metrics run on random uint8 frames at 160x120 (their cost does not depend on the content).
The optional end-to-end run prints `worldgen eval`'s own table and wall time. Prints Markdown
rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import torch

from worldgen.evaluation import EvalConfig, evaluate, psnr, ssim, summary
from worldgen.provenance import git_commit, time_per_call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 256], help="frames per metric call")
    p.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    p.add_argument("--checkpoint", default=None, help="also time a whole evaluation of this checkpoint")
    p.add_argument("--data", default=None)
    p.add_argument("--split", default="heldout")
    p.add_argument("--windows", type=int, default=64)
    args = p.parse_args()
    device = torch.device(args.device)

    commit = git_commit()
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()}-thread CPU"
    print(
        f"{datetime.date.today()}, commit {commit}, {hw}, torch {torch.__version__}, {platform.python_version()}, "
        f"1-min load average {os.getloadavg()[0]:.1f}"
    )
    print("| metric | batch | frames/s | frames/CPU-s |\n| --- | ---: | ---: | ---: |")
    g = torch.Generator().manual_seed(0)
    for b in args.batch:
        x, y = (torch.randint(0, 256, (b, 120, 160, 3), dtype=torch.uint8, generator=g).to(device) for _ in "xy")
        for name, fn in (("psnr", psnr), ("ssim", ssim)):
            wall, cpu = time_per_call(lambda fn=fn, x=x, y=y: fn(x, y), device, args.seconds)
            print(f"| {name} | {b} | {b / wall:,.0f} | {b / cpu:,.0f} |")

    if args.checkpoint:
        if not args.data:
            p.error("--checkpoint needs --data")
        result = evaluate(args.checkpoint, args.data, EvalConfig(split=args.split, windows=args.windows), device=device)
        print(summary(result))


if __name__ == "__main__":
    main()
