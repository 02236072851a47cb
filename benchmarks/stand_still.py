"""Does the world stand still when the player does? From real context frames of a ViZDoom
recording, each world model plays K no-op actions; ViZDoom replays the same window and plays the
same no-ops (``worldgen.env.sources.record.branch``). Scored like ``worldgen eval`` scores rollouts: PSNR
of frame h against the game's frame h, next to the last context frame held still (the game
itself barely moves under no-ops: the player's momentum, monsters, the weapon's bob).

    worldgen record --env doom --out HELDOUT --steps 3000 --workers 2 --seed 1000
    python benchmarks/stand_still.py --checkpoint default OTHER_MODEL --data HELDOUT --paths 12 --steps 24
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from worldgen.actions import Action
from worldgen.data import Dataset
from worldgen.engine import WorldModel
from worldgen.env.sources.record import branch
from worldgen.evaluation.evaluate import select_windows
from worldgen.evaluation.metrics import psnr


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", nargs="+", default=["default"], help="one or more model folders")
    p.add_argument("--data", required=True, help="a ViZDoom recording made by `worldgen record --env doom`")
    p.add_argument("--paths", type=int, default=12)
    p.add_argument("--steps", type=int, default=24, help="K: no-op steps per path")
    p.add_argument("--context", type=int, default=8)
    p.add_argument("--horizons", type=int, nargs="+", default=[1, 8, 24])
    p.add_argument("--seed", type=int, default=0, help="picks the windows and seeds the sampler noise")
    p.add_argument("--device", default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    c, k = args.context, args.steps
    if not all(1 <= h <= k for h in args.horizons):
        raise SystemExit(f"--horizons must lie in [1, --steps {k}]")

    t0 = time.perf_counter()
    ds = Dataset(args.data)
    items = select_windows(ds, list(range(len(ds))), c, args.paths, args.seed)
    keys, mouse = np.zeros((k, 8), np.uint8), np.zeros((k, 2), np.float32)
    noop = Action(keys[0], mouse[0])
    game, matched = [], 0
    for it in items:
        frames, _, ok = branch(f"{args.data}::{ds.episodes[it['episode']].id}", int(it["start"]) + c - 1, keys, mouse)
        game.append(frames)
        matched += ok
    game = torch.from_numpy(np.stack(game))  # (P, K, H, W, 3)
    # How often the recorded player itself stood still: what a model trained on such play saw.
    moved = [ds.read(i, "keys").any(1) | ds.read(i, "mouse").any(1) for i in range(len(ds))]
    noop_share = 1 - float(np.concatenate(moved).mean())

    def at(pred: torch.Tensor) -> dict[str, float]:  # mean PSNR of frame h over paths
        return {str(h): float(psnr(pred[:, h - 1], game[:, h - 1]).mean()) for h in args.horizons}

    held = torch.from_numpy(np.stack([it["frames"][c - 1] for it in items]))[:, None].expand_as(game)
    rows = {"last context frame held": at(held)}
    for ck in args.checkpoint:
        wm = WorldModel.load(ck, device=args.device)
        gen = [
            wm.rollout(
                it["frames"], [Action(a, m) for a, m in zip(it["keys"], it["mouse"])], [noop] * k, seed=args.seed + n
            )
            for n, it in enumerate(items)
        ]
        rows[ck] = at(torch.from_numpy(np.stack(gen)))
    result = {
        "data": str(ds.root),
        "noop_share": noop_share,
        "paths": len(items),
        "steps": k,
        "context": c,
        "replay_matched": matched,
        "psnr": rows,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(
        f"{len(items)} paths, {c} real context frames then {k} no-ops; the replay matched the recording at "
        f"the last context frame in {matched}/{len(items)}; the recorded player stood still on "
        f"{noop_share:.1%} of its steps; {result['seconds']} s\n"
    )
    print("| frames scored against the game's | " + " | ".join(f"PSNR@{h}" for h in args.horizons) + " |")
    print("|---|" + "---:|" * len(args.horizons))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in r.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
