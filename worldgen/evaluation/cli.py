"""``worldgen eval``: evaluate a checkpoint on held-out episodes, write a JSON, a plot and a video.

Example:
    worldgen eval --checkpoint default --data data/doom-heldout --split all --json eval.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worldgen.checkpoint import CheckpointError
from worldgen.data import DatasetError
from worldgen.evaluation.evaluate import EvalConfig, EvaluationError, evaluate, summary, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EvalConfig()
    p.add_argument("--checkpoint", default="default", help="checkpoint folder or packaged name (default: default)")
    p.add_argument("--data", required=True, help="dataset folder to draw held-out windows from")
    p.add_argument("--json", required=True, type=Path, help="where to write the results (keys: evaluate.py docstring)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for psnr_vs_horizon.png and real_vs_generated.mp4 (default: <json stem>_media "
                        "next to the JSON)")
    p.add_argument("--no-media", action="store_true", help="write only the JSON")
    p.add_argument("--split", choices=("heldout", "all"), default=d.split,
                   help="heldout: Dataset.split()'s held-out episodes; all: every episode, for data recorded "
                        "with seeds never used in training")
    p.add_argument("--heldout-fraction", type=float, default=None,
                   help="share of episodes Dataset.split() holds out (default: the trainer's, else 0.1)")
    p.add_argument("--context", type=int, default=d.context,
                   help="real context frames (default: the trained window minus one block, i.e. one frame)")
    p.add_argument("--horizon", type=int, default=d.horizon, help=f"longest rollout (default {d.horizon})")
    p.add_argument("--windows", type=int, default=d.windows, help=f"held-out windows (default {d.windows})")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    p.add_argument("--ctx-noise", type=float, default=None, help="context noise level (default: the checkpoint's)")
    p.add_argument("--shift", type=float, default=None, help="sampler schedule shift (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="action guidance scale, 1 = none (default: the checkpoint's)")
    p.add_argument("--batch", type=int, default=d.batch, help=f"windows per forward (default {d.batch})")
    p.add_argument("--seed", type=int, default=d.seed, help="picks windows, shuffles actions, seeds noise")
    p.add_argument("--windows-from", type=Path, default=None, metavar="EVAL_JSON",
                   help="score that eval.json's windows and shuffled actions (its context and horizon) instead "
                        "of drawing new ones: pairs two evaluations window by window")
    p.add_argument("--video-windows", type=int, default=d.video_windows, help="windows shown in the video")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    cfg = EvalConfig(context=args.context, horizon=args.horizon, windows=args.windows, steps=args.steps,
                     ctx_noise=args.ctx_noise, shift=args.shift, guidance=args.guidance, batch=args.batch, split=args.split, seed=args.seed,
                     heldout_fraction=args.heldout_fraction, video_windows=args.video_windows,
                     windows_from=args.windows_from)
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
