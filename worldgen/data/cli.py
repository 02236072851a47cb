"""``worldgen data``: look at a recorded dataset.

worldgen data info DATASET [--json]        counts, maps, seeds, split, action histogram, validation
worldgen data view DATASET [--out DIR] [--episode ID|N] [--frames K]
                                           strip.png (frames over their depth), clip.mp4,
                                           coverage.png (when poses were recorded)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from worldgen import actions
from worldgen.data.dataset import DOOM_TICS_PER_SECOND, Dataset, DatasetError
from worldgen.files import atomic_write, write_mp4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    info = sub.add_parser("info", help="counts, maps, seeds, split, action histogram, validation")
    info.add_argument("dataset", type=Path)
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.add_argument("--heldout", type=float, default=0.1, help="held-out fraction of the split shown")
    view = sub.add_parser("view", help="strip.png of frames over depth, clip.mp4, coverage.png")
    view.add_argument("dataset", type=Path)
    view.add_argument("--out", type=Path, help="output folder (default: DATASET/view)")
    view.add_argument("--episode", default="0", help="episode id or index (0-based), see `data info`")
    view.add_argument("--frames", type=int, default=8, help="frames in the strip, evenly spaced")
    view.add_argument("--clip-steps", type=int, default=1000, help="steps of the episode in clip.mp4")
    view.add_argument(
        "--fps",
        type=float,
        help="clip frame rate (default: the source's fps if recorded, else 35 / frame skip, Doom speed)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        ds = Dataset(args.dataset)
        return info(ds, args) if args.data_command == "info" else view(ds, args)
    except (DatasetError, ValueError) as e:
        print(f"worldgen data: {e}", file=sys.stderr)
        return 1


# --- info -----------------------------------------------------------------------------------


def summarize(ds: Dataset, heldout_fraction: float = 0.1) -> dict[str, Any]:
    """Everything `worldgen data info` reports, as plain data. Validates every shard.

    Example:
        >>> summarize(Dataset("data/demo"))["steps"]   # doctest: +SKIP
        300
    """
    lengths = np.array([e.length for e in ds.episodes])
    per_map = Counter()
    for e in ds.episodes:
        per_map[e.map or "?"] += e.length
    train, held = ds.split(heldout_fraction)
    shards = [s for e in ds.episodes for s in e.shards]
    summary: dict[str, Any] = {
        "dataset": str(ds.root),
        "source": ds.index["source"],
        "episodes": len(ds),
        "steps": ds.num_steps,
        "terminal_episodes": sum(e.terminal for e in ds.episodes),
        "episode_length": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())}
        if len(ds)
        else None,
        "maps": sorted(per_map),
        "steps_per_map": dict(sorted(per_map.items())),
        "seeds": [e.seed for e in ds.episodes],
        "ids": [e.id for e in ds.episodes],
        "resolution": list(ds.resolution),
        "frame_skip": ds.frame_skip,
        "fields": ds.fields,
        "variables": ds.variable_names,
        "split": {
            "heldout_fraction": heldout_fraction,
            "train_episodes": len(train),
            "heldout_episodes": len(held),
            "train_steps": sum(ds.episodes[i].length for i in train),
            "heldout_steps": sum(ds.episodes[i].length for i in held),
        },
        "shards": len(shards),
        "bytes": sum(s["bytes"] for s in shards),
        "stray_files": [str(p.relative_to(ds.root)) for p in ds.stray_files()],
    }
    try:
        ds.validate()
        summary["validation"] = "ok"
    except DatasetError as e:
        summary["validation"] = f"FAILED: {e}"
        summary["actions"] = None  # reading actions would fail on the same file
        return summary
    summary["actions"] = action_stats(ds)
    return summary


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation, None where either side is constant."""
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else None


def action_stats(ds: Dataset) -> dict[str, Any]:
    """Fraction of steps each key is held; mouse delta statistics (degrees per step)."""
    per_key = [ds.read(i, "keys") for i in range(len(ds))]
    per_mouse = [ds.read(i, "mouse") for i in range(len(ds))]
    keys = np.concatenate(per_key) if len(ds) else np.zeros((0, 8))
    mouse = np.concatenate(per_mouse) if len(ds) else np.zeros((0, 2))
    # How well one step's action foretells the next (pairs inside episodes): a model can copy
    # what it sees the player doing unless the actions change often.
    pairs = [(k[:-1], k[1:]) for k in per_key if len(k) > 1]
    repeat = float(np.concatenate([(a == b).all(1) for a, b in pairs]).mean()) if pairs else None
    lagged = [np.concatenate(x) for x in zip(*[(m[:-1], m[1:]) for m in per_mouse if len(m) > 1])] or None
    stats: dict[str, Any] = {
        "keys_held": {k: float(keys[:, j].mean()) if len(keys) else 0.0 for j, k in enumerate(actions.KEYS)},
        "no_key_held": float((keys.sum(1) == 0).mean()) if len(keys) else 0.0,
        "keys_repeat": repeat,  # share of steps whose keys are the step before's
        "mouse": {
            m: {
                "mean": float(v.mean()),
                "std": float(v.std()),
                "abs_mean": float(np.abs(v).mean()),
                "min": float(v.min()),
                "max": float(v.max()),
                "nonzero": float((v != 0).mean()),
                # correlation of each step's delta with the step before's (None: constant or too short)
                "lag1_corr": _corr(lagged[0][:, j], lagged[1][:, j]) if lagged is not None else None,
            }
            if len(v)
            else None
            for j, (m, v) in enumerate(zip(actions.MOUSE, mouse.T))
        },
    }
    if "env_actions" in ds.fields and len(ds):
        env = np.concatenate([ds.read(i, "env_actions") for i in range(len(ds))])
        stats["env_actions"] = {
            "space": ds.index["source"].get("env_action_space"),
            "mean": env.mean(0).round(4).tolist(),
        }
    return stats


def info(ds: Dataset, args: argparse.Namespace) -> int:
    s = summarize(ds, args.heldout)
    ok = s["validation"] == "ok"
    if args.json:
        print(json.dumps(s, indent=1))
        return 0 if ok else 1
    src = s["source"]
    lines = [
        f"dataset    {s['dataset']}: {s['shards']} shards, {s['bytes'] / 2**20:.1f} MiB",
        f"source     {', '.join(f'{k}={v}' for k, v in src.items() if not isinstance(v, (dict, list)))}",
        f"episodes   {s['episodes']} ({s['terminal_episodes']} ended by the game), {s['steps']:,} steps"
        + (
            f", length min/mean/max {s['episode_length']['min']}/{s['episode_length']['mean']:.0f}/"
            f"{s['episode_length']['max']}"
            if s["episode_length"]
            else ""
        ),
        f"frames     {s['resolution'][0]}x{s['resolution'][1]} RGB, frame skip {s['frame_skip']}, "
        f"arrays {', '.join(s['fields'])}" + (f"; variables {', '.join(s['variables'])}" if s["variables"] else ""),
        "maps       "
        + ", ".join(f"{m} {n:,} steps ({n / max(s['steps'], 1):.0%})" for m, n in s["steps_per_map"].items()),
        f"seeds      {_short(s['seeds'])}",
        f"ids        {_short(s['ids'])} (index order; `--episode` takes an id or an index)",
        f"split      train {s['split']['train_episodes']} episodes / {s['split']['train_steps']:,} steps, "
        f"held-out {s['split']['heldout_episodes']} / {s['split']['heldout_steps']:,} "
        f"(fraction {s['split']['heldout_fraction']}, by episode id hash)",
    ]
    if s["actions"]:
        a = s["actions"]
        lines.append(
            "keys held  "
            + "  ".join(f"{k} {v:.1%}" for k, v in a["keys_held"].items())
            + f"  (none {a['no_key_held']:.1%})"
            + ("" if a["keys_repeat"] is None else f"; same keys as the step before {a['keys_repeat']:.1%}")
        )
        for m, st in a["mouse"].items():
            if st:
                lines.append(
                    f"mouse {m:<5s} mean {st['mean']:+.2f}  std {st['std']:.2f}  |mean| {st['abs_mean']:.2f}"
                    f"  range [{st['min']:.1f}, {st['max']:.1f}]  nonzero {st['nonzero']:.1%}"
                    + ("" if st["lag1_corr"] is None else f"  lag-1 corr {st['lag1_corr']:.2f}")
                    + "  (degrees/step)"
                )
        if "env_actions" in a:
            space = (a["env_actions"]["space"] or {}).get("repr", "?")
            means = [f"{m:.3f}" for m in a["env_actions"]["mean"]]
            lines.append(f"env action {space}: mean of each flattened dimension {_short(means)}")
    if s["stray_files"]:
        lines.append(
            f"strays     {len(s['stray_files'])} files in shards/ not in the index (an interrupted "
            f"recording; never read): {_short(s['stray_files'])}"
        )
    lines.append(f"validation {s['validation']}")
    print("\n".join(lines))
    return 0 if ok else 1


def _short(items: list, n: int = 12) -> str:
    return ", ".join(map(str, items[:n])) + (f", ... ({len(items)} in all)" if len(items) > n else "")


# --- view -----------------------------------------------------------------------------------


def depth_to_rgb(depth: np.ndarray, far: float | None = None) -> np.ndarray:
    """``(..., H, W)`` depth -> ``(..., H, W, 3)`` uint8, near bright, far dark (magma).

    ``far`` is the depth drawn darkest; default: the largest value in ``depth``.
    """
    from matplotlib import colormaps

    d = depth.astype(np.float32)
    far = float(d.max()) if far is None else far
    return colormaps["magma_r"](np.clip(d / max(far, 1e-6), 0, 1), bytes=True)[..., :3]


def strip(ds: Dataset, episode: int, k: int) -> tuple[np.ndarray, list[int]]:
    """K frames evenly spaced over an episode, side by side, their depth under them."""
    length = ds.episodes[episode].length
    steps = sorted(set(np.linspace(0, length - 1, min(k, length)).round().astype(int).tolist()))
    frames = np.stack([ds.read(episode, "frames", s, s + 1)[0] for s in steps])  # (K, H, W, 3)
    rows = [np.concatenate(list(frames), axis=1)]  # (H, K*W, 3)
    if "depth" in ds.fields:
        depth = np.stack([ds.read(episode, "depth", s, s + 1)[0] for s in steps])
        rows.append(np.concatenate(list(depth_to_rgb(depth)), axis=1))
    return np.concatenate(rows, axis=0), steps


def write_clip(ds: Dataset, episode: int, path: Path, steps: int, fps: float) -> int:
    """The episode's first ``steps`` frames (depth alongside) as an H.264 mp4; returns frames written."""
    stop = min(steps, ds.episodes[episode].length)
    video = ds.read(episode, "frames", 0, stop)  # (T, H, W, 3)
    if "depth" in ds.fields:
        depth = ds.read(episode, "depth", 0, stop)
        video = np.concatenate([video, depth_to_rgb(depth)], axis=2)  # (T, H, 2W, 3)
    write_mp4(path, video, fps)
    return stop


def view(ds: Dataset, args: argparse.Namespace) -> int:
    from PIL import Image

    episode = ds.episode_index(args.episode)
    if args.frames < 1 or args.clip_steps < 1:
        raise ValueError("--frames and --clip-steps must be >= 1")
    out = args.out or ds.root / "view"
    info = ds.episodes[episode]
    image, steps = strip(ds, episode, args.frames)
    atomic_write(out / "strip.png", lambda tmp: Image.fromarray(image).save(tmp))
    print(
        f"{out / 'strip.png'}: episode {info.id} steps {steps}" + (" with depth under" if "depth" in ds.fields else "")
    )
    fps = args.fps or ds.index["source"].get("fps") or DOOM_TICS_PER_SECOND / ds.frame_skip
    n = write_clip(ds, episode, out / "clip.mp4", args.clip_steps, fps)
    print(f"{out / 'clip.mp4'}: {n} frames at {fps:g} fps")
    if "pose" in ds.fields:
        try:
            from worldgen.data.coverage import plot_coverage
        except ImportError:
            print("coverage.png skipped: worldgen.data.coverage is not installed")
        else:
            plot_coverage(ds, out / "coverage.png")
            print(f"{out / 'coverage.png'}: visited map cells of all {len(ds)} episodes")
    return 0
