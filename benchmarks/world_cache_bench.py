"""The point-cloud world cache on recorded play: speed per frame at several batch sizes, memory per
session, and how well the cache predicts the next real frame (:mod:`worldgen.memory.cloud`).

Each session plays one stretch of a recorded episode as a world-cache session would: render the
cache at the next frame's (true) pose, then fuse the frame. Reported per batch size: milliseconds
per step of the whole batch (render + update), frames/s, and, over every step after the first,
the PSNR of the render against the real next frame where its mask is valid, the mask's cover,
and hold-last-frame's PSNR on the same frames. The game changes between frames by itself too
(monsters, muzzle flashes, the weapon): over the steps where the camera did not move (under one
map unit and half a degree), ``still_psnr`` is the PSNR between the two real frames, a ceiling
that no cache, however exact, can pass on this play.

    worldgen record --env doom --steps 16000 --workers 16 --seed 1000 --out HELDOUT
    python benchmarks/world_cache_bench.py --data HELDOUT --batch 1,64 --steps 256 --json cache_bench.json
    python benchmarks/world_cache_bench.py --data VAL --batch 16 --steps 64 --cache '{"blend_sigma": 0.75}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from worldgen.data import Dataset
from worldgen.data.camera import dataset_camera
from worldgen.memory.camera import Camera
from worldgen.memory.cloud import CacheConfig, WorldCache


def stretches(ds: Dataset, batch: int, steps: int) -> tuple[torch.Tensor, ...]:
    """``batch`` stretches of ``steps + 1`` frames, spread over the episodes long enough:
    rgb (B, S, H, W, 3), depth (B, S, H, W), pose (B, S, 5)."""
    long = [e for e in range(len(ds)) if ds.episodes[e].length > steps]
    if not long:
        raise SystemExit(f"no episode has more than {steps} frames")
    out = []
    for i in range(batch):
        e = long[i % len(long)]
        start = (i // len(long)) * 97 % max(1, ds.episodes[e].length - steps - 1)
        out.append([torch.from_numpy(ds.read(e, f, start, start + steps + 1)) for f in ("frames", "depth", "pose")])
    return tuple(torch.stack(x) for x in zip(*out))


def psnr(se: float) -> float:
    return float(10 * np.log10(255.0**2 / max(se, 1e-12)))


def run(ds: Dataset, batch: int, steps: int, config: CacheConfig, device: torch.device, camera: Camera) -> dict:
    rgb, depth, pose = (x.to(device) for x in stretches(ds, batch, steps))
    cache = WorldCache(camera, config, batch=batch, device=device)
    cache.update(rgb[:, 0], depth[:, 0], pose[:, 0])
    se, n, held, cover, times = 0.0, 0, 0.0, 0.0, []
    still_se, still_n = 0.0, 0
    for t in range(1, steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        view = cache.render(pose[:, t])
        cache.update(rgb[:, t], depth[:, t], pose[:, t])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        err = ((view.rgb.float() - rgb[:, t].float()) ** 2).mean(-1)  # (B, H, W)
        se += float(err[view.mask].sum())
        n += int(view.mask.sum())
        cover += float(view.mask.float().mean())
        change = ((rgb[:, t - 1].float() - rgb[:, t].float()) ** 2).mean((1, 2, 3))  # (B,)
        held += float(change.mean())
        moved = pose[:, t] - pose[:, t - 1]
        still = (moved[:, :3].norm(dim=-1) < 1) & (moved[:, 3:].abs().amax(-1) < 0.5)
        still_se, still_n = still_se + float(change[still].sum()), still_n + int(still.sum())
    ms = 1000 * float(np.median(times[min(5, len(times) - 1) :]))  # the first steps warm the allocator up
    return {
        "batch": batch,
        "steps": steps,
        "ms_per_step": ms,
        "frames_per_s": batch * 1000 / ms,
        "render_psnr": psnr(se / max(n, 1)),
        "mask_cover": cover / steps,
        "hold_last_psnr": psnr(held / steps),
        "still_steps": still_n,
        "still_psnr": psnr(still_se / still_n) if still_n else None,
        "points_per_session": float(cache.num_points().float().mean()),
        "bytes_per_session": cache.nbytes() // batch,
        "max_points": config.max_points,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a recording with depth and poses (ViZDoom)")
    p.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=256, help="frames each session plays")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--camera", default=None, help="JSON of camera fields to override, e.g. '{\"depth_scale\": 6.25}'")
    p.add_argument(
        "--cache", default=None, help="JSON of CacheConfig fields to override, e.g. '{\"max_points\": 32768}'"
    )
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    ds = Dataset(args.data)
    camera = dataclasses.replace(dataset_camera(ds), **json.loads(args.camera or "{}"))
    config = CacheConfig(**json.loads(args.cache or "{}"))
    rows = []
    for b in (int(x) for x in args.batch.split(",")):
        row = run(ds, b, args.steps, config, torch.device(args.device), camera)
        print(json.dumps(row))
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
