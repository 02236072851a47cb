"""What the fine-tune on own rollouts pays to generate: B windows of G frames from T - 1 context
frames, by recomputing the T-frame window at every Euler step (``worldgen.sampling.rollout``)
and by the engine's KV cache as a session plays (``worldgen.engine.rollout_latents``, what
``worldgen train dynamics --rollout-frames`` uses).

    python benchmarks/rollout_speed.py --checkpoint default --batch 4 --device cpu --threads 2
    python benchmarks/rollout_speed.py --checkpoint default --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from worldgen import sampling
from worldgen.engine import StreamConfig, rollout_latents
from worldgen.models import load_dit


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=15, help="G, generated frames per window")
    p.add_argument("--window", type=int, default=16, help="T, the trained window")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--ctx-noise", type=float, default=0.1)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dit = load_dit(args.checkpoint).float().to(device).eval()
    b, t = args.batch, args.window
    ctx = torch.randn(b, t - 1, dit.cfg.latent_channels, *dit.cfg.latent_size, device=device)
    acts, future = (
        torch.zeros(b, t - 1, dit.cfg.action_dim, device=device),
        torch.zeros(b, args.frames, dit.cfg.action_dim, device=device),
    )
    stream = StreamConfig(steps=args.steps, ctx_noise=args.ctx_noise, window=t - 1 - StreamConfig.sinks)

    def timed(fn) -> float:
        fn()  # warm-up (allocator, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        recompute = timed(
            lambda: sampling.rollout(dit, ctx, acts, future, stream, window=t, generator=torch.Generator(device))
        )
        cached = timed(lambda: rollout_latents(dit, stream, ctx, acts, future, torch.Generator(device)))
    print(
        f"{b} windows x {args.frames} frames, {args.steps} Euler steps, {device}: recompute {recompute:.2f} s, "
        f"cached {cached:.2f} s, {recompute / cached:.1f}x"
    )
    return {"recompute_s": recompute, "cached_s": cached}


if __name__ == "__main__":
    main()
