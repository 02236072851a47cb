"""What controllability can the real game itself show? ``worldgen eval``'s measure (PSNR at
h = 16 with the real actions minus with another window's actions, from the same context) taken
for ViZDoom instead of the model, at several levels of detail.

For every window of an eval.json the episode is replayed in ViZDoom (same map, seed and actions:
the engine is deterministic) to the window's last context frame, then the *shuffled* actions the
eval gave the model (``shuffled_from``) are played for h steps. That is the future a perfect
model should draw for them. Scored against the recorded future, like the model's rollouts:

* ``game``: the game's own frames. With the real actions they are the recording (PSNR capped),
  with the shuffled ones the PSNR says how far apart the two futures are.
* ``game at 1/k``: both futures with their detail removed below k pixels (area-downsampled by k,
  bilinearly upsampled). A model whose frames follow the actions exactly but are as blurred as
  this would score these two PSNRs; where the real-action PSNR falls to the model's own, the
  difference is the controllability such a model would show.
* ``model``: the eval.json's own rollout PSNRs at h (its ``curve`` and ``shuffled_curve``).
* ``last context frame`` and ``mean frame`` (the mean of the context frames of all windows):
  predictors that ignore actions (controllability 0 by construction; their PSNR for scale).

    worldgen eval --checkpoint default --data HELDOUT --split all --windows 64 --horizon 16 --json eval.json --no-media
    python benchmarks/control_ceiling.py --eval eval.json --data HELDOUT --horizons 1 4 8 16 --workers 16
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from worldgen.data import Dataset
from worldgen.evaluation.evaluate import CONTROL_HORIZON, EvaluationError, windows_at
from worldgen.evaluation.metrics import psnr

FACTORS = (2, 4, 8, 16)  # detail removed below k pixels; 160x120 frames


def replay_future(job: tuple[str, str, int, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, bool]:
    """``worldgen.env.sources.record.branch`` for one window (a picklable job for the process pool)."""
    from worldgen.env.sources.record import branch

    data, eid, last, (keys, mouse) = job
    frames, _, matched = branch(f"{data}::{eid}", last, keys, mouse)
    return frames, matched


def blur(frames: np.ndarray, k: int) -> np.ndarray:
    """(N, H, W, 3) uint8 with the detail below k pixels removed, as uint8."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    small = F.avg_pool2d(x, k)
    up = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return up.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--eval", type=Path, required=True, help="eval.json of `worldgen eval` on --data")
    p.add_argument("--data", required=True, help="the ViZDoom recording that eval ran on")
    p.add_argument("--horizons", type=int, nargs="+", default=[CONTROL_HORIZON], help="h to score at")
    p.add_argument("--workers", type=int, default=2, help="replay processes")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    result = json.loads(args.eval.read_text())
    if "shuffled_from" not in result.get("controllability", {}):
        raise SystemExit(f"{args.eval}: no per-window controllability (made by an older worldgen eval)")
    c, h = result["context"], max(args.horizons)
    if not 1 <= min(args.horizons) <= h <= result["horizon"]:
        raise SystemExit(f"--horizons must lie in [1, {result['horizon']}] (the eval's horizon)")
    starts, perm = result["window_starts"], result["controllability"]["shuffled_from"]
    try:
        items = windows_at(Dataset(args.data), starts, c + h)
    except EvaluationError as e:
        raise SystemExit(f"{args.eval}: {e}") from None

    real = np.stack([it["frames"][c:] for it in items])  # (N, h, H, W, 3)
    ctx = np.stack([it["frames"][:c] for it in items])  # (N, c, H, W, 3)
    # From window i's last context frame, window perm[i]'s actions after its context.
    jobs = [(args.data, e, s + c - 1, (items[j]["keys"][c:], items[j]["mouse"][c:])) for (e, s), j in zip(starts, perm)]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            done = list(pool.map(replay_future, jobs))
    else:
        done = [replay_future(job) for job in jobs]
    shuffled = np.stack([f for f, _ in done])
    matched = sum(m for _, m in done)
    held = np.repeat(ctx[:, -1:], h, 1)
    mean = np.broadcast_to(ctx.reshape(-1, *ctx.shape[2:]).mean(0).round().astype(np.uint8), real.shape)
    blurred = {k: (np.stack([blur(f, k) for f in real]), np.stack([blur(f, k) for f in shuffled])) for k in FACTORS}

    print(
        f"{len(starts)} windows of {args.eval} ({result['checkpoint']}), context {c}; the replay matched "
        f"the recording at the last context frame in {matched}/{len(starts)}\n"
    )
    out = {"eval": str(args.eval), "data": args.data, "windows": len(starts), "replay_matched": matched, "rows": []}
    for hh in args.horizons:

        def at(pred: np.ndarray, hh: int = hh) -> np.ndarray:  # per-window PSNR of frame hh
            return psnr(
                torch.from_numpy(np.ascontiguousarray(pred[:, hh - 1])), torch.from_numpy(real[:, hh - 1])
            ).numpy()

        rows = [("game", at(real), at(shuffled))]
        rows += [(f"game at 1/{k}", at(r), at(s)) for k, (r, s) in blurred.items()]
        ro = result["rollout"]
        rows += [
            ("model (eval.json)", np.array([ro["curve"][hh - 1]]), np.array([ro["shuffled_curve"][hh - 1]])),
            ("last context frame", at(held), at(held)),
            ("mean frame", at(mean), at(mean)),
        ]
        print(f"| h = {hh} | PSNR real actions | shuffled actions | controllability dB |")
        print("|---|---:|---:|---:|")
        for name, r, s in rows:
            out["rows"].append(
                {
                    "horizon": hh,
                    "predictor": name,
                    "real": float(r.mean()),
                    "shuffled": float(s.mean()),
                    "delta_db": float((r - s).mean()),
                }
            )
            print(f"| {name} | {r.mean():.2f} | {s.mean():.2f} | {(r - s).mean():+.2f} |")
        print()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
