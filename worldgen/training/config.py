"""A training run's config: :class:`TrainConfig` (the flags every run has; trainers subclass it)
and its command-line flags, one per field (:func:`add_config_args`, :func:`config_from_args`)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from worldgen import checkpoint


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field whose ``help`` is both its flag's help and the why of its default."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Flags every training run has. Subclasses add the model- and data-specific ones."""

    data: str = opt("", "dataset folder (worldgen record); only the train side of ds.split() is trained on")
    out: str = opt(
        "",
        "run folder: state, checkpoints, logs, samples; an existing one is resumed "
        "(alias --run, except under torchrun, which reads --run as its --run-path)",
        aliases=("--run",),
    )
    steps: int | None = opt(None, "optimizer steps: fixes the LR schedule (with --minutes: an upper bound)")
    minutes: float | None = opt(
        None,
        "wall-clock budget, set-up and data encoding included: the step count is fixed from the "
        "measured speed after the first steps and stored, so a resume finishes the same schedule",
    )
    batch_size: int = opt(
        32,
        "samples per step over all GPUs (the global batch); torchrun splits it evenly over "
        "the ranks, so the same run resumes on another number of GPUs",
    )
    lr: float = opt(3e-4, "peak AdamW learning rate")
    weight_decay: float = opt(0.01, "AdamW decay on matrices only (never on norms/biases)")
    warmup: int = opt(200, "linear LR warmup steps; long enough that early Adam moments settle")
    min_lr_ratio: float = opt(0.1, "cosine decays to lr * this, not to 0, so the last steps still learn")
    grad_clip: float = opt(1.0, "global grad-norm clip; guards against the odd bad batch at high LR")
    ema_decay: float = opt(0.999, "EMA of weights; ~1000-step horizon suits runs of 5k-50k steps")
    ckpt_every: int = opt(1000, "save resume state and export every N steps")
    ckpt_minutes: float = opt(5.0, "... and at least every M minutes, so a killed run loses little")
    log_every: int = opt(10, "log loss/throughput every N steps (each log syncs the GPU once)")
    sample_every: int = opt(1000, "write sample images every N steps (0: only at the end)")
    seed: int = opt(0, "seeds init and every draw; the same seed gives the same run")
    heldout_fraction: float = opt(0.1, "share of episodes held out (by hash of episode id)")
    device: str = opt("auto", "auto (cuda if available), cuda or cpu; torchrun uses cuda:LOCAL_RANK")
    compile: bool = opt(False, "torch.compile the model (faster on GPU after a compile of ~1 min)")
    export_dtype: str = opt(
        "fp32",
        "dtype of the exported ckpt/ weights (fp8: matrices in float8 with per-tensor scales, the rest bf16)",
        choices=tuple(checkpoint.STORAGE),
    )
    stop_at: int | None = opt(
        None,
        "stop this process at step S, state saved, to resume later (with any number "
        "of GPUs); the schedule stays --steps. Not stored: a resume runs to the end",
    )


# --- config <-> command line ----------------------------------------------------------------
def add_config_args(parser: argparse.ArgumentParser, cls: type[TrainConfig], required: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` (``batch_size`` -> ``--batch-size``); all default to None so
    :func:`config_from_args` can tell the flags given from the defaults."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        help_ = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if f.name not in required and f.default is not None:  # None: unset, its help says what that means
            help_ += f" (default: {f.default})"
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(
                flag,
                *f.metadata.get("aliases", ()),
                type=base,
                default=None,
                help=help_,
                required=f.name in required,
                choices=f.metadata.get("choices"),
                metavar=None if f.metadata.get("choices") else f.name.upper(),
            )


def config_from_args(cls: type[TrainConfig], args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any]]:
    """``(config, given)``: defaults overridden by the flags given, and those flags alone."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    cfg = cls(**given)
    for f in dataclasses.fields(cls):
        if f.metadata.get("choices") and getattr(cfg, f.name) not in f.metadata["choices"]:
            raise ValueError(f"--{f.name.replace('_', '-')} must be one of {f.metadata['choices']}")
    return cfg, given
