"""Training throughput through the real training loop (``worldgen.training.loop.fit``): tokens/s
and model FLOPs utilisation of the Diffusion-Forcing DiT step and of the tokenizer step.

    python benchmarks/train_bench.py                                          # CPU: tiny DiT, small tokenizer
    python benchmarks/train_bench.py --device cuda --model S --window 16 --batch 32 --compile
    python benchmarks/train_bench.py --device cuda --what tokenizer --batch 64 --compile

Random latents (DiT) and random frames (tokenizer) stand in for a dataset: a step's speed depends
on shapes, not values. Everything else is what ``worldgen train`` runs: per-step generator,
Diffusion-Forcing noise levels, bf16 autocast on CUDA, grad clipping, fused AdamW, EMA, one GPU
sync per log. The first log window (compile, warmup) is left out of the rate. Prints one
Markdown table row per model for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time

import torch

from worldgen.models import DiT, Tokenizer, TokenizerConfig
from worldgen.provenance import git_commit
from worldgen.training.distributed import setup
from worldgen.training.dynamics import DynamicsTask, DynamicsTrainConfig, Latents, dit_config
from worldgen.training.loop import fit
from worldgen.training.run import Run
from worldgen.training.tokenizer import TokenizerTask, TokenizerTrainConfig


def bench_dit(args: argparse.Namespace, out: str) -> dict:
    d = setup(args.device)
    cfg = DynamicsTrainConfig(
        data="(random latents)",
        out=out,
        model=args.model,
        window=args.window,
        batch_size=args.batch,
        steps=args.steps,
        warmup=args.steps,
        log_every=args.log_every,
        sample_every=0,
        ckpt_every=10**9,
        compile=args.compile,
        eval_windows=args.batch,
    )
    model = DiT(dit_config(cfg, 16, (15, 20)))
    n = 64 * args.window  # frames of random latents: one "episode"
    lat = Latents(torch.randn(n, 16, 15, 20).bfloat16(), torch.rand(n, 10), torch.tensor([0, n]))
    return fit(DynamicsTask(cfg, model, lat.to(d.device), None, d), cfg, Run(out), d, False, time.time())


def bench_tokenizer(args: argparse.Namespace, out: str) -> dict:
    d = setup(args.device)
    cfg = TokenizerTrainConfig(
        data="(random frames)",
        out=out,
        batch_size=args.batch,
        steps=args.steps,
        warmup=args.steps,
        log_every=args.log_every,
        sample_every=0,
        ckpt_every=10**9,
        compile=args.compile,
        channels=args.channels,
    )
    model = Tokenizer(TokenizerConfig(channels=tuple(int(c) for c in args.channels.split(","))))
    frames = torch.randint(0, 256, (max(4 * args.batch, 64), 120, 160, 3), dtype=torch.uint8)
    return fit(TokenizerTask(cfg, model, frames, frames[:16], d), cfg, Run(out), d, False, time.time())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--what", choices=("dit", "tokenizer", "both"), default="both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="DiT size (default: tiny on CPU, S on CUDA)")
    p.add_argument("--window", type=int, default=None, help="frames per window (default: 4 on CPU, 16 on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="samples per step (default: 4 on CPU, 32 on CUDA)")
    p.add_argument(
        "--channels", default=None, help="tokenizer widths (default: 8,16,32,32 on CPU, the config's on CUDA)"
    )
    p.add_argument("--steps", type=int, default=None, help="steps timed (default: 20 on CPU, 120 on CUDA)")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.model = args.model or ("S" if gpu else "tiny")
    args.window = args.window or (16 if gpu else 4)
    args.batch = args.batch or (32 if gpu else 4)
    args.channels = args.channels or (",".join(map(str, TokenizerConfig().channels)) if gpu else "8,16,32,32")
    args.steps = args.steps or (120 if gpu else 20)
    args.log_every = max(args.steps // 6, 1)

    commit = git_commit()
    hw = torch.cuda.get_device_name() if gpu else f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU"
    rows = []
    for what in ("dit", "tokenizer") if args.what == "both" else (args.what,):
        with tempfile.TemporaryDirectory() as out:
            s = bench_dit(args, out) if what == "dit" else bench_tokenizer(args, out)
        shape = f"DiT {args.model}, T={args.window}" if what == "dit" else f"tokenizer {args.channels}, 160x120"
        mfu = f"{s['mfu']:.1%}" if isinstance(s["mfu"], float) else s["mfu"]
        rows.append(
            f"| {shape} | {args.batch} | {'yes' if args.compile else 'no'} | {s['params'] / 1e6:.2f}M "
            f"| {s['tokens_per_s']:,.0f} | {s['samples_per_s']:,.1f} | {mfu} |"
        )
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"\n{datetime.date.today()}, commit {commit}, {hw}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load} (the machine may be shared)\n"
    )
    print("| model | batch | compile | params | tokens/s | samples/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
