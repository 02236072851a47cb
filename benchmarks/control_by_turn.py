"""Where does action controllability come from? ``worldgen eval``'s per-window PSNRs at h = 16
(real and shuffled actions) grouped by how far the camera really turned over those 16 steps.

If the view turns far, what is on screen at h = 16 was never in the context: the best any model
can do there is a guess, with the real actions or with another window's, and the two score
alike. Where the view turns little, the real actions keep the known scene in view and another
window's turn it away: that is where controllability can show. The turn is read off the
recording's camera pose (yaw, degrees): ``real turn`` = the net yaw change from the last context
frame to frame 16 (wrapped to [0, 180]); ``apart`` = the angle between where the real and the
shuffled actions point the camera at h = 16 (each window's own recorded turn).

    worldgen eval --checkpoint default --data data/heldout --split all --json eval.json
    python benchmarks/control_by_turn.py --eval eval.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from worldgen.data import Dataset
from worldgen.evaluation.evaluate import CONTROL_HORIZON

EDGES = (0, 30, 60, 90, 180.01)  # degrees; the default model's camera sees 90 degrees across


def wrap(deg: np.ndarray) -> np.ndarray:
    """Angles to [-180, 180)."""
    return (np.asarray(deg) + 180.0) % 360.0 - 180.0


def net_turns(result: dict, ds: Dataset) -> np.ndarray:
    """Signed yaw change (degrees) from each window's last context frame to h = 16."""
    ids = {e.id: i for i, e in enumerate(ds.episodes)}
    c, out = result["context"], []
    for episode, start in result["window_starts"]:
        yaw = ds.read(ids[episode], "pose", start + c - 1, start + c + CONTROL_HORIZON)[:, 3]
        out.append(wrap(yaw[-1] - yaw[0]))
    return np.array(out)


def table(label: str, angle: np.ndarray, real: np.ndarray, shuffled: np.ndarray) -> list[str]:
    rows = [
        f"| {label} (deg) | windows | PSNR@16 real | PSNR@16 shuffled | controllability dB |",
        "|---|---:|---:|---:|---:|",
    ]
    for lo, hi in zip(EDGES[:-1], EDGES[1:]):
        m = (angle >= lo) & (angle < hi)
        if m.any():
            rows.append(
                f"| {lo:g}-{min(hi, 180):g} | {m.sum()} | {real[m].mean():.2f} | {shuffled[m].mean():.2f} | "
                f"{real[m].mean() - shuffled[m].mean():+.2f} |"
            )
    rows.append(
        f"| all | {len(real)} | {real.mean():.2f} | {shuffled.mean():.2f} | {real.mean() - shuffled.mean():+.2f} |"
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--eval", type=Path, required=True, help="a worldgen eval JSON with per-window controllability")
    p.add_argument("--data", default=None, help="the recording it evaluated (default: the JSON's 'data')")
    args = p.parse_args(argv)
    result = json.loads(args.eval.read_text())
    ctl = result["controllability"]
    if "windows_real" not in ctl:
        raise SystemExit(
            f"{args.eval}: no per-window PSNRs (an eval older than this script, or a horizon "
            f"shorter than {CONTROL_HORIZON}); run worldgen eval again"
        )
    ds = Dataset(args.data or result["data"])
    if "pose" not in ds.fields:
        raise SystemExit(f"{ds.root}: no camera pose recorded; the turn cannot be measured")
    turn = net_turns(result, ds)
    real, shuffled = np.array(ctl["windows_real"]), np.array(ctl["windows_shuffled"])
    apart = np.abs(wrap(turn - turn[ctl["shuffled_from"]]))
    print(
        f"{result['checkpoint']} on {result['data']}: {len(real)} windows, context {result['context']}, "
        f"sampler {result['sampler']}"
    )
    print(
        f"real turn over {CONTROL_HORIZON} steps: median {np.median(np.abs(turn)):.0f} deg, "
        f"{(np.abs(turn) < 30).mean():.0%} of windows under 30 deg\n"
    )
    print("\n".join(table("real turn", np.abs(turn), real, shuffled)))
    print()
    print("\n".join(table("apart", apart, real, shuffled)))


if __name__ == "__main__":
    main()
