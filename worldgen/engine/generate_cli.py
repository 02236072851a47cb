"""``worldgen generate``: its flags, the run over one or both fusions, and the report (a table,
and with ``--json`` the settings, seam measures and timing). The algorithm is
:mod:`worldgen.engine.generate`."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from worldgen.actions import ActionError
from worldgen.checkpoint import CheckpointError
from worldgen.data import DatasetError
from worldgen.engine.generate import FUSIONS, GenerateConfig, GenerateError, generate_video, seam_measure
from worldgen.engine.generate_inputs import load_actions, load_context
from worldgen.files import atomic_write, write_mp4
from worldgen.provenance import git_commit

if TYPE_CHECKING:
    from worldgen.engine.world_model import WorldModel


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = GenerateConfig()
    p.add_argument("--checkpoint", default="default", help="model folder or packaged name (default: default)")
    p.add_argument(
        "--context",
        required=True,
        help="a recording folder (with --episode, --start) or an .npz with frames (T, H, W, 3) uint8, "
        "keys (T, 8), mouse (T, 2): the action that produced each frame",
    )
    p.add_argument(
        "--episode",
        default="0",
        help="recording: episode id (stable across re-recordings, see `worldgen data info`) or index (default 0)",
    )
    p.add_argument("--start", type=int, default=0, help="recording: step of the first context frame (default 0)")
    p.add_argument(
        "--context-frames",
        type=int,
        default=d.context,
        help="frames each clip is conditioned on, real ones first (default: the trained window minus the clip)",
    )
    p.add_argument(
        "--actions",
        required=True,
        help="an .npz (keys (N, 8), mouse (N, 2)), a .json list or .jsonl file of "
        '{"keys": [names], "mouse": [yaw, pitch]}, or "dataset": the recorded actions after '
        "the context (then the real frames are compared too)",
    )
    p.add_argument("--frames", type=int, default=None, help="frames to generate (default: one per given action)")
    p.add_argument("--fusion", default=d.fusion, choices=FUSIONS, help=f"clip fusion (default {d.fusion})")
    p.add_argument(
        "--compare",
        action="store_true",
        help="also run the other fusion (video next to --out, suffixed with its name) and print both",
    )
    p.add_argument("--clip", type=int, default=d.clip, help="frames per overlap clip, even (default: fits the window)")
    p.add_argument(
        "--renoise", type=float, default=d.renoise, help=f"re-noise level of a fused clip (default {d.renoise})"
    )
    p.add_argument("--out", type=Path, required=True, help="the video, .mp4")
    p.add_argument("--json", type=Path, default=None, help="also write seam measure, settings and timing here")
    p.add_argument("--seed", type=int, default=d.seed, help="sampler noise (default 0)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, default=None, help="action guidance scale (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def _inputs(args: argparse.Namespace, context: int) -> dict[str, np.ndarray]:
    """Context, actions (N, A) and, with ``--actions dataset``, the real frames to compare with."""
    if args.frames is not None and args.frames < 1:
        raise GenerateError(f"--frames must be at least 1, got {args.frames}")
    from_data = args.actions == "dataset"
    if from_data and Path(args.context).suffix == ".npz":
        raise GenerateError("--actions dataset needs --context to be a recording folder")
    got = load_context(args.context, context, args.episode, args.start, args.frames if from_data else 0)
    real_actions = got.pop("real_actions", None)
    if not from_data:
        got.pop("real", None)
    got["todo"] = real_actions if from_data else load_actions(args.actions)
    n = len(got["todo"]) if args.frames is None else args.frames
    if n < 1 or n > len(got["todo"]):
        raise GenerateError(f"{len(got['todo'])} actions given; {n} frames asked for")
    got["todo"] = got["todo"][:n]
    return got


def run(args: argparse.Namespace) -> int:
    from worldgen.engine.world_model import WorldModel
    from worldgen.evaluation.metrics import psnr

    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [args.fusion] + [m for m in FUSIONS if m != args.fusion] * args.compare
    try:
        if args.out.suffix != ".mp4":
            raise GenerateError(f"--out must be an .mp4 file, got {args.out}")
        cfgs = {
            m: GenerateConfig(
                fusion=m, context=args.context_frames, clip=args.clip, renoise=args.renoise, seed=args.seed
            )
            for m in modes
        }
        try:
            wm = WorldModel.load(args.checkpoint, device=args.device, steps=args.steps, guidance=args.guidance)
        except ValueError as e:  # --steps or --guidance out of range for this model
            raise GenerateError(str(e)) from None
        context, _, _ = cfgs[args.fusion].plan(wm.trained_window, wm.dit.cfg.frames_per_block)
        got = _inputs(args, context)
        runs = {}
        for m in modes:
            video, stats = generate_video(wm, got["frames"], got["actions"], got["todo"], cfgs[m], progress=True)
            path = args.out if m == args.fusion else args.out.with_name(f"{args.out.stem}_{m}.mp4")
            write_mp4(path, video, wm.fps)
            if "real" in got:
                stats["psnr"] = round(float(psnr(video, got["real"][: len(video)]).mean()), 3)
            runs[m] = {"video": str(path), **stats}
    except (GenerateError, ActionError, DatasetError, CheckpointError) as e:
        print(f"worldgen generate: {e}", file=sys.stderr)
        return 2
    real = None
    if "real" in got:
        real = seam_measure(got["real"][: len(got["todo"])], runs[modes[0]]["clip_starts"])
    _report(args, wm, cfgs[args.fusion], runs, real, got.get("episode_id"))
    return 0


def _report(
    args: argparse.Namespace,
    wm: WorldModel,
    cfg: GenerateConfig,
    runs: dict[str, dict],
    real: dict | None,
    episode_id: str | None,
) -> None:
    first = next(iter(runs.values()))
    print(
        f"worldgen generate: {first['frames']} frames, clip starts every {first['hop']} frames, context "
        f"{first['context']}, {wm.stream.steps} steps, renoise {cfg.renoise}, on {wm.device}"
    )
    print(
        f"{'fusion':<9}{'clips':>6}{'seam ratio':>11}{'boundary':>10}{'inside':>8}{'PSNR':>8}"
        f"{'DiT passes/frame':>18}{'frames/s':>10}  video"
    )
    for m, r in runs.items():
        s = r["seam"]
        print(
            f"{m:<9}{len(r['clip_starts']) + 1:>6}{_f(s['ratio']):>11}{_f(s['boundary']):>10}{_f(s['inside']):>8}"
            f"{_f(r.get('psnr')):>8}{r['dit_frame_passes_per_frame']:>18}{r['frames_per_s']:>10}  {r['video']}"
        )
    if real:
        print(f"{'real':<9}{'':>6}{_f(real['ratio']):>11}{_f(real['boundary']):>10}{_f(real['inside']):>8}")
    if args.json:
        commit = git_commit()
        out = {
            "checkpoint": str(wm.checkpoint),
            "device": str(wm.device),
            "threads": torch.get_num_threads(),
            "context": args.context,
            "episode": episode_id,
            "start": args.start,
            "actions": args.actions,
            "frames": first["frames"],
            "config": asdict(cfg),
            "sampler": wm.stream.settings(),
            "runs": runs,
            "real": real,
            "date": datetime.date.today().isoformat(),
            "commit": commit or None,
            "torch": torch.__version__,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1)))


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
