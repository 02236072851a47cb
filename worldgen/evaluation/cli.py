"""``worldgen eval``: evaluate a checkpoint on held-out episodes, write a JSON, a plot and a video.

``--suite plain`` (the default) scores rollouts against the recorded future
(:mod:`worldgen.evaluation.evaluate`); ``--suite play`` scores what a player feels against the
game's own answers: action branches, revisits, camera motion (:mod:`worldgen.evaluation.play`).
The play suite replays ViZDoom, so this module hands it to the env side
(``worldgen.env.sources.play_suite``), imported by name only when asked for, as ``worldgen train``
does with the env's heads: nothing under worldgen/ imports the env.

Examples:
    worldgen eval --checkpoint default --data data/doom-heldout --split all --json eval.json
    worldgen eval --suite play --checkpoint default --data data/doom-heldout --split all --json play.json
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from worldgen.checkpoint import CheckpointError
from worldgen.data import DatasetError
from worldgen.evaluation.evaluate import EvalConfig, EvaluationError, evaluate, summary, write_json

PLAY_WINDOWS = 32  # the play suite's default: each window is 14 cases of 16-68 frames


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EvalConfig()
    p.add_argument(
        "--suite",
        choices=("plain", "play"),
        default="plain",
        help="plain: rollouts against the recorded future; play: action branches, revisits and "
        "camera motion against the game itself (docs/evaluation.md)",
    )
    p.add_argument("--checkpoint", default="default", help="checkpoint folder or packaged name (default: default)")
    p.add_argument(
        "--data",
        required=True,
        help="dataset folder to draw held-out windows from (play suite: a "
        "ViZDoom recording, or a branch recording made from one)",
    )
    p.add_argument("--json", required=True, type=Path, help="where to write the results (keys: evaluate.py docstring)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for psnr_vs_horizon.png and real_vs_generated.mp4 (default: <json stem>_media next to the JSON)",
    )
    p.add_argument("--no-media", action="store_true", help="write only the JSON")
    p.add_argument(
        "--split",
        choices=("heldout", "all"),
        default=d.split,
        help="heldout: Dataset.split()'s held-out episodes; all: every episode, for data recorded "
        "with seeds never used in training",
    )
    p.add_argument(
        "--heldout-fraction",
        type=float,
        default=None,
        help="share of episodes Dataset.split() holds out (default: the trainer's, else 0.1)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=d.context,
        help="real context frames (default: the trained window minus one block, i.e. one frame)",
    )
    p.add_argument(
        "--horizon",
        type=int,
        default=None,
        help=f"longest rollout (default {d.horizon}; play suite: steps per branch, default 16)",
    )
    p.add_argument(
        "--windows", type=int, default=None, help=f"held-out windows (default {d.windows}; play suite: {PLAY_WINDOWS})"
    )
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    p.add_argument("--ctx-noise", type=float, default=None, help="context noise level (default: the checkpoint's)")
    p.add_argument("--shift", type=float, default=None, help="sampler schedule shift (default: the checkpoint's)")
    p.add_argument(
        "--guidance", type=float, default=None, help="action guidance scale, 1 = none (default: the checkpoint's)"
    )
    p.add_argument("--batch", type=int, default=d.batch, help=f"windows per forward (default {d.batch})")
    p.add_argument("--seed", type=int, default=d.seed, help="picks windows, shuffles actions, seeds noise")
    p.add_argument(
        "--windows-from",
        type=Path,
        default=None,
        metavar="EVAL_JSON",
        help="score that eval.json's windows and shuffled actions (its context and horizon) instead "
        "of drawing new ones: pairs two evaluations window by window",
    )
    p.add_argument("--video-windows", type=int, default=d.video_windows, help="windows shown in the video")
    p.add_argument(
        "--no-pose-correction",
        dest="pose_correction",
        action="store_false",
        help="a world-cache model's rollouts keep the camera poses the motion model predicts (by default "
        "each is corrected from the frame made there, as sessions play)",
    )
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    play = p.add_argument_group("play suite")
    play.add_argument(
        "--branches",
        type=Path,
        default=None,
        help="where the game's branch recording is made from --data, or reused when it matches "
        "(default: <json stem>_branches next to the JSON)",
    )
    play.add_argument(
        "--yaw-step",
        type=float,
        default=10.0,
        help="degrees per mouse-yaw step of the yaw branches and the revisits' turns (default 10)",
    )
    play.add_argument(
        "--walks",
        type=int,
        nargs="+",
        default=[8, 16],
        help="k of the out-and-back walks: forward k, turn 180, forward k, turn 180 (default 8 16)",
    )
    play.add_argument("--workers", type=int, default=None, help="game replay processes (default: one per core)")
    play.add_argument(
        "--geometry",
        default="learned",
        help="odometry for camera motion: 'learned' (the model's geometry head), a checkpoint "
        "folder holding one, or 'none'",
    )


def run(args: argparse.Namespace) -> int:
    if args.suite == "play":
        if not args.pose_correction:
            print(
                "worldgen eval: --no-pose-correction is for the plain suite (its rollouts report pose drift)",
                file=sys.stderr,
            )
            return 2
        args.windows = PLAY_WINDOWS if args.windows is None else args.windows
        return importlib.import_module("worldgen.env.sources.play_suite").run(args)
    d = EvalConfig()
    cfg = EvalConfig(
        context=args.context,
        horizon=d.horizon if args.horizon is None else args.horizon,
        windows=d.windows if args.windows is None else args.windows,
        steps=args.steps,
        ctx_noise=args.ctx_noise,
        shift=args.shift,
        guidance=args.guidance,
        batch=args.batch,
        split=args.split,
        seed=args.seed,
        heldout_fraction=args.heldout_fraction,
        video_windows=args.video_windows,
        windows_from=args.windows_from,
        pose_correction=args.pose_correction,
    )
    media = None if args.no_media else (args.out or args.json.with_name(f"{args.json.stem}_media"))
    try:
        result = evaluate(args.checkpoint, args.data, cfg, device=args.device, media=media)
    except (EvaluationError, DatasetError, CheckpointError) as e:
        print(f"worldgen eval: {e}", file=sys.stderr)
        return 2
    write_json(result, args.json)
    print(summary(result))
    print("wrote " + ", ".join([str(args.json)] + [f for f in result["files"].values() if f]))
    return 0
