"""How well does a DiT guess the next latent in one step, at which noise label, with which action?

On held-out windows of ``context + 1`` frames, the last frame is replaced by pure noise labelled
``t`` and the model's one-step estimate ``x0 = x_t - t v`` is compared with the true latent (MSE),
with the real action and with another window's. Copying the last context latent is the
reference; ``copy / variance`` tells how predictable consecutive latents are at all (a property
of the tokenizer). This is the probe behind ``worldgen.sampling.T_MAX`` (docs/history/results-2026-12.md).

    python benchmarks/one_step_probe.py --checkpoint default --data data/doom-heldout --levels 1.0 0.97 0.9
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from worldgen import actions, sampling
from worldgen.data import Dataset
from worldgen.evaluation.evaluate import select_windows
from worldgen.models import frames_to_tensor, load_dit, load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--data", required=True, help="held-out recording (every episode is used)")
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--context", type=int, default=15)
    p.add_argument("--levels", type=float, nargs="+", default=[1.0, 0.97, 0.9, 0.8])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    tok, dit = load_tokenizer(args.checkpoint).eval(), load_dit(args.checkpoint).float().eval()
    ds, c = Dataset(args.data), args.context
    items = select_windows(ds, list(range(len(ds))), c + 1, args.windows, args.seed)
    frames = torch.from_numpy(np.stack([i["frames"] for i in items]))  # (N, c+1, H, W, 3)
    acts = torch.from_numpy(np.stack([actions.to_vector(i["keys"], i["mouse"]) for i in items]))
    n = len(items)
    with torch.no_grad():
        z = tok.encode(frames_to_tensor(frames.flatten(0, 1))).float()
        z = z.reshape(n, c + 1, *z.shape[1:])  # (N, c+1, C, h, w)
        target, last = z[:, c:], z[:, c - 1 : c]
        copy = ((last - target) ** 2).mean().item()
        print(
            f"{n} windows, context {c}: copy-last MSE {copy:.4f}, latent variance {z.var().item():.4f}, "
            f"copy / variance {copy / z.var().item():.3f}"
        )
        eps = torch.randn(target.shape, generator=torch.Generator().manual_seed(args.seed))
        shuffled = acts[torch.roll(torch.arange(n), 1), c]
        for level in args.levels:
            row = []
            for a in (acts[:, c], shuffled):
                x = sampling.add_noise(target, eps, level)
                t = torch.cat([torch.zeros(n, c), torch.full((n, 1), level)], 1)
                v = dit(torch.cat([z[:, :c], x], 1), t, torch.cat([acts[:, :c], a[:, None]], 1))[:, c:]
                row.append(((x - level * v - target) ** 2).mean().item())
            print(f"t = {level:.2f}: one-step MSE real action {row[0]:.4f}, shuffled {row[1]:.4f}")


if __name__ == "__main__":
    main()
