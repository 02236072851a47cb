"""Fit a world's camera (focal lengths, pitch shear, depth units) to a recording with depth and
poses, and print the reprojection error of the preset and the fit (:mod:`worldgen.memory.camera`).

    worldgen record --env doom --steps 400 --workers 2 --seed 1000 --out data/camfit
    python benchmarks/fit_camera.py --data data/camfit --episodes 2 --json camfit.json

Each episode is fitted on its own (poses do not carry across episodes); a few hundred frames at
160x120 take a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from worldgen.data import Dataset
from worldgen.memory.camera import DOOM, fit_camera, reprojection_error


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset folder recorded with depth and pose")
    p.add_argument("--episodes", type=int, default=2, help="fit on the first N episodes")
    p.add_argument("--frames", type=int, default=120, help="at most this many frames per episode")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    ds = Dataset(args.data)
    if not (ds.index["has_depth"] and ds.index["pose"]):
        raise SystemExit(f"{args.data}: the recording has no depth or no poses")
    preset = DOOM.resized(*ds.resolution)
    out = []
    for e in range(min(args.episodes, len(ds))):
        stop = min(args.frames, ds.episodes[e].length)
        depth = torch.from_numpy(ds.read(e, "depth", 0, stop))
        pose = torch.from_numpy(ds.read(e, "pose", 0, stop))
        fitted, err = fit_camera(depth, pose, preset)
        row = {
            "episode": ds.episodes[e].id,
            "frames": stop,
            "preset_error": reprojection_error(preset, depth, pose),
            "fitted": dataclasses.asdict(fitted),
            "fitted_error": err,
        }
        print(json.dumps(row))
        out.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
