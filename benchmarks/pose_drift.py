"""Camera pose drift of a world-cache session on recorded play: the motion model alone, and the
motion model corrected by each frame's depth against the cloud (:mod:`worldgen.memory.align`).

A world-cache session predicts each frame's camera before the frame exists (the view is
rendered there), then may correct it from the frame. Here the frames are the game's own,
recorded with depth: each session starts from a recorded context at its true poses, then plays
the recorded actions; every step it predicts the pose, renders its cloud there, corrects the
pose from the recorded frame's depth (arm ``corrected``) or keeps the prediction (``predicted``),
and fuses the frame at that pose, exactly as :class:`~worldgen.engine.world_cache.CachePool`
does for a model's sessions. The errors are against the recorded poses (the game replaying the
same actions). This is the correction's ceiling: a model's generated depth is less exact than
the game's (``worldgen eval`` reports the same errors on a model's rollouts, ``world_cache.pose``).

Reported per arm: position error (map units) and yaw error (degrees) after 1, 16, 64 and 256
steps (drift), and the per-step error: the error of each step's motion (position and yaw change)
against the recorded one.

    worldgen record --env doom --steps 20000 --workers 16 --seed 1 --out TRAIN
    worldgen record --env doom --steps 16000 --workers 16 --seed 1000 --out HELDOUT
    python benchmarks/pose_drift.py --train TRAIN --data HELDOUT --horizon 256 --json drift.json
    python benchmarks/pose_drift.py --checkpoint MODEL --data HELDOUT   # a world-cache model's motion model
    python benchmarks/pose_drift.py --train TRAIN --data VAL --windows 16 --horizon 64 --min-gain 0  # min_gain
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from worldgen import actions
from worldgen.data import Dataset
from worldgen.data.camera import dataset_camera
from worldgen.engine.world_cache import CachePool, PlayCache
from worldgen.memory.align import AlignConfig
from worldgen.memory.motion import pose_error
from worldgen.training.dynamics import fit_motion


def windows(ds: Dataset, n: int, context: int, horizon: int, gap: int) -> list[tuple[int, int]]:
    """Up to ``n`` (episode, first context frame) with ``context + horizon`` frames after them,
    ``gap`` frames apart within an episode, taken round-robin over the episodes."""
    per = [[(e, s) for s in range(1, ds.episodes[e].length - context - horizon + 1, gap)] for e in range(len(ds))]
    out = []
    while len(out) < n and any(per):
        for lst in per:
            if lst and len(out) < n:
                out.append(lst.pop(0))
    if not out:
        raise SystemExit(f"no episode has {context + horizon + 1} frames")
    return out


def read(ds: Dataset, items: list[tuple[int, int]], length: int) -> tuple[torch.Tensor, ...]:
    """rgb (B, L, H, W, 3), depth levels (B, L, H, W), pose (B, L, 5), and the actions that
    *produced* each frame (B, L, A): the dataset stores each after its frame."""
    out = []
    for e, s in items:
        keys, mouse = ds.read(e, "keys", s - 1, s + length - 1), ds.read(e, "mouse", s - 1, s + length - 1)
        out.append(
            [torch.from_numpy(ds.read(e, f, s, s + length)) for f in ("frames", "depth", "pose")]
            + [torch.from_numpy(actions.to_vector(keys, mouse))]
        )
    return tuple(torch.stack(x) for x in zip(*out))


def play(settings: PlayCache, data: tuple[torch.Tensor, ...], context: int, device: torch.device) -> torch.Tensor:
    """The poses (B, horizon, 5) a session's cache holds for each played frame."""
    rgb, depth, pose, acts = (x.to(device) for x in data)
    b, horizon = len(rgb), rgb.shape[1] - context
    pool = CachePool(settings, acts.shape[-1], device, slots=b)
    slots = torch.tensor([pool.acquire() for _ in range(b)], device=device)
    for i, s in enumerate(slots.tolist()):
        pool.start(s, None, rgb[i, :context], depth[i, :context].float(), pose[i, :context], acts[i, :context])
    out = []
    for t in range(context, context + horizon):
        rendered = pool.render(slots, acts[:, t])
        frame = torch.cat([rgb[:, t], depth[:, t, ..., None]], -1)  # (B, H, W, 4) uint8
        out.append(pool.fuse(slots, rendered, frame, acts[:, t]))
    return torch.stack(out, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a recording with depth and poses (held-out play)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--train", help="fit the motion model on this recording")
    src.add_argument("--checkpoint", help="a world-cache model: its camera and motion model")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--context", type=int, default=15)
    p.add_argument("--horizon", type=int, default=256)
    p.add_argument("--gap", type=int, default=97, help="frames between windows of one episode")
    p.add_argument("--min-gain", type=float, default=AlignConfig.min_gain, help="the correction's AlignConfig.min_gain")
    p.add_argument("--yaw-step", type=float, default=AlignConfig.yaw_step, help="the correction's AlignConfig.yaw_step")
    p.add_argument("--camera", default=None, help="JSON of camera fields to override, e.g. '{\"depth_scale\": 6.25}'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json")
    args = p.parse_args()

    ds = Dataset(args.data)
    if args.checkpoint:
        from worldgen import checkpoint

        settings = PlayCache.from_dict(
            checkpoint.config(checkpoint.resolve(args.checkpoint), "dynamics")["world_cache"]
        )
    else:
        train = Dataset(args.train)
        settings = PlayCache(4, dataset_camera(ds), fit_motion(train, list(range(len(train)))))
    items = windows(ds, args.windows, args.context, args.horizon, args.gap)
    data = read(ds, items, args.context + args.horizon)
    device = torch.device(args.device)
    true, before = data[2][:, args.context :].to(device).float(), data[2][:, args.context - 1].to(device).float()
    result = {"data": args.data, "windows": len(items), "context": args.context, "horizon": args.horizon, "arms": {}}
    if args.camera:
        settings = dataclasses.replace(settings, camera=dataclasses.replace(settings.camera, **json.loads(args.camera)))
    correction = AlignConfig(min_gain=args.min_gain, yaw_step=args.yaw_step)
    for arm, align in (("predicted", None), ("corrected", correction)):
        t0 = time.perf_counter()
        made = play(dataclasses.replace(settings, align=align), data, args.context, device)
        result["arms"][arm] = {**pose_error(made, true, before), "seconds": round(time.perf_counter() - t0, 1)}
        print(arm, json.dumps(result["arms"][arm]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
