"""``worldgen train tokenizer|dynamics|distill|reward|geometry``: train the per-frame tokenizer, then the
DiT on its latents, then (``distill``) a few-step student of it (Self Forcing); ``reward`` fits the
Gymnasium env's reward/termination head (:mod:`worldgen.env.learned.reward_train`), ``geometry`` its depth
and odometry head (:mod:`worldgen.env.learned.geometry_train`).

Examples:
    worldgen train tokenizer --data data/doom --out runs/tok --minutes 8
    worldgen train dynamics --data data/doom --tokenizer runs/tok --out runs/dyn --minutes 15
    worldgen train distill --data data/doom --teacher runs/dyn --out runs/distill --minutes 20
    torchrun --nproc-per-node 4 -m worldgen.cli train dynamics --data data/doom --tokenizer runs/tok \\
        --out runs/dyn --steps 20000
    worldgen train reward --data data/doom --out runs/reward --minutes 10
    worldgen train geometry --data data/doom --out runs/geometry --minutes 10

A run folder that already holds a run is resumed: same config, same schedule, from its last
checkpoint. ``RUN/ckpt`` is the model folder to use (`worldgen play RUN/ckpt`, `worldgen eval`).
"""

from __future__ import annotations

import argparse
import importlib

from worldgen.training.common import add_config_args, config_from_args

# subcommand -> (module, config class name, help)
TRAINERS: dict[str, tuple[str, str, str]] = {
    "tokenizer": (
        "worldgen.training.tokenizer",
        "TokenizerTrainConfig",
        "train the per-frame VAE tokenizer; reports held-out PSNR/SSIM",
    ),
    "dynamics": (
        "worldgen.training.dynamics",
        "DynamicsTrainConfig",
        "train the block-causal DiT by Diffusion Forcing on tokenizer latents",
    ),
    "distill": (
        "worldgen.training.distill",
        "DistillTrainConfig",
        "Self Forcing: distil a Diffusion-Forcing model into a few-step student on its own rollouts",
    ),
    "reward": (
        "worldgen.env.learned.reward_train",
        "RewardTrainConfig",
        "train a reward/termination head on recorded game variables (for the Gymnasium env)",
    ),
    "geometry": (
        "worldgen.env.learned.geometry_train",
        "GeometryTrainConfig",
        "train a depth + odometry head on recorded depth and poses (the env's depth and pose)",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    for name, (module, cls_name, help_) in TRAINERS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        cls = getattr(importlib.import_module(module), cls_name)
        add_config_args(p, cls, required=("data", "out"))
        p.add_argument(
            "--resume",
            action="store_true",
            help="require a run to resume in --out (a run folder with state resumes anyway)",
        )


def run(args: argparse.Namespace) -> int:
    module, cls_name, _ = TRAINERS[args.what]
    mod = importlib.import_module(module)
    cfg, given = config_from_args(getattr(mod, cls_name), args)
    if args.resume:
        from pathlib import Path

        from worldgen.training.common import has_state

        if not has_state(Path(cfg.out) / "state"):
            raise SystemExit(f"--resume: {cfg.out} has no resume state (state/train.json)")
    mod.train(cfg, given)
    return 0
