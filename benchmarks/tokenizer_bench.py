"""Tokenizer encode and decode throughput in frames/s, batched.

    python benchmarks/tokenizer_bench.py                                   # CPU, default config
    python benchmarks/tokenizer_bench.py --device cuda --dtype bf16 --batch 1 64 256 --channels-last
    python benchmarks/tokenizer_bench.py --checkpoint runs/tok/ckpt       # a trained tokenizer

Speed depends on the config, not on the weights, so an untrained default-config tokenizer
measures the same as a trained one. Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
from contextlib import nullcontext

import torch

from worldgen.models import Tokenizer, TokenizerConfig, load_tokenizer
from worldgen.provenance import git_commit, time_per_call


def rate(frames_per_s: float) -> str:
    return f"{frames_per_s:,.0f}" if frames_per_s >= 100 else f"{frames_per_s:.3g}"


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # The load average shows whether other work shared the cores during the measurement.
    return (
        f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} "
        f"threads, load average {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint", default="", help="tokenizer checkpoint folder (default: untrained default config)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes to measure")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convs on GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile encode and decode")
    p.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = p.parse_args()

    device = torch.device(args.device)
    tok = load_tokenizer(args.checkpoint, device) if args.checkpoint else Tokenizer(TokenizerConfig()).to(device).eval()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    tok = tok.to(memory_format=fmt)
    encode, decode = tok.encode, tok.decode
    if args.compile:
        encode, decode = torch.compile(encode), torch.compile(decode)
    amp = torch.autocast(device.type, torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    cfg = tok.cfg
    params = sum(p.numel() for p in tok.parameters())

    rows = []
    with torch.inference_mode(), amp:
        for b in args.batch:
            x = torch.rand(b, cfg.in_channels, *cfg.image_size, device=device).mul(2).sub(1).to(memory_format=fmt)
            z = encode(x).to(memory_format=fmt)
            (t_enc, cpu_enc), (t_dec, cpu_dec) = (
                time_per_call(lambda x=x: encode(x), device, args.seconds, warmup=2),
                time_per_call(lambda z=z: decode(z), device, args.seconds, warmup=2),
            )
            rows.append((b, b / t_enc, b / t_dec, 1e3 * t_enc, 1e3 * t_dec, b / cpu_enc, b / cpu_dec))

    commit = git_commit()
    print(
        f"tokenizer {dataclasses.asdict(cfg)['channels']} widths, {params / 1e6:.2f}M params, "
        f"{cfg.image_size[1]}x{cfg.image_size[0]}x{cfg.in_channels} -> {cfg.latent_channels}x"
        f"{cfg.latent_size[0]}x{cfg.latent_size[1]}"
    )
    print(
        f"hardware: {hardware(device)}; torch {torch.__version__}; {args.dtype}"
        f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}; "
        f"{datetime.date.today()}; commit {commit or 'unknown'}\n"
    )
    cpu = device.type == "cpu"
    print(
        "| batch | encode frames/s | decode frames/s | encode ms/batch | decode ms/batch |"
        + (" encode frames/CPU-s | decode frames/CPU-s |" if cpu else "")
    )
    print("|---:|---:|---:|---:|---:|" + ("---:|---:|" if cpu else ""))
    for b, enc, dec, ms_e, ms_d, cpu_e, cpu_d in rows:
        print(
            f"| {b} | {rate(enc)} | {rate(dec)} | {ms_e:.1f} | {ms_d:.1f} |"
            + (f" {rate(cpu_e)} | {rate(cpu_d)} |" if cpu else "")
        )


if __name__ == "__main__":
    main()
