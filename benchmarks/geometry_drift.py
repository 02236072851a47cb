"""How far the env's pose drifts from the truth: the geometry head's odometry, integrated over K
steps, on the real frames of a recording and on the world model's frames for the same actions.

For each of ``--paths`` windows of a recording with poses (record it with new seeds): the real
``--context`` frames start a session, the world model plays the recorded actions for ``--steps``
frames, and the head's odometry runs over (a) the real frames and (b) the generated ones,
integrated from the true pose of the last context frame. Reported: the mean final position,
height (map units) and yaw (degrees) error of each, against the distance really walked; (b) is
what an agent in ``WorldModelEnv(observations=("rgb", "pose"))`` gets.

    worldgen record --env doom --out data/heldout --steps 3000 --seed 1000
    python benchmarks/geometry_drift.py --checkpoint default --geometry env/heads/default --data data/heldout
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
from worldgen.env.learned.geometry import integrate, load_head, predict_motion, wrap_degrees
from worldgen.evaluation.evaluate import select_windows


def odometry(head, frames: np.ndarray, keys: np.ndarray, mouse: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Poses ``(K + 1, 5)`` from ``start`` through the K transitions of ``frames`` (K + 1 frames),
    ``keys``/``mouse`` the K actions that made frames 1..K."""
    motion = predict_motion(head, frames[:-1], keys, mouse, frames[1:])
    poses = [np.asarray(start, np.float64)]
    for m in motion:
        poses.append(integrate(poses[-1], m))
    return np.stack(poses)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--geometry", default="env/heads/default", help="folder with the geometry head")
    p.add_argument("--data", required=True, help="a recording with poses, made with seeds no training used")
    p.add_argument("--paths", type=int, default=16)
    p.add_argument("--steps", type=int, default=32, help="K: generated frames per path")
    p.add_argument("--context", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    wm = WorldModel.load(args.checkpoint, device=args.device)
    head, _ = load_head(args.geometry, wm.device)
    ds = Dataset(args.data)
    if "pose" not in ds.fields:
        raise SystemExit(f"{ds.root}: no camera poses recorded; nothing to compare the odometry with")
    c, k = args.context, args.steps
    items = select_windows(ds, list(range(len(ds))), c + k, args.paths, args.seed, ("pose",))
    rows = []
    for n, it in enumerate(items):
        acts = [Action(a, m) for a, m in zip(it["keys"], it["mouse"])]
        gen = wm.rollout(it["frames"][:c], acts[:c], acts[c:], seed=args.seed + n)  # (K, H, W, 3)
        truth = it["pose"][c - 1 :].astype(np.float64)  # (K + 1, 5)
        keys, mouse = it["keys"][c:], it["mouse"][c:]
        real = odometry(head, it["frames"][c - 1 :], keys, mouse, truth[0])
        imagined = odometry(head, np.concatenate([it["frames"][c - 1 : c], gen]), keys, mouse, truth[0])
        walked = np.linalg.norm(np.diff(truth[:, :2], axis=0), axis=1).sum()
        rows.append(
            {
                "walked": walked,
                "displacement": float(np.linalg.norm(truth[-1, :2] - truth[0, :2])),
                **{
                    f"{name}_position_error": float(np.linalg.norm(est[-1, :2] - truth[-1, :2]))
                    for name, est in (("real", real), ("imagined", imagined))
                },
                **{
                    f"{name}_yaw_error": float(abs(wrap_degrees(est[-1, 3] - truth[-1, 3])))
                    for name, est in (("real", real), ("imagined", imagined))
                },
                **{
                    f"{name}_height_error": float(abs(est[-1, 2] - truth[-1, 2]))
                    for name, est in (("real", real), ("imagined", imagined))
                },
            }
        )
    mean = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    result = {
        "checkpoint": str(args.checkpoint),
        "geometry": args.geometry,
        "data": str(ds.root),
        "paths": len(rows),
        "steps": k,
        "context": c,
        "device": str(wm.device),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
        "mean": mean,
        "per_path": rows,
    }
    print(
        f"{len(rows)} paths of {k} steps ({mean['walked']:.0f} map units walked, {mean['displacement']:.0f} "
        f"displaced on average), {result['seconds']} s on {wm.device}\n"
    )
    print(
        "| frames the odometry reads | final position error (map units) | height error (map units) | yaw error (deg) |"
    )
    print("|---|---:|---:|---:|")
    for name, label in (("real", "real (the recording)"), ("imagined", "generated by the world model")):
        print(
            f"| {label} | {mean[f'{name}_position_error']:.1f} | {mean[f'{name}_height_error']:.1f} | "
            f"{mean[f'{name}_yaw_error']:.1f} |"
        )
    print(f"| standing still (no odometry) | {mean['displacement']:.1f} | | |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
