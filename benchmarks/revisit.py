"""Long revisit: does the world look the same when the player comes back? (issue 23, requirement 4)

For each window of a held-out recording REC (made by ``worldgen record``, so the game can replay it):

* context: ``--context`` real frames up to frame ``s``, with their cameras;
* way out: the next ``--out-frames`` recorded actions (L >= 64). A window qualifies only if the
  start view leaves the camera's field of view along it: at least ``--out-of-view`` of the L
  cameras see less than ``--out-share`` (10%) of the start frame's view frustum
  (:mod:`worldgen.memory.bank`);
* way back: the way out's actions reversed and inverted (forward <-> back, the strafes and the
  turn keys swapped, mouse negated), so the camera walks back along its path facing the way it
  faced, and sees the way out's views in reverse. The game plays them from frame ``s + L``
  (``worldgen.env.sources.record.branch``): the true frames and cameras of the way back.

Every ``--variant`` plays all windows as one batch (``WorldModel.step_many``) with the game's
camera for each new frame (``--dead-reckon``: the session's own estimate instead, as in play),
and is scored by PSNR against the game on the way out, the way back, and the way back's last
quarter (the views seen longest ago: where memory matters most). A variant is
``LABEL=CHECKPOINT[,key=value...]``, the pairs going to ``WorldModel.load`` (``memory_k=0``
turns the frame bank off; a world-cache model takes its own settings the same way).

Prints a markdown table; ``--json`` keeps every number (per-frame PSNR series included).

Example (the issue's table once the world cache is merged; the variant settings are the lead's):
    worldgen record --env doom --steps 16000 --workers 16 --seed 1000 --out data/heldout
    python benchmarks/revisit.py --data data/heldout --device cuda --windows 32 \\
        --variant "no memory=runs/mem/ckpt,memory_k=0" --variant "frame bank=runs/mem/ckpt" \\
        --json revisit.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worldgen.actions import KEYS, Action
from worldgen.data import Dataset
from worldgen.engine.world_model import WorldModel
from worldgen.evaluation.metrics import psnr
from worldgen.memory.bank import BankConfig, in_frustum, view_points
from worldgen.training.common import hardware

# The key each key becomes when walking a path backwards.
_MIRROR = {
    "forward": "back",
    "back": "forward",
    "strafe_left": "strafe_right",
    "strafe_right": "strafe_left",
    "turn_left": "turn_right",
    "turn_right": "turn_left",
}
INVERSE_KEY = np.array([KEYS.index(_MIRROR.get(k, k)) for k in KEYS])

# (source "DATASET::EPISODE_ID", frame, keys (K, 8), mouse (K, 2)) -> the game's frames (K, H, W, 3),
# poses (K, 5), and whether its replay reached the recorded frame exactly (env.record.branch)
Game = Callable[[str, int, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, bool]]


class RevisitError(ValueError):
    """Input this benchmark cannot use; the message names the problem."""


def reverse_path(keys: np.ndarray, mouse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The actions (N, 8), (N, 2) that undo ``keys``, ``mouse`` step by step, last step first.

    Example:
        >>> k = np.zeros((2, 8), np.uint8); k[0, 0] = 1; k[1, 4] = 1      # forward, then turn_left
        >>> back_k, back_m = reverse_path(k, np.array([[5.0, 1.0], [0.0, 0.0]], np.float32))
        >>> [[KEYS[i] for i in np.flatnonzero(row)] for row in back_k], back_m.tolist()
        ([['turn_right'], ['back']], [[-0.0, -0.0], [-5.0, -1.0]])
    """
    return keys[::-1][:, INVERSE_KEY].copy(), -mouse[::-1].copy()


def view_share_left(poses: np.ndarray, cfg: BankConfig) -> np.ndarray:
    """(N,) share of the view frustum of ``poses[0]`` that each of ``poses[1:]`` (N, 5) still sees."""
    p = torch.from_numpy(np.asarray(poses, np.float32))
    return in_frustum(view_points(p[0], cfg)[None], p[1:], cfg).float().mean(-1).numpy()


def pick_windows(
    ds: Dataset, context: int, out_frames: int, out_of_view: int, n: int, out_share: float = 0.1, stride: int = 8
) -> list[tuple[int, int]]:
    """Up to ``n`` windows ``(episode, s)`` whose way out leaves the start view (sees less than
    ``out_share`` of its frustum) for ``out_of_view`` frames, spread evenly over all that qualify
    (at most one start per ``stride`` frames)."""
    if "pose" not in ds.fields:
        raise RevisitError(f"{ds.root}: the recording has no camera poses")
    cfg, found = BankConfig(), []
    for e, info in enumerate(ds.episodes):
        pose = ds.read(e, "pose")
        for s in range(context - 1, info.length - out_frames - 1, stride):
            if (view_share_left(pose[s : s + out_frames + 1], cfg) < out_share).sum() >= out_of_view:
                found.append((e, s))
    if not found:
        raise RevisitError(
            f"{ds.root}: no window of {out_frames} frames leaves the start view (< {out_share} of it "
            f"seen) for {out_of_view} frames; record longer episodes or lower --out-of-view"
        )
    return [found[int(i)] for i in np.unique(np.linspace(0, len(found) - 1, min(n, len(found))).round())]


def game_branch(source: str, at: int, keys: np.ndarray, mouse: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """The real game's way back (``worldgen.env.sources.record.branch``)."""
    from worldgen.env.sources.record import branch  # ViZDoom only where the game side runs

    return branch(source, at, keys, mouse)


class Window:
    """One revisit case: context, way out (recorded) and way back (the game's)."""

    def __init__(self, ds: Dataset, episode: int, s: int, context: int, out_frames: int, game: Game):
        self.episode, self.s = episode, s
        lo = s - context + 1
        keys, mouse = ds.read(episode, "keys"), ds.read(episode, "mouse")
        self.frames = ds.read(episode, "frames", lo, s + out_frames + 1)  # context + way out
        self.poses = ds.read(episode, "pose", lo, s + out_frames + 1)
        # keys[i] is the action after frame i, so frame i was made by keys[i - 1] (a no-op for frame 0).
        made_by = [Action(keys[i - 1], mouse[i - 1]) if i > 0 else Action.from_keys([]) for i in range(lo, s + 1)]
        self.context_actions = made_by
        self.out_actions = [Action(k, m) for k, m in zip(keys[s : s + out_frames], mouse[s : s + out_frames])]
        back_k, back_m = reverse_path(keys[s : s + out_frames], mouse[s : s + out_frames])
        self.back_actions = [Action(k, m) for k, m in zip(back_k, back_m)]
        # matched: the game's replay reached frame s + L exactly; else its way back starts elsewhere.
        self.back_frames, self.back_poses, self.matched = game(
            f"{ds.root}::{ds.episodes[episode].id}", s + out_frames, back_k, back_m
        )
        self.context = context


def play(wm: WorldModel, windows: Sequence[Window], seed: int, dead_reckon: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every window as one batch: generated frames (W, L, H, W, 3) of the way out and of the way back."""
    sessions = [
        wm.session(
            w.frames[: w.context],
            w.context_actions,
            seed=seed + i,
            context_poses=None if dead_reckon else w.poses[: w.context],
        )
        for i, w in enumerate(windows)
    ]
    out, back = [], []
    try:
        for i in range(len(windows[0].out_actions)):
            poses = None if dead_reckon else np.stack([w.poses[w.context + i] for w in windows])
            out.append(wm.step_many(sessions, [w.out_actions[i] for w in windows], poses))
        for i in range(len(windows[0].back_actions)):
            poses = None if dead_reckon else np.stack([w.back_poses[i] for w in windows])
            back.append(wm.step_many(sessions, [w.back_actions[i] for w in windows], poses))
    finally:
        for s in sessions:
            s.close()
    return np.stack(out, 1), np.stack(back, 1)


def score(windows: Sequence[Window], out: np.ndarray, back: np.ndarray) -> dict[str, Any]:
    """PSNR against the game: means over windows of the way out, the way back and its last quarter."""
    real_out = np.stack([w.frames[w.context :] for w in windows])
    real_back = np.stack([w.back_frames for w in windows])
    p_out = psnr(out, real_out).numpy()  # (W, L)
    p_back = psnr(back, real_back).numpy()
    last = p_back[:, -max(1, p_back.shape[1] // 4) :]
    return {
        "psnr_out": round(float(p_out.mean()), 3),
        "psnr_back": round(float(p_back.mean()), 3),
        "psnr_back_last_quarter": round(float(last.mean()), 3),
        "psnr_back_per_frame": [round(float(v), 3) for v in p_back.mean(0)],
    }


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """``LABEL=CHECKPOINT[,key=value...]`` -> (label, checkpoint, load kwargs); values parsed as JSON
    where they can be (numbers), else kept as strings.

    Example:
        >>> parse_variant("bank=runs/mem/ckpt,memory_k=4,memory_cap=128")
        ('bank', 'runs/mem/ckpt', {'memory_k': 4, 'memory_cap': 128})
    """
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest:
        raise RevisitError(f"--variant must be LABEL=CHECKPOINT[,key=value...], got {text!r}")
    ckpt, *pairs = rest.split(",")
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RevisitError(f"--variant {label}: settings are key=value, got {pair!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return label, ckpt, kwargs


def run(args: argparse.Namespace, game: Game = game_branch) -> dict[str, Any]:
    ds = Dataset(args.data)
    variants = [parse_variant(v) for v in args.variant]
    if not variants:
        raise RevisitError("give at least one --variant LABEL=CHECKPOINT[,key=value...]")
    if args.out_frames < 1 or not 0 < args.out_of_view <= args.out_frames or args.context < 1:
        raise RevisitError(
            f"need --context >= 1 and 0 < --out-of-view <= --out-frames, got {args.context}, "
            f"{args.out_of_view}, {args.out_frames}"
        )
    t0 = time.perf_counter()
    picked = pick_windows(ds, args.context, args.out_frames, args.out_of_view, args.windows, args.out_share)
    windows = [Window(ds, e, s, args.context, args.out_frames, game) for e, s in picked]
    unmatched = [[ds.episodes[w.episode].id, w.s] for w in windows if not w.matched]
    windows = [w for w in windows if w.matched]
    if not windows:
        raise RevisitError(f"{args.data}: the game's replay reproduced none of the {len(picked)} windows")
    game_s = time.perf_counter() - t0
    rows = []
    for label, ckpt, kwargs in variants:
        t1 = time.perf_counter()
        try:
            wm = WorldModel.load(ckpt, device=args.device, **kwargs)
        except (TypeError, ValueError) as e:
            raise RevisitError(f"--variant {label}: {e}") from None
        if windows[0].frames.shape[1:] != wm.frame_shape:
            raise RevisitError(
                f"{args.data}: frames are {windows[0].frames.shape[1:]}, the model {label} makes {wm.frame_shape}"
            )
        out, back = play(wm, windows, args.seed, args.dead_reckon)
        mem = wm.memory
        rows.append(
            {
                "variant": label,
                "checkpoint": ckpt,
                "settings": kwargs,
                "memory": None if mem is None else {"k": mem.k, "cap": mem.cap},
                **score(windows, out, back),
                "seconds": round(time.perf_counter() - t1, 1),
            }
        )
        print(f"[revisit] {label}: way back {rows[-1]['psnr_back']:.2f} dB", file=sys.stderr)
    return {
        "data": str(args.data),
        "windows": [[ds.episodes[w.episode].id, w.s] for w in windows],
        "skipped_replay_mismatch": unmatched,
        "context": args.context,
        "out_frames": args.out_frames,
        "out_of_view": args.out_of_view,
        "out_share": args.out_share,
        "poses": "dead-reckoned" if args.dead_reckon else "game",
        "game_seconds": round(game_s, 1),
        "device": hardware(torch.device(args.device)),
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"Revisit: {len(result['windows'])} windows, {result['out_frames']} frames out and back "
        f"({result['poses']} cameras), PSNR dB against the game",
        "",
        "| variant | way out | way back | way back, last quarter |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['variant']} | {r['psnr_out']:.2f} | {r['psnr_back']:.2f} | {r['psnr_back_last_quarter']:.2f} |"
        for r in result["rows"]
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="held-out recording made by `worldgen record` (poses, replayable)")
    p.add_argument("--variant", action="append", default=[], help="LABEL=CHECKPOINT[,key=value...] (repeat)")
    p.add_argument("--windows", type=int, default=32, help="revisit cases, played as one batch per variant")
    p.add_argument("--context", type=int, default=8, help="real frames each session starts from")
    p.add_argument("--out-frames", type=int, default=96, help="frames of the way out (and of the way back)")
    p.add_argument("--out-of-view", type=int, default=64, help="way-out frames that must not see the start view")
    p.add_argument(
        "--out-share",
        type=float,
        default=0.1,
        help="a camera seeing less than this share of the start view's frustum has left it",
    )
    p.add_argument("--dead-reckon", action="store_true", help="sessions estimate their cameras, as in play")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run(args)
    except (RevisitError, OSError) as e:
        print(f"revisit: {e}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
